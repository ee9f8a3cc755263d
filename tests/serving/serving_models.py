"""Models the serving tests export with `bnexport onnx --model` (two inputs, a dict output), and
a served file with a parity fault."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class TwoInputDict(nn.Module):
    """``image [N, 3, 8, 8]`` and ``meta [N, 4]`` → ``{"scores": [N, 5], "embedding": [N, 6]}``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.side = nn.Linear(4, 4)
        self.scores = nn.Linear(8, 5)
        self.embedding = nn.Linear(8, 6)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.pool(torch.relu(self.bn(self.conv(image)))).flatten(1)
        h = torch.cat([x, torch.tanh(self.side(meta))], dim=1)
        return {"scores": self.scores(h), "embedding": self.embedding(h)}


def two_input_dict() -> nn.Module:
    """A seeded `TwoInputDict` with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    model = TwoInputDict()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def with_parity_fault(model: Path, out: Path) -> Path:
    """A copy of ``model`` whose largest float initializer has one element off by 5 % of its
    range: a file that loads and serves, but computes something else."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(model))
    last = max(
        (t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT),
        key=lambda t: len(t.dims),
    )
    array = numpy_helper.to_array(last).copy()
    array.flat[0] += 0.05 * (abs(array).max() + 1)
    last.CopyFrom(numpy_helper.from_array(array, last.name))
    onnx.save(proto, str(out))
    return out
