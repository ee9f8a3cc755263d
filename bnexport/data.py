"""Fashion-MNIST data: IDX files (plain or gzip), dataset discovery, the bundled sample, Normalize.

IDX layout (big-endian): two zero bytes, a dtype code (0x08 = uint8), the number of dimensions,
one uint32 per dimension, then the payload. Images are ``0x00000803`` (uint8, 3 dims: N, 28, 28),
labels ``0x00000801`` (uint8, 1 dim: N).

This module imports no torch (it stays fast to import); only `to_tensor` does.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bnexport.errors import DataError

if TYPE_CHECKING:
    import torch

IMAGE_MAGIC = 0x00000803
LABEL_MAGIC = 0x00000801
IMAGE_SIZE = (28, 28)
NUM_CLASSES = 10

ENV_VAR = "BNEXPORT_DATA"
DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get install dataset-fashion-mnist"

SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

SAMPLE_PER_CLASS = 100
SAMPLE_FILES = (SPLITS["test"][0] + ".gz", SPLITS["test"][1] + ".gz")

# IDX dtype codes → big-endian numpy dtypes.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass(frozen=True)
class Normalize:
    """Input normalization for pixels scaled to [0, 1]: ``x = (pixel / 255 - mean) / std``."""

    mean: float
    std: float

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
                raise DataError(f"normalize {name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not math.isfinite(self.mean):
            raise DataError(f"normalize mean must be finite, got {self.mean}")
        if not (math.isfinite(self.std) and self.std > 0):
            raise DataError(f"normalize std must be finite and > 0, got {self.std}")

    def to_dict(self) -> dict[str, float]:
        """``{"mean": m, "std": s}``, the form stored in checkpoints and ONNX metadata."""
        return {"mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Normalize:
        """Inverse of `to_dict`; rejects anything but exactly the keys ``mean`` and ``std``."""
        if not isinstance(data, Mapping):
            raise DataError(f"normalize must be a mapping with mean and std, got {data!r}")
        keys = set(data)
        if keys != {"mean", "std"}:
            raise DataError(
                f"normalize needs exactly the keys mean and std, got {sorted(map(str, keys))}"
            )
        return cls(mean=data["mean"], std=data["std"])


# Measured on the 60,000 Fashion-MNIST training images (train-images-idx3-ubyte.gz): the mean and
# the population standard deviation (ddof=0) of all 47,040,000 pixels scaled to [0, 1], computed
# in float64 (0.2860405969887955, 0.35302424451492254), rounded to 8 decimals.
FASHION_MNIST_NORMALIZE = Normalize(mean=0.28604060, std=0.35302424)


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of an (uncompressed) IDX file; `name` labels errors."""
    if len(data) < 4:
        raise DataError(f"{name}: not an IDX file ({len(data)} bytes, the header needs 4)")
    magic = int.from_bytes(data[:4], "big")
    code, ndim = data[2], data[3]
    if data[0] != 0 or data[1] != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise DataError(
            f"{name}: bad IDX magic number 0x{magic:08X} (expected 0x{IMAGE_MAGIC:08X} for "
            f"images or 0x{LABEL_MAGIC:08X} for labels); is it an IDX file?"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{name}: truncated IDX header: {ndim} dimensions need {header} bytes, "
            f"the file has {len(data)}"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = dtype.itemsize * math.prod(shape)
    payload = len(data) - header
    if payload != expected:
        state = "truncated" if payload < expected else "has trailing bytes"
        raise DataError(
            f"{name}: payload {state}: shape {shape} of {dtype.name} needs {expected} bytes "
            f"after the header, found {payload}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (plain, or gzip when the name ends in ``.gz``) into a native-order array."""
    return parse_idx(_read_raw(Path(path)), str(path))


def _gunzip(raw: bytes, name: str) -> bytes:
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{name}: corrupt or truncated gzip data ({exc})") from None


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write `array` as IDX, atomically; gzip (no name, mtime 0: reproducible) if it ends in .gz."""
    from bnexport.files import atomic_path

    array = np.asarray(array)
    code = next(
        (
            c
            for c, dt in _IDX_DTYPES.items()
            if dt.kind == array.dtype.kind and dt.itemsize == array.dtype.itemsize
        ),
        None,
    )
    if code is None or array.ndim == 0:
        raise DataError(f"cannot write dtype {array.dtype} with shape {array.shape} as IDX")
    data = bytes([0, 0, code, array.ndim])
    data += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data += np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".gz":
            with (
                open(tmp, "wb") as raw,
                gzip.GzipFile(filename="", mode="wb", compresslevel=9, fileobj=raw, mtime=0) as gz,
            ):
                gz.write(data)
        else:
            tmp.write_bytes(data)


def split_files(data_dir: str | os.PathLike[str], split: str) -> tuple[Path, Path] | None:
    """The (images, labels) files of `split` in `data_dir` (plain before .gz); None if absent."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    found = []
    for stem in SPLITS[split]:
        candidates = [Path(data_dir) / stem, Path(data_dir) / f"{stem}.gz"]
        hit = next((p for p in candidates if p.is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


def _missing_files(data_dir: Path, splits: Sequence[str]) -> list[str]:
    return [
        f"{stem}[.gz]"
        for split in splits
        for stem in SPLITS[split]
        if not (data_dir / stem).is_file() and not (data_dir / f"{stem}.gz").is_file()
    ]


def find_data_dir(
    data_dir: str | os.PathLike[str] | None = None, *, splits: Sequence[str] = ("train", "test")
) -> Path:
    """Locate Fashion-MNIST: `data_dir` if given, else ``$BNEXPORT_DATA`` if set, else the default.

    A directory that was asked for explicitly (argument or environment) must hold the files: it is
    an error, not a silent fall-through to the next place.
    """
    for split in splits:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    options = (
        f"install it with `{INSTALL_HINT}`, or point --data-dir or ${ENV_VAR} at a directory "
        f"holding the IDX files"
    )
    if data_dir is not None:
        where, candidate = "--data-dir", Path(data_dir)
    elif os.environ.get(ENV_VAR):
        where, candidate = f"${ENV_VAR}", Path(os.environ[ENV_VAR])
    else:
        where, candidate = "the default location", DEFAULT_DATA_DIR
    if not candidate.is_dir():
        raise DataError(
            f"Fashion-MNIST not found: {where} {candidate} is not a directory; {options}"
        )
    missing = _missing_files(candidate, splits)
    if missing:
        raise DataError(
            f"Fashion-MNIST not found: {where} {candidate} lacks {', '.join(missing)}; {options}"
        )
    return candidate


def load_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and cross-check an images/labels IDX pair: uint8 [N, 28, 28] and int64 [N] in 0..9."""
    images = _read_checked(images_path, IMAGE_MAGIC, 3)
    labels = _read_checked(labels_path, LABEL_MAGIC, 1)
    if images.shape[1:] != IMAGE_SIZE:
        raise DataError(
            f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, "
            f"expected {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"image and label counts disagree: {images_path} has {images.shape[0]} images, "
            f"{labels_path} has {labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise DataError(
            f"{labels_path}: label {int(labels.max())} out of range 0..{NUM_CLASSES - 1}"
        )
    return images, labels.astype(np.int64)


def _read_checked(path: Path, magic: int, ndim: int) -> np.ndarray:
    raw = _read_raw(path)
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        shown = "none (file shorter than 4 bytes)" if found is None else f"0x{found:08X}"
        kind = "images" if magic == IMAGE_MAGIC else "labels"
        raise DataError(
            f"{path}: magic number {shown}, expected 0x{magic:08X} (uint8 {kind}, {ndim} dims)"
        )
    return parse_idx(raw, str(path))


def _read_raw(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file not found: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    return _gunzip(raw, str(path)) if path.suffix == ".gz" else raw


def load_split(data_dir: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load ``train`` or ``test`` from `data_dir`: images uint8 [N, 28, 28], labels int64 [N]."""
    files = split_files(data_dir, split)
    if files is None:
        missing = _missing_files(Path(data_dir), [split])
        raise DataError(
            f"{data_dir} lacks {', '.join(missing)}; install Fashion-MNIST with "
            f"`{INSTALL_HINT}` or pass --data-dir"
        )
    return load_pair(*files)


def load_sample() -> tuple[np.ndarray, np.ndarray]:
    """The bundled sample: 1000 Fashion-MNIST test images (the first 100 of each class, in test-set
    order) as uint8 [1000, 28, 28] and int64 [1000]. See bnexport/sample/LICENSE.md."""
    root = resources.files("bnexport").joinpath("sample")
    with (
        resources.as_file(root.joinpath(SAMPLE_FILES[0])) as images_path,
        resources.as_file(root.joinpath(SAMPLE_FILES[1])) as labels_path,
    ):
        return load_pair(Path(images_path), Path(labels_path))


def sample_indices(labels: np.ndarray, per_class: int = SAMPLE_PER_CLASS) -> np.ndarray:
    """Indices of the first `per_class` items of each class, in ascending (test-set) order."""
    labels = np.asarray(labels)
    picked = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)[:per_class]
        if idx.size < per_class:
            raise DataError(f"class {c} has only {idx.size} items, the sample needs {per_class}")
        picked.append(idx)
    return np.sort(np.concatenate(picked))


def to_tensor(images: Any, normalize: Normalize = FASHION_MNIST_NORMALIZE) -> torch.Tensor:
    """uint8 images [N, 28, 28] (or [N, 1, 28, 28]) → float32 [N, 1, 28, 28]:
    ``(pixel / 255 - mean) / std``."""
    import torch

    t = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if t.dtype != torch.uint8:
        raise DataError(f"to_tensor expects uint8 pixels, got {t.dtype}")
    if t.dim() == 3:
        t = t.unsqueeze(1)
    if t.dim() != 4 or t.shape[1] != 1:
        raise DataError(
            f"to_tensor expects images [N, 28, 28] or [N, 1, 28, 28], got {tuple(t.shape)}"
        )
    return t.to(torch.float32).div_(255.0).sub_(normalize.mean).div_(normalize.std)
