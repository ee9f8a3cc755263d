"""What the parity check feeds: named input sets, concatenated into one sample axis.

Sources: the bundled Fashion-MNIST images (normalized with the checkpoint's ``Normalize``), an IDX
directory (``--data DIR``), a saved ``.npz`` (``--inputs``), seeded standard-normal inputs, and edge
cases (all zeros, constant images, ±large values). Integer inputs get seeded integers in
``[0, INT_INPUT_HIGH)`` (valid indices of any embedding that large; edge cases: all 0, all
``INT_INPUT_HIGH - 1``), bool inputs random or constant bools. ``save_inputs`` writes exactly the
arrays fed, so ``--inputs`` reproduces a run bit for bit, including where its worst elements were
found.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnexport.defaults import DEFAULT_SEED, INT_INPUT_HIGH
from bnexport.errors import ParityInputError
from bnexport.signature import TensorSpec

DEFAULT_RANDOM_COUNT = 64
EDGE_LARGE = 1.0e4  # "large" edge-case magnitude, in the model's input units
#: The edge cases a check keeps when the model is too slow for all of them (`bnexport.parity.plan`):
#: all zeros (what the biases alone give) and ±EDGE_LARGE with random signs (far from the data).
CORE_EDGE_CASES = ("zeros", "large±")
#: The names of every edge-case set (`edge_case_inputs`): constant or ±huge inputs, far from data.
EDGE_CASE_SETS = frozenset(
    {"zeros", "ones", "minus-ones", "black", "gray", "white", "large+", "large-", "large±"}
)
IMAGE_SHAPE = (1, 28, 28)  # the shape the bundled images and IDX files fit
META_SETS = "__sets__"
META_SIZES = "__set_sizes__"
META_DESCRIPTIONS = "__set_descriptions__"


@dataclass(frozen=True)
class InputSet:
    """A named group of samples (``arrays[name]`` has the samples on axis 0)."""

    name: str
    arrays: dict[str, np.ndarray]
    description: str

    @property
    def size(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0]) if self.arrays else 0


@dataclass
class ParityInputs:
    """Every input set, fed as one sample axis in ``batch_size`` chunks."""

    specs: tuple[TensorSpec, ...]
    sets: tuple[InputSet, ...]
    notes: list[str] = field(default_factory=list)
    source: str = "generated"
    plan: dict[str, Any] | None = None  # how a default check sized these (`bnexport.parity.plan`)
    pad_batches: bool = False  # a fixed-batch model: the last chunk is padded to the batch size
    _arrays: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    @property
    def size(self) -> int:
        return sum(s.size for s in self.sets)

    def arrays(self) -> dict[str, np.ndarray]:
        """All samples, concatenated in set order (C-contiguous)."""
        if self._arrays is None:
            self._arrays = {
                name: np.ascontiguousarray(np.concatenate([s.arrays[name] for s in self.sets]))
                for name in self.names
            }
        return self._arrays

    def locate(self, sample: int) -> tuple[str, int]:
        """``(set name, index in set)`` of the ``sample``-th sample fed."""
        start = 0
        for s in self.sets:
            if sample < start + s.size:
                return s.name, sample - start
            start += s.size
        raise IndexError(f"sample {sample} out of range ({self.size} samples)")

    def edge_case_mask(self) -> np.ndarray:
        """Per sample fed: True for an edge case (`EDGE_CASE_SETS`), False for data-like ones."""
        return np.concatenate(
            [np.full(s.size, s.name in EDGE_CASE_SETS) for s in self.sets] or [np.zeros(0, bool)]
        )

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive chunks of ``batch_size`` samples. The last may be shorter, or, with
        ``pad_batches`` (a model whose batch dimension is fixed), is filled up by repeating its
        last sample: the outputs past ``size`` are to be dropped (`bnexport.parity.engine`)."""
        arrays = self.arrays()
        for start in range(0, self.size, batch_size):
            chunk = {name: arr[start : start + batch_size] for name, arr in arrays.items()}
            short = start + batch_size - self.size
            if self.pad_batches and short > 0:
                chunk = {
                    name: np.concatenate([arr, np.repeat(arr[-1:], short, axis=0)])
                    for name, arr in chunk.items()
                }
            yield chunk

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "samples": self.size,
            "inputs": [s.to_dict() for s in self.specs],
            "sets": [
                {"name": s.name, "samples": s.size, "description": s.description} for s in self.sets
            ],
            "notes": list(self.notes),
            "plan": self.plan,
        }


