"""Where the model comes from: a seed-`Net` checkpoint, or any model from an import string.

`load_source` is what every command calls first. It returns the model in eval mode, its inputs
(shape and dtype of each, in the forward's order), their ONNX names and seeded example inputs, so
fold, export, check and bench treat a user's model like the shipped one.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnexport.data import Normalize
from bnexport.errors import ModelSpecError
from bnexport.limits import MAX_DIM, check_memory

EXAMPLE_BATCH = 2
NET_INPUT_NAMES = ("input",)  # the seed Net's ONNX interface: input → logits
NET_OUTPUT_NAMES = ("logits",)
EXAMPLE_SEED = 0
#: Bytes per element of each input dtype.
DTYPE_BYTES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4}
DTYPE_BYTES |= {"int16": 2, "int8": 1, "uint8": 1, "bool": 1}
#: Dtypes an ``--input-shape`` may name after a colon (``8:int64``), by alias → canonical name.
INPUT_DTYPES = {
    **{n: n for n in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16")},
    **{n: n for n in ("int8", "uint8", "bool")},
    "float": "float32",
    "fp32": "float32",
    "double": "float64",
    "fp64": "float64",
    "half": "float16",
    "fp16": "float16",
    "bf16": "bfloat16",
    "long": "int64",
    "int": "int32",
}


@dataclass(frozen=True)
class InputSpec:
    """One positional input of the model: its shape without the batch dimension, and its dtype."""

    shape: tuple[int, ...]
    dtype: str = "float32"  # a canonical name of INPUT_DTYPES

    def describe(self) -> str:
        dims = ",".join(map(str, self.shape))
        return f"[N,{dims}]" + ("" if self.dtype == "float32" else f" {self.dtype}")


@dataclass
class ModelSource:
    """A model ready to fold, export or check.

    ``input_names`` are the ONNX input names (the forward's parameter names; ``input`` for the seed
    Net); ``output_names`` the ONNX output names, or None for the exporter's defaults.
    ``rebuild`` builds the model again (a ``--model`` factory without weights), to tell an
    unseeded factory apart.
    """

    model: Any  # torch.nn.Module, eval mode
    input_specs: tuple[InputSpec, ...]
    example_inputs: tuple[Any, ...]  # torch.Tensors, batch EXAMPLE_BATCH, forward order
    input_names: tuple[str, ...]
    output_names: tuple[str, ...] | None
    normalize: Normalize | None
    temperature: float | None
    sha256: str | None
    name: str
    is_net: bool
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rebuild: Callable[[], Any] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The first input's shape (the only one for single-input models)."""
        return self.input_specs[0].shape

    @property
    def example_input(self) -> Any:
        """The first example input."""
        return self.example_inputs[0]

    @property
    def sample_bytes(self) -> int:
        """Bytes one sample of every input takes, as fed (to size a request against memory)."""
        return sum(math.prod(s.shape) * DTYPE_BYTES[s.dtype] for s in self.input_specs)


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``"C,H,W"`` or ``"C,H,W:dtype"`` (any rank, no batch dimension)."""
    shape_text, _, dtype_text = text.partition(":")
    dtype = INPUT_DTYPES.get(dtype_text.strip().lower() or "float32")
    if dtype is None:
        raise ModelSpecError(
            f"--input-shape {text!r}: unknown dtype {dtype_text!r}; use one of "
            f"{', '.join(sorted(set(INPUT_DTYPES.values())))}"
        )
    return InputSpec(parse_input_shape(shape_text), dtype)


def parse_input_shape(text: str) -> tuple[int, ...]:
    """Parse ``"C,H,W"`` (any rank, no batch dimension) into positive ints; ``3x64x64`` is
    refused with the comma-separated spelling, never silently read."""
    if "x" in text.lower():
        fixed = ",".join(p.strip() for p in text.lower().split("x"))
        raise ModelSpecError(
            f"--input-shape {text!r}: write the sizes comma-separated, without the batch "
            f"dimension: --input-shape {fixed}"
        )
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ModelSpecError(
            f"--input-shape {text!r} is not a comma-separated list of integers (e.g. 3,32,32)"
        ) from None
    if not shape or any(d <= 0 for d in shape):
        raise ModelSpecError(
            f"--input-shape {text!r} needs positive sizes, without the batch dimension"
        )
    if any(d > MAX_DIM for d in shape):
        raise ModelSpecError(
            f"--input-shape {text!r}: a size is too large (at most {MAX_DIM} per dimension)"
        )
    return shape


def load_source(
    checkpoint: str | os.PathLike[str] | None,
    *,
    model_spec: str | None = None,
    input_specs: Sequence[InputSpec] | None = None,
    temperature: float | None = None,
) -> ModelSource:
    """Load the seed `Net` from `checkpoint`, or the model `model_spec` builds (with weights).

    `model_spec` is ``package.module:factory`` (like uvicorn's app strings): `factory` is a callable
    returning an `nn.Module` (or a module instance). The working directory is importable, after the
    installed packages (`resolve_model`).
    `input_specs`: one per positional input of the model's forward, in order.
    """
    specs = tuple(input_specs) if input_specs else None
    if model_spec is None:
        return _net_source(checkpoint, specs, temperature)
    return _user_source(checkpoint, model_spec, specs, temperature)


def example_inputs(specs: Sequence[InputSpec], batch: int = EXAMPLE_BATCH) -> tuple[Any, ...]:
    """Seeded example inputs, independent of the global RNG: standard normal floats, integers
    uniform in ``[0, INT_INPUT_HIGH)`` (valid indices of any embedding that large), random bools."""
    import torch

    from bnexport.defaults import INT_INPUT_HIGH

    gen = torch.Generator().manual_seed(EXAMPLE_SEED)
    out = []
    for spec in specs:
        size = (batch, *spec.shape)
        dtype = getattr(torch, spec.dtype)
        if dtype.is_floating_point:
            x = torch.randn(size, generator=gen, dtype=torch.float32).to(dtype)
        else:
            high = 2 if dtype == torch.bool else INT_INPUT_HIGH
            x = torch.randint(0, high, size, generator=gen).to(dtype)
        out.append(x)
    return tuple(out)


def example_input(input_shape: tuple[int, ...], batch: int = EXAMPLE_BATCH) -> Any:
    """A seeded standard-normal float32 batch (the first of `example_inputs`)."""
    return example_inputs([InputSpec(tuple(input_shape))], batch)[0]


def _net_source(
    checkpoint: str | os.PathLike[str] | None,
    specs: tuple[InputSpec, ...] | None,
    temperature: float | None,
) -> ModelSource:
    from bnexport.checkpoint import load_checkpoint
    from bnexport.nets import INPUT_SHAPE

    if checkpoint is None:
        raise ModelSpecError(
            "give a CHECKPOINT, or --model package.module:factory for your own model"
        )
    net_spec = InputSpec(INPUT_SHAPE)
    if specs is not None and specs != (net_spec,):
        given = " ".join(s.describe() for s in specs)
        raise ModelSpecError(
            f"--input-shape {given} does not fit the seed Net, whose one input is "
            f"{net_spec.describe()}"
        )
    ckpt = load_checkpoint(checkpoint, temperature=temperature)
    return ModelSource(
        model=ckpt.model,
        input_specs=(net_spec,),
        example_inputs=example_inputs([net_spec]),
        input_names=NET_INPUT_NAMES,
        output_names=NET_OUTPUT_NAMES,
        normalize=ckpt.normalize,
        temperature=ckpt.temperature,
        sha256=ckpt.sha256,
        name=Path(checkpoint).name,
        is_net=True,
        metadata=ckpt.metadata,
        notes=ckpt.notes,
    )


#: Said when a --model factory returns its model in train mode (every command runs it in eval).
TRAIN_MODE_NOTE = (
    "the factory returned the model in train mode; bnexport uses it in eval mode (BatchNorm "
    "running statistics, dropout off), as an exported model runs"
)


def _user_source(
    checkpoint: str | os.PathLike[str] | None,
    model_spec: str,
    specs: tuple[InputSpec, ...] | None,
    temperature: float | None,
) -> ModelSource:
    import torch

    from bnexport.checkpoint import load_state_dict_strict, read_torch_file
    from bnexport.files import sha256_file
    from bnexport.signature import forward_parameters

    if temperature is not None:
        raise ModelSpecError(
            "--temperature applies to the seed Net's state dicts; set it in your factory instead"
        )
    model = resolve_model(model_spec)
    params = forward_parameters(model)
    if specs is None:
        names = f" (one per input of forward({', '.join(params[0])}))" if params else ""
        raise ModelSpecError(
            f"--model {model_spec} needs --input-shape{names}, e.g. 3,32,32 (no batch dim)"
        )
    names = _input_names(model_spec, params, len(specs))
    check_memory(
        EXAMPLE_BATCH * sum(math.prod(s.shape) * DTYPE_BYTES[s.dtype] for s in specs),
        f"--input-shape {' '.join(s.describe() for s in specs)} (a batch of {EXAMPLE_BATCH})",
        "check the sizes (without the batch dimension)",
    )
    sha = None
    if checkpoint is not None:
        state = read_torch_file(checkpoint)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ModelSpecError(f"{checkpoint}: expected a state_dict, got {type(state).__name__}")
        load_state_dict_strict(model, state, checkpoint)
        sha = sha256_file(checkpoint)
    notes = [TRAIN_MODE_NOTE] if any(m.training for m in model.modules()) else []
    model.eval()
    examples = example_inputs(specs)
    try:
        with torch.no_grad():
            model(*examples)
    except Exception as exc:
        given = ", ".join(f"{n} {s.describe()}" for n, s in zip(names, specs, strict=True))
        raise ModelSpecError(
            f"{model_spec} fails on inputs {given}: {type(exc).__name__}: {exc}; "
            "check --input-shape (one per forward input, in order, with its dtype)"
        ) from None

    def rebuild() -> Any:
        return resolve_model(model_spec).eval()

    return ModelSource(
        model=model,
        input_specs=specs,
        example_inputs=examples,
        input_names=names,
        output_names=None,
        normalize=None,
        temperature=None,
        sha256=sha,
        name=model_spec,
        is_net=False,
        rebuild=rebuild if checkpoint is None else None,
        notes=notes,
    )


def _input_names(
    model_spec: str, params: tuple[tuple[str, ...], int] | None, count: int
) -> tuple[str, ...]:
    """The forward's first `count` parameter names; `ModelSpecError` when `count` can't fit."""
    if params is None:  # forward(*args): nothing to name them after
        return tuple(f"input_{i}" for i in range(count))
    names, required = params
    if required <= count <= len(names):
        return names[:count]
    takes = f"{required}" if required == len(names) else f"{required} to {len(names)}"
    raise ModelSpecError(
        f"--model {model_spec}: forward({', '.join(names)}) takes {takes} input(s), got "
        f"{count} --input-shape; give one --input-shape per input, in that order "
        "(e.g. --input-shape 3,32,32 --input-shape 8:int64)"
    )


def resolve_model(spec: str) -> Any:
    """Import ``package.module:attr[.attr]`` and return the `nn.Module` it is or builds.

    The working directory is importable during the import and the factory call only, and after
    the installed packages, so a stray ``onnxscript.py`` there cannot shadow a dependency.
    Exceptions raised by the user's code become `ModelSpecError` naming them (the original is
    the cause, shown with ``--debug``).
    """
    from torch import nn

    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ModelSpecError(f"--model {spec!r} must look like package.module:factory")
    _check_module_name(spec, module_name)
    with working_dir_importable():
        obj: Any = _import_user_module(spec, module_name)
        origin = getattr(obj, "__file__", None) or module_name
        for part in attr_path.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise ModelSpecError(
                    f"--model {spec}: {module_name} ({origin}) has no attribute {attr_path!r}"
                ) from None
        if not isinstance(obj, nn.Module):
            obj = _call_factory(spec, attr_path, obj)
    if not isinstance(obj, nn.Module):
        raise ModelSpecError(
            f"--model {spec}: the factory returned {type(obj).__name__}, not a torch.nn.Module"
        )
    return obj


def _check_module_name(spec: str, module_name: str) -> None:
    """A dotted module name, as ``import`` takes it; a file path or a relative name is refused
    with the ``--model`` that works (`ModelSpecError`), before anything is imported."""
    if all(part.isidentifier() for part in module_name.split(".")):
        return
    attr = spec.partition(":")[2]
    parts = [p for p in module_name.replace("\\", "/").split("/") if p not in ("", ".")]
    up = [p for p in parts if p == ".."]
    names = [p.removesuffix(".py") for p in parts if p != ".."]
    dotted = ".".join(names)
    if (
        ("/" in module_name or module_name.endswith(".py"))
        and names
        and all(n.isidentifier() for n in names)
    ):
        fixed = f"--model {dotted}:{attr}"
        if up:
            folder = "/".join(up)
            how = f"run bnexport from {folder} with {fixed} (or put {folder} on PYTHONPATH)"
        else:
            how = f"give {fixed}, from the folder that holds {parts[0]}"
        raise ModelSpecError(
            f"--model {spec}: {module_name!r} is a file path; --model takes a module as Python "
            f"imports it, found from the working directory: {how}"
        )
    raise ModelSpecError(
        f"--model {spec}: {module_name!r} is not a module name (dotted Python identifiers, no "
        "leading dot: package.module:factory)"
    )


@contextlib.contextmanager
def working_dir_importable() -> Iterator[None]:
    """Make the working directory importable, last on ``sys.path``; restore ``sys.path`` after."""
    saved = list(sys.path)
    sys.path.append(os.getcwd())
    importlib.invalidate_caches()  # files written since the interpreter started are found
    try:
        yield
    finally:
        sys.path[:] = saved


def _import_user_module(spec: str, module_name: str) -> Any:
    """Import the ``--model`` module; a missing module and an error in its code are told apart."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
            raise _user_code_error(spec, f"error importing {module_name}:", exc) from exc
        raise ModelSpecError(
            f"--model {spec}: cannot import {module_name!r}: no module {exc.name!r} among the "
            f"installed packages or in the working directory {os.getcwd()}; run bnexport from "
            "the folder that holds it, or install it"
        ) from None
    except (Exception, SystemExit) as exc:  # the user's module failed while running
        raise _user_code_error(spec, f"error importing {module_name}:", exc) from exc


def _call_factory(spec: str, attr_path: str, factory: Any) -> Any:
    """Call the ``--model`` factory; an exception it raises is reported as the user's."""
    if not callable(factory):
        raise ModelSpecError(f"--model {spec}: {attr_path} is neither a module nor a factory")
    try:
        return factory()
    except (Exception, SystemExit) as exc:
        raise _user_code_error(spec, f"the factory {attr_path}() raised", exc) from exc


def _user_code_error(spec: str, what: str, exc: BaseException) -> ModelSpecError:
    """``what`` and the user's exception, one line; ``--debug`` shows its traceback (the cause)."""
    detail = " ".join(str(exc).split())
    return ModelSpecError(
        f"--model {spec}: {what} {type(exc).__name__}"
        + (f": {detail}" if detail else "")
        + " (in your code; rerun with --debug for its traceback)"
    )
