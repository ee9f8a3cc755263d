"""Export a (folded) PyTorch model: a self-contained ONNX file, or a `torch.export` program.

Both use `torch.export` with a dynamic first dimension named ``batch`` on every input and output;
a model takes any number of positional tensor inputs (float, integer or bool). The work lives in
named modules; this package re-exports their public names:

* `bnexport.export.to_onnx` — `export_onnx`: the dynamo exporter, names, checks, the file;
* `bnexport.export.cleanup` — the fixed onnxscript cleanup after the exporter;
* `bnexport.export.program` — `save_program`: a `.pt2` program;
* `bnexport.export.metadata` — what the ONNX file records about its model;
* `bnexport.export.exporter` — running torch's exporters quietly, example batches, failures.

The exporter's console output (prints, warnings, log records) is captured; it appears only in the
`ExportError` raised when an export fails.
"""

from __future__ import annotations

from bnexport.export.exporter import (
    BATCH_DIM,
    dynamic_batch_shapes,
    example_batches,
    quiet_exporter,
)
from bnexport.export.metadata import build_metadata
from bnexport.export.program import ProgramResult, save_program
from bnexport.export.to_onnx import ExportResult, export_onnx

__all__ = [
    "BATCH_DIM",
    "ExportResult",
    "ProgramResult",
    "build_metadata",
    "dynamic_batch_shapes",
    "example_batches",
    "export_onnx",
    "quiet_exporter",
    "save_program",
]
