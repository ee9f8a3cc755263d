"""Running torch's exporters quietly: example batches, the dynamic batch dimension, the exporter's
console output captured, and its failures turned into one `ExportError` line."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from bnexport.errors import ExportError, raise_if_interrupted

if TYPE_CHECKING:
    import torch

BATCH_DIM = "batch"
# How much captured exporter output an ExportError carries.
# How much captured exporter output an ExportError carries.
TAIL_CHARS = 1500
# Loggers whose handlers write straight to the console during an export.
NOISY_LOGGERS = ("torch", "onnx", "onnxscript", "onnx_ir")


def example_batches(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """The example inputs as a tuple of batches of one size, at least 2 long (torch.export
    specializes a batch of 1 to a constant)."""
    import torch

    inputs = (
        tuple(example_inputs) if isinstance(example_inputs, tuple | list) else (example_inputs,)
    )
    if not inputs:
        raise ExportError("no example inputs: pass a tensor or a tuple of tensors")
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ExportError(
                f"example input {i} must be a tensor with a batch dimension, got "
                f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}"
            )
    batches = {int(x.shape[0]) for x in inputs}
    if len(batches) > 1:
        raise ExportError(
            f"the example inputs have different batch sizes {sorted(batches)}; the first "
            "dimension of every input is the batch"
        )
    out = tuple(x.detach() for x in inputs)
    if batches == {1}:
        out = tuple(x.expand(2, *x.shape[1:]).clone() for x in out)
    return out


def dynamic_batch_shapes(inputs: tuple[torch.Tensor, ...]) -> tuple[dict[int, Any], ...]:
    """One ``batch`` dimension shared by every input."""
    import torch

    batch = torch.export.Dim(BATCH_DIM)
    return tuple({0: batch} for _ in inputs)


def export_failure(stage: str, exc: BaseException, captured: str) -> ExportError:
    """An ExportError naming the stage, the cause and the tail of what the exporter printed.

    A Ctrl-C the exporter turned into another exception is raised as the KeyboardInterrupt it is.
    """
    raise_if_interrupted(exc)
    cause = " ".join(f"{type(exc).__name__}: {exc}".split())
    if len(cause) > TAIL_CHARS:
        cause = cause[:TAIL_CHARS] + " …"
    tail = " ".join(captured.split())[-TAIL_CHARS:]
    hint = ""
    if "batch" in cause and ("Constraint" in cause or "specializ" in cause):
        hint = " (the model fixes the batch size; make it work for any batch size)"
    message = f"{stage} failed{hint}: {cause}"
    if tail:
        message += f" | exporter output: …{tail}"
    return ExportError(message)


@contextlib.contextmanager
def writable(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a failure to create or replace `path` into an ExportError naming it."""
    try:
        yield
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Trace with inference semantics; give the caller's model its training flags back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def quiet_exporter() -> Iterator[io.StringIO]:
    """Capture stdout, stderr, warnings and the torch/onnx loggers' output into one buffer."""
    buffer = io.StringIO()
    capture = logging.StreamHandler(buffer)
    capture.setLevel(logging.INFO)  # torch's structured-trace DEBUG records are not output
    capture.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    swapped: list[tuple[logging.Logger, list[logging.Handler]]] = []
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if (
            isinstance(logger, logging.Logger)
            and logger.handlers
            and name.split(".")[0] in NOISY_LOGGERS
        ):
            swapped.append((logger, logger.handlers[:]))
            logger.handlers = [capture]
    try:
        with (
            contextlib.redirect_stdout(buffer),
            contextlib.redirect_stderr(buffer),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            try:
                yield buffer
            finally:
                for w in caught:
                    buffer.write(f"{w.category.__name__}: {w.message}\n")
    finally:
        for logger, handlers in swapped:
            logger.handlers = handlers
