"""Never worse than torch: bnexport's ONNX (fold, then export with onnxscript's BatchNorm fusions as
a second stage) has no more BatchNormalization, Mul, Div, Add, Sub nodes than
`torch.onnx.export(model, args, dynamo=True)` with its default options, and no BatchNormalization
at all where every BatchNorm follows a layer. Both graphs are inspected with onnx; bnexport's runs
on onnxruntime against the unfolded model in float64.

What torch's default export does (measured with torch 2.13 / onnxscript 0.7): it fuses
Conv/ConvTranspose/Gemm → BatchNormalization, but leaves a constant ``* T`` or ``/ T`` after a
Conv or Linear (with or without a BN before it) as a Mul/Div node.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnexport import fold_model
from bnexport.export import export_onnx

COUNTED = ("BatchNormalization", "Mul", "Div", "Add", "Sub")


def _stats(bn: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(n, generator=gen) * 0.3)
        bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
        bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return bn


class ConvBnRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, bias=False), _stats(nn.BatchNorm2d(8), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class ConvBnTemperature(nn.Module):
    """The seed's pattern: T · BN(conv(x)), then + c."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), _stats(nn.BatchNorm2d(8), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(1.5 * self.bn(self.conv(x)) + 0.25)


class ConvDiv(nn.Module):
    """A conv divided by a constant: torch's export keeps the Div."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x) / 2.0)


class TemperatureHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), _stats(nn.BatchNorm2d(8), 3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3))) / 0.7


class ConvTransposeBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.bn = (
            nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2),
            _stats(nn.BatchNorm2d(6), 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.up(x)))


class FunctionalBn(nn.Module):
    """`F.batch_norm` after a conv, as timm's BatchNormAct2d computes it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), _stats(nn.BatchNorm2d(8), 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        y = F.batch_norm(self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False)
        return torch.relu(y)


class PreActivation(nn.Module):
    """BN → ReLU → conv (resnetv2): nothing can absorb that BN, in either pipeline."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.conv = _stats(nn.BatchNorm2d(3), 6), nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.bn(x)))


class TwoInputs(nn.Module):
    """A conv-BN branch and a Linear-BN1d branch, a dict out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), _stats(nn.BatchNorm2d(8), 7)
        self.fc, self.bn1d = nn.Linear(5, 6), _stats(nn.BatchNorm1d(6), 8)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
        a = torch.relu(self.bn(self.conv(image))).mean((2, 3))
        b = torch.relu(self.bn1d(self.fc(features)))
        return {"logits": torch.cat([a, b], 1), "embedding": a}


# (model, per-input shapes without the batch, every BN follows a layer)
CASES = {
    "conv-bn-relu": (ConvBnRelu, [(3, 8, 8)], True),
    "conv-bn-temperature": (ConvBnTemperature, [(3, 8, 8)], True),
    "conv-div": (ConvDiv, [(3, 8, 8)], True),
    "temperature-head": (TemperatureHead, [(3, 8, 8)], True),
    "convtranspose-bn": (ConvTransposeBn, [(4, 4, 4)], True),
    "functional-bn": (FunctionalBn, [(3, 8, 8)], True),
    "pre-activation": (PreActivation, [(3, 8, 8)], False),
    "two-inputs": (TwoInputs, [(3, 8, 8), (5,)], True),
}


def _inputs(shapes: list[tuple[int, ...]], batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, *s, generator=gen) for s in shapes)


def _counts(proto: onnx.ModelProto) -> dict[str, int]:
    ops = Counter(n.op_type for n in proto.graph.node)
    return {op: ops[op] for op in COUNTED}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bnexport_onnx_has_no_more_bn_or_arithmetic_than_torch_export(
    name: str, tmp_path: Path
) -> None:
    cls, shapes, every_bn_after_a_layer = CASES[name]
    torch.manual_seed(0)
    model = cls().eval()
    example = _inputs(shapes, 2, seed=0)
    torch_program = torch.onnx.export(model, example, dynamo=True)
    assert torch_program is not None
    theirs = _counts(torch_program.model_proto)

    folded = fold_model(model, example).module
    result = export_onnx(folded, example, tmp_path / "m.onnx", fuse_batchnorm=True)
    ours = _counts(onnx.load(result.path))
    assert all(ours[op] <= theirs[op] for op in COUNTED), f"bnexport {ours}, torch {theirs}"
    if every_bn_after_a_layer:
        assert ours["BatchNormalization"] == 0, ours

    xs = _inputs(shapes, 7, seed=1)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = session.run(
        None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), xs, strict=True)}
    )
    with torch.no_grad():
        want = model.double()(*(x.double() for x in xs))
    want = list(want.values()) if isinstance(want, dict) else [want]
    for g, w in zip(got, want, strict=True):
        w = w.numpy()
        assert float(np.abs(g - w).max()) <= 1e-5 * max(1.0, float(np.abs(w).max()))


def test_torch_export_keeps_a_constant_div_after_a_conv() -> None:
    """The measured fact the module docstring states (if torch starts fusing it, update it)."""
    model = ConvDiv().eval()
    program = torch.onnx.export(model, _inputs([(3, 8, 8)], 2, 0), dynamo=True)
    assert program is not None and _counts(program.model_proto)["Div"] == 1