@dataclass(frozen=True)
class InputConfig:
    """Which inputs to feed. ``inputs_file`` replaces every generated set.

    ``bundled``: None feeds the bundled images when they fit (a single 28×28 input with a known
    normalization: the seed Net), True asks for them (a note says why not when they don't fit),
    False never feeds them.
    """

    bundled: bool | None = None
    data_dir: Path | None = None
    data_limit: int | None = None
    inputs_file: Path | None = None
    random_count: int = DEFAULT_RANDOM_COUNT
    seed: int = DEFAULT_SEED
    edge_cases: bool = True
    core_edge_cases_only: bool = False  # only `CORE_EDGE_CASES` (a check on a slow model)


def as_shapes(
    input_shape: tuple[int, ...] | Sequence[tuple[int, ...]] | None,
) -> list[tuple[int, ...]] | None:
    """One shape (a tuple of ints) or one per input, as a list of shapes."""
    if input_shape is None:
        return None
    items = list(input_shape)
    if all(isinstance(d, int) for d in items):
        return [tuple(items)]  # type: ignore[arg-type]
    return [tuple(int(d) for d in shape) for shape in items]  # type: ignore[union-attr]


def resolve_sample_shapes(
    specs: Sequence[TensorSpec],
    input_shape: tuple[int, ...] | Sequence[tuple[int, ...]] | None,
) -> dict[str, tuple[int, ...]]:
    """Each input's per-sample shape (no batch dim), from the ONNX model and ``input_shape``.

    ``input_shape`` is one shape (single-input models) or one per ONNX input, in order. Symbolic
    dimensions after the batch need it; a static ONNX shape that disagrees with it is an error.
    """
    given = as_shapes(input_shape)
    if given is not None and len(given) != len(specs):
        raise ParityInputError(
            f"the ONNX model has {len(specs)} input(s) {[s.name for s in specs]} but "
            f"{len(given)} input shape(s) were given; give one --input-shape per input, in order"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    for i, spec in enumerate(specs):
        if not spec.shape:
            raise ParityInputError(
                f"ONNX input {spec.name!r} is a scalar; bnexport check needs a batch dimension"
            )
        dims = spec.shape[1:]
        if given is not None:
            want = given[i]
            if len(want) != len(dims) or any(
                d is not None and d != w for d, w in zip(dims, want, strict=False)
            ):
                raise ParityInputError(
                    f"ONNX input {spec.describe()} does not fit the PyTorch model's input shape "
                    f"[N,{','.join(map(str, want))}]; export the model again or fix "
                    "--input-shape"
                )
            shapes[spec.name] = want
        elif any(d is None for d in dims):
            raise ParityInputError(
                f"ONNX input {spec.describe()} has symbolic dimensions besides the batch; "
                "give --input-shape (one per input) or --inputs FILE.npz"
            )
        else:
            shapes[spec.name] = tuple(int(d) for d in dims)  # type: ignore[arg-type]
    return shapes


def bundled_images(normalize: Any) -> InputSet:
    """The bundled 1000-image Fashion-MNIST sample, normalized → float32 [1000, 1, 28, 28]."""
    from bnexport.data import load_sample, to_tensor

    images, _labels = load_sample()
    x = to_tensor(images, normalize).numpy()
    return InputSet(
        "bundled", {"": x}, f"{x.shape[0]} bundled Fashion-MNIST test images ({normalize})"
    )


def idx_images(data_dir: Path, normalize: Any, limit: int | None = None) -> InputSet:
    """Fashion-MNIST-layout IDX test images from ``data_dir`` (first ``limit``)."""
    from bnexport.data import load_split, to_tensor

    images, _labels = load_split(data_dir, "test")
    if limit is not None:
        images = images[:limit]
    x = to_tensor(images, normalize).numpy()
    return InputSet("data", {"": x}, f"{x.shape[0]} IDX test images from {data_dir}")


def random_inputs(
    shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype], count: int, seed: int
) -> InputSet:
    """``count`` seeded samples per input (numpy PCG64, independent of globals): standard normal
    floats, integers in ``[0, INT_INPUT_HIGH)``, random bools."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in shapes.items():
        size, dtype = (count, *shape), dtypes[name]
        if dtype.kind == "f":
            arrays[name] = rng.standard_normal(size).astype(dtype)
        else:
            high = 2 if dtype.kind == "b" else INT_INPUT_HIGH
            arrays[name] = rng.integers(0, high, size).astype(dtype)
    return InputSet("random", arrays, f"{count} standard-normal samples, seed {seed}")


def _constant(value: float, dtype: np.dtype) -> float | int | bool:
    """An edge-case value for an input of `dtype`: itself for floats; 0 (value ≤ 0) or the top of
    the generated range (value > 0) for integers and bools."""
    if dtype.kind == "f":
        return value
    if dtype.kind == "b":
        return value > 0
    return INT_INPUT_HIGH - 1 if value > 0 else 0


def edge_case_inputs(
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, np.dtype],
    normalize: Any,
    seed: int,
    *,
    core_only: bool = False,
) -> list[InputSet]:
    """All zeros; constant images (black, gray, white pixels when ``normalize`` is known, else ±1);
    and ±``EDGE_LARGE`` (all positive, all negative, random signs). ``core_only``: just
    `CORE_EDGE_CASES`."""
    rng = np.random.default_rng(seed + 1)
    consts: list[tuple[str, float, str]] = [("zeros", 0.0, "all zeros")]
    if normalize is not None:
        for label, pixel in (("black", 0), ("gray", 128), ("white", 255)):
            value = (pixel / 255.0 - normalize.mean) / normalize.std
            consts.append((label, value, f"constant image, every pixel {pixel}"))
    else:
        consts += [("ones", 1.0, "all +1"), ("minus-ones", -1.0, "all -1")]
    consts += [
        ("large+", EDGE_LARGE, f"all +{EDGE_LARGE:g}"),
        ("large-", -EDGE_LARGE, f"all -{EDGE_LARGE:g}"),
    ]
    sets = [
        InputSet(
            label,
            {
                n: np.full((1, *s), _constant(value, dtypes[n]), dtype=dtypes[n])
                for n, s in shapes.items()
            },
            desc,
        )
        for label, value, desc in consts
    ]
    signs = {n: rng.choice([-1.0, 1.0], size=(1, *s)) for n, s in shapes.items()}
    sets.append(
        InputSet(
            "large±",
            {
                n: np.where(
                    sign > 0, _constant(EDGE_LARGE, dtypes[n]), _constant(-EDGE_LARGE, dtypes[n])
                ).astype(dtypes[n])
                for n, sign in signs.items()
            },
            f"±{EDGE_LARGE:g} with random signs",
        )
    )
    if core_only:
        sets = [s for s in sets if s.name in CORE_EDGE_CASES]
    return sets


def build_inputs(
    specs: Sequence[TensorSpec],
    config: InputConfig,
    *,
    normalize: Any = None,
    input_shape: tuple[int, ...] | None = None,
) -> ParityInputs:
    """The inputs ``config`` asks for, shaped and typed for the ONNX model's ``specs``."""
    specs = tuple(specs)
    if config.inputs_file is not None:
        return load_inputs(config.inputs_file, specs)
    for spec in specs:
        if spec.dtype.kind not in "fiub":
            raise ParityInputError(
                f"ONNX input {spec.describe()} is neither a number nor a bool; bnexport check "
                "cannot generate it — pass --inputs FILE.npz with your own"
            )
    shapes = resolve_sample_shapes(specs, input_shape)
    dtypes = {s.name: s.dtype for s in specs}
    notes: list[str] = []
    sets: list[InputSet] = []

    image_ok = len(specs) == 1 and shapes[specs[0].name] == IMAGE_SHAPE
    image_why = ""
    if not image_ok:
        image_why = f"the model's input is not a single [N,{','.join(map(str, IMAGE_SHAPE))}] image"
    elif normalize is None:
        image_why = "no input normalization is known for this model"
    if config.data_dir is not None:
        if image_why:
            raise ParityInputError(f"--data {config.data_dir}: cannot feed IDX images: {image_why}")
        sets.append(
            _rename(idx_images(Path(config.data_dir), normalize, config.data_limit), specs[0])
        )
    if config.bundled is not False:
        if not image_why:
            sets.append(_rename(bundled_images(normalize), specs[0]))
        elif config.bundled:
            notes.append(f"bundled images not used: {image_why}")
    if config.random_count > 0:
        sets.append(random_inputs(shapes, dtypes, config.random_count, config.seed))
    if config.edge_cases:
        sets.extend(
            edge_case_inputs(
                shapes,
                dtypes,
                normalize if image_ok else None,
                config.seed,
                core_only=config.core_edge_cases_only,
            )
        )
    if not sets:
        raise ParityInputError(
            "no inputs to feed: enable the bundled images, random inputs or edge cases, "
            "or pass --inputs FILE.npz"
        )
    return ParityInputs(specs, tuple(sets), notes, source="generated")


