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


class ModelSpecError(BnexportError):
    """A `--model package.module:factory` string cannot be resolved or its model is unusable."""


class ProviderUnavailableError(BnexportError):
    """An execution provider was asked for but does not really run (never a silent fallback)."""


class ParityInputError(BnexportError):
    """Parity inputs or the two models' inputs/outputs do not match (names, shapes, dtypes)."""


class WeightsMismatchError(ParityInputError):
    """The reference's weights are not the ones the ONNX model was exported from."""
