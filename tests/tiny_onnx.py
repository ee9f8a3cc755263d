"""Small hand-built ONNX models for tests that need a file, not a PyTorch model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def conv_net(
    channels: int = 4, size: int = 8, classes: int = 3, batch: int | str = "batch", seed: int = 0
) -> onnx.ModelProto:
    """``x [batch, 1, size, size] → Conv 3×3 → Relu → Flatten → Gemm → logits``, seeded weights."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((channels, 1, 3, 3)).astype(np.float32)
    b = rng.standard_normal(channels).astype(np.float32)
    fc = (rng.standard_normal((classes, channels * size * size)) / size).astype(np.float32)
    fcb = rng.standard_normal(classes).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], transB=1),
    ]
    inits = [
        numpy_helper.from_array(a, n) for a, n in ((w, "w"), (b, "b"), (fc, "fc"), (fcb, "fcb"))
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, size, size])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])
    graph = helper.make_graph(nodes, "conv_net", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"source": "tests/tiny_onnx.py"})
    onnx.checker.check_model(model, full_check=True)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Write ``model`` to ``path`` and return the path."""
    path.write_bytes(model.SerializeToString())
    return path
