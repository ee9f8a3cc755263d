"""One exception hierarchy. The CLI turns any `BnexportError` into one line on stderr and exit 2."""

from __future__ import annotations


class BnexportError(Exception):
    """Base class: bad input or a request that cannot be honoured. Messages name the fix."""


class CheckpointError(BnexportError):
    """A checkpoint is missing, corrupt, unsafe, or does not match the architecture."""


class DataError(BnexportError):
    """A dataset is missing or an IDX file is malformed."""


class FoldError(BnexportError):
    """A BatchNorm cannot be folded safely (non-finite values, non-positive variance, overflow)."""


class ExportError(BnexportError):
    """The ONNX export failed or produced an invalid model."""


class OnnxFileError(BnexportError):
    """An ONNX file given as input is missing, a directory, not ONNX, or keeps its external data
    where bnexport will not read it (outside the model's folder, or missing)."""


class ModelSpecError(BnexportError):
    """A `--model package.module:factory` string cannot be resolved or its model is unusable."""


class ProviderUnavailableError(BnexportError):
    """An execution provider was asked for but does not really run (never a silent fallback)."""


class ParityInputError(BnexportError):
    """Parity inputs or the two models' inputs/outputs do not match (names, shapes, dtypes)."""


class WeightsMismatchError(ParityInputError):
    """The reference's weights are not the ones the ONNX model was exported from."""


class OutputPathError(BnexportError):
    """An output path is an input, a directory, or cannot be written."""


def interrupt_in(exc: BaseException) -> bool:
    """True when `exc` is a Ctrl-C or was raised while handling one.

    Libraries (torch.export's cleanup, a wrapper's ``except Exception``) can turn a
    ``KeyboardInterrupt`` into another exception; its cause/context chain still holds it.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def raise_if_interrupted(exc: BaseException) -> None:
    """Re-raise a Ctrl-C hidden in `exc`'s chain (call first in a broad ``except`` block)."""
    if interrupt_in(exc):
        raise KeyboardInterrupt from exc
