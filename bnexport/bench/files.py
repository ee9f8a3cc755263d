"""The ONNX files bench is given (``--onnx``, ``--tuned``): the ONNX front door, then whether each
fits the PyTorch model it is timed against, all before any work.

A file bench would feed the wrong thing (another input count, dtype or shape, a fixed batch other
than the batch sizes asked for) is refused in one line naming the file, what differs and the fix,
instead of failing in onnxruntime halfway through the run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bnexport.errors import BnexportError
from bnexport.limits import check_memory

if TYPE_CHECKING:
    import onnx

    from bnexport.source import ModelSource

#: ONNX element types → the numpy dtype names `bnexport.source.InputSpec` uses.
_DTYPES = {1: "float32", 11: "float64", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32"}


def check_bench_files(
    onnx_path: str | os.PathLike[str] | None,
    tuned_paths: Sequence[str | os.PathLike[str]],
    source: ModelSource,
    batch_sizes: Sequence[int],
) -> None:
    """Every file bench was given passes `bnexport.onnx_file.check_onnx_model` and takes the
    model's one input at every batch size; else `BnexportError` naming the option and the file."""
    from bnexport.onnx_file import check_onnx_model

    given = [("--onnx", onnx_path)] if onnx_path is not None else []
    given += [("--tuned", p) for p in tuned_paths]
    for label, path in given:
        model = check_onnx_model(path, label)
        problem = _fit_problem(model, source, batch_sizes)
        if problem is not None:
            raise BnexportError(f"{label} {path} {problem}")


def check_feed_memory(source: ModelSource, batch_sizes: Sequence[int]) -> None:
    """Refuse batch sizes whose input batches alone (bench makes one per batch size, float32)
    would not fit in the memory here (`bnexport.limits.check_memory`)."""
    per_sample = math.prod(source.input_shape) * 4
    check_memory(
        per_sample * sum(batch_sizes),
        f"--batch-sizes {','.join(map(str, batch_sizes))} (inputs [N,"
        f"{','.join(map(str, source.input_shape))}] float32)",
        "give smaller --batch-sizes",
    )


def _fit_problem(
    model: onnx.ModelProto, source: ModelSource, batch_sizes: Sequence[int]
) -> str | None:
    """How the file's inputs differ from the one input bench feeds, and the fix; or None."""
    fix = f"; bench the ONNX file exported from {source.name}"
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in constants]
    want = source.input_specs[0]
    expected = f"one input [N,{','.join(map(str, want.shape))}] {want.dtype}"
    if len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs)
        return f"takes {len(inputs)} inputs ({names}); the PyTorch model takes {expected}{fix}"
    value = inputs[0].type.tensor_type
    dtype = _DTYPES.get(value.elem_type, f"ONNX type {value.elem_type}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in value.shape.dim]
    shown = ",".join("?" if d is None else str(d) for d in dims)
    if dtype != want.dtype or len(dims) != len(want.shape) + 1:
        return (
            f"takes {inputs[0].name!r} [{shown}] {dtype}; the PyTorch model takes {expected}{fix}"
        )
    if any(d is not None and d != w for d, w in zip(dims[1:], want.shape, strict=True)):
        return f"takes {inputs[0].name!r} [{shown}]; the PyTorch model takes {expected}{fix}"
    batch = dims[0]
    if batch is not None and any(b != batch for b in batch_sizes):
        sizes = ",".join(map(str, batch_sizes))
        return (
            f"has a fixed batch of {batch} ({inputs[0].name!r} [{shown}]) but bench runs batch "
            f"sizes {sizes}; give --batch-sizes {batch}, or export it with a dynamic batch"
        )
    return None