def _rename(input_set: InputSet, spec: TensorSpec) -> InputSet:
    (array,) = input_set.arrays.values()
    return InputSet(
        input_set.name, {spec.name: array.astype(spec.dtype, copy=False)}, input_set.description
    )


def save_inputs(inputs: ParityInputs, path: str | os.PathLike[str]) -> None:
    """Write exactly what is fed to ``path`` (.npz, atomically): one array per ONNX input name,
    plus the set names, sizes and descriptions so a rerun locates samples the same way."""
    from bnexport.files import atomic_path

    arrays: dict[str, np.ndarray] = dict(inputs.arrays())
    arrays[META_SETS] = np.array([s.name for s in inputs.sets], dtype=np.str_)
    arrays[META_SIZES] = np.array([s.size for s in inputs.sets], dtype=np.int64)
    arrays[META_DESCRIPTIONS] = np.array([s.description for s in inputs.sets], dtype=np.str_)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_inputs(path: str | os.PathLike[str], specs: Sequence[TensorSpec]) -> ParityInputs:
    """Read a ``.npz`` of inputs (``save_inputs``' format, or any npz keyed by ONNX input name)."""
    path = Path(path)
    if not path.is_file():
        raise ParityInputError(f"--inputs {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except ValueError:  # numpy's text advises allow_pickle: never for a file of inputs
        raise ParityInputError(
            f"--inputs {path}: not a .npz of arrays (no numpy archive, or object arrays that "
            "only a pickle could load); write it with --save-inputs or numpy.savez"
        ) from None
    except Exception as exc:
        raise ParityInputError(f"--inputs {path}: not a readable .npz file ({exc})") from None
    names = [s.name for s in specs]
    given = [k for k in data if not k.startswith("__")]
    if sorted(given) != sorted(names):
        raise ParityInputError(
            f"--inputs {path} holds arrays {given}, but the ONNX model's inputs are {names}"
        )
    n = None
    for spec in specs:
        arr = data[spec.name]
        if arr.dtype != spec.dtype:
            raise ParityInputError(
                f"--inputs {path}: array {spec.name!r} is {arr.dtype}, the ONNX input is "
                f"{spec.dtype}; save it as {spec.dtype} (no silent casts: the run must be exact)"
            )
        if arr.ndim != len(spec.shape) or any(
            d is not None and d != a for d, a in zip(spec.shape[1:], arr.shape[1:], strict=False)
        ):
            raise ParityInputError(
                f"--inputs {path}: array {spec.name!r} has shape {list(arr.shape)}, the ONNX "
                f"input is {spec.describe()}"
            )
        if n is not None and arr.shape[0] != n:
            raise ParityInputError(f"--inputs {path}: arrays differ in their number of samples")
        n = int(arr.shape[0])
    if not n:
        raise ParityInputError(f"--inputs {path} holds no samples")
    if META_SETS in data and META_SIZES in data:
        set_names = [str(x) for x in data[META_SETS]]
        sizes = [int(x) for x in data[META_SIZES]]
        descs = (
            [str(x) for x in data[META_DESCRIPTIONS]]
            if META_DESCRIPTIONS in data
            else [""] * len(set_names)
        )
        if sum(sizes) != n or len(set_names) != len(sizes) or len(descs) != len(sizes):
            raise ParityInputError(f"--inputs {path}: its set sizes do not add up to {n} samples")
    else:
        set_names, sizes, descs = ["file"], [n], [f"{n} samples from {path.name}"]
    sets = []
    start = 0
    for name, size, desc in zip(set_names, sizes, descs, strict=True):
        sets.append(
            InputSet(name, {s.name: data[s.name][start : start + size] for s in specs}, desc)
        )
        start += size
    return ParityInputs(tuple(specs), tuple(sets), [], source=str(path))
