"""Which ONNX opsets bnexport can export to here: the measurement behind `bnexport.defaults`.

For each opset in the range, the seed Net (unfolded: its BatchNormalization; folded: Conv/Gemm
only) goes through `bnexport.export.export_onnx` with the range check lifted, and onnxruntime runs
the file. A row says which opset the exporter produced (it writes 18 and converts; when a
conversion fails it silently keeps 18, which `export_onnx` refuses) and whether onnxruntime ran it.

Usage::

    .venv/bin/python scripts/opset_range.py [FIRST LAST]   # default 7 30
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnxscript
import torch

import bnexport.export.to_onnx as export
from bnexport.fold import fold_model
from bnexport.nets import Net
from bnexport.source import example_input


def measure(opset: int, model: torch.nn.Module, x: torch.Tensor, path: Path, fuse: bool) -> str:
    """``produced N, ort ok`` or why the export or the run failed."""
    try:
        result = export.export_onnx(model, (x,), path, opset=opset, fuse_batchnorm=fuse)
    except Exception as exc:
        return "no: " + " ".join(str(exc).split())[:90]
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        session.run(None, {session.get_inputs()[0].name: np.zeros((2, 1, 28, 28), np.float32)})
    except Exception as exc:
        return f"produced {result.opset}, ort fails: " + " ".join(str(exc).split())[:60]
    return f"produced {result.opset}, ort ok"


def main(first: int = 7, last: int = 30) -> None:
    print(
        f"torch {torch.__version__}, onnxscript {onnxscript.__version__}, onnx {onnx.__version__} "
        f"(newest opset {onnx.defs.onnx_opset_version()}), onnxruntime {ort.__version__}"
    )
    export.opset_problem = lambda opset: None  # measure beyond the declared range
    net = Net(temperature=1.5).eval()
    x = example_input((1, 28, 28))
    folded = fold_model(net, (x,)).module
    with tempfile.TemporaryDirectory() as tmp:
        for opset in range(first, last + 1):
            cells = [
                measure(opset, m, x, Path(tmp) / f"{opset}-{name}.onnx", fuse)
                for name, m, fuse in (("unfolded", net, False), ("folded", folded, True))
            ]
            print(f"opset {opset:2d}: unfolded {cells[0]} | folded {cells[1]}", flush=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
