"""A normalization written out by hand, ``(x − mean)·rsqrt(var + eps)·γ + β`` with parameters and
buffers of a module bnexport doesn't know: it folds exactly into the layer before it as a constant
scale/shift chain (computed in float64 from the buffers), or is left with a reason that holds."""

from __future__ import annotations

import pytest
import torch
from fold_ref import F64, close, f_layer
from torch import nn

from bnexport.fold import fold_model

C = 6


class HandNorm(nn.Module):
    """Statistics as buffers, γ/β as parameters, spelled three ways."""

    def __init__(self, style: str) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        shape = (C, 1, 1) if style == "broadcast" else (C,)
        self.style = style
        self.register_buffer("mean", torch.randn(shape, generator=g))
        self.register_buffer("var", torch.rand(shape, generator=g) * 1e-3 + 1e-4)  # eps matters
        self.gamma = nn.Parameter(torch.rand(shape, generator=g) + 0.5)
        self.beta = nn.Parameter(torch.randn(shape, generator=g))
        self.eps = 1e-5

    def stats(self) -> tuple[torch.Tensor, ...]:
        ts = (self.mean, self.var, self.gamma, self.beta)
        if self.style == "index":
            return tuple(t[None, :, None, None] for t in ts)
        if self.style == "view":
            return tuple(t.view(1, -1, 1, 1) for t in ts)
        return ts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var, gamma, beta = self.stats()
        return (x - mean) * torch.rsqrt(var + self.eps) * gamma + beta


class ConvHandNorm(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.norm, self.head = nn.Conv2d(3, C, 3), norm, nn.Conv2d(C, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.conv(x))))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm
        stats = (n.mean, n.var, n.gamma, n.beta)
        mean, var, gamma, beta = (t.detach().to(F64).reshape(1, -1, 1, 1) for t in stats)
        y = (f_layer(self.conv, x.to(F64)) - mean) / torch.sqrt(var + n.eps) * gamma + beta
        return f_layer(self.head, torch.relu(y))


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("style", ["broadcast", "index", "view"])
def test_a_hand_written_norm_folds_exactly_into_the_layer_before_it(style: str) -> None:
    model = ConvHandNorm(HandNorm(style)).eval()
    result = fold_model(model, X)
    (chain,) = result.report.chains
    assert (chain.layer, chain.status) == ("conv", "folded")
    assert "rsqrt" in chain.chain and "norm.var" in chain.chain  # computed from the buffer
    assert result.report.verification is not None and result.report.verification["passed"]
    arith = [n for n in result.module.graph.nodes if n.op in ("call_function", "call_method")]
    assert [str(n.target) for n in arith if "relu" not in str(n.target)] == []
    close(result.module(X), model.reference(X))


class InPlaceGain(nn.Module):
    """``(x − mean)·g`` with ``g`` a copy of γ changed in place before use: its value at fold
    time is not the one the forward uses."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.randn(C, 1, 1))
        self.gamma = nn.Parameter(torch.rand(C, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gamma.clone()
        g.mul_(2.0)
        return (x - self.mean) * g


def test_an_operand_changed_in_place_is_left_with_a_reason_that_holds() -> None:
    model = ConvHandNorm(InPlaceGain()).eval()
    result = fold_model(model, X)
    (chain,) = result.report.chains
    assert (chain.status, chain.chain) == ("folded", "−buffer norm.mean[6, 1, 1]")
    assert chain.chain_stop is not None
    assert "can't evaluate it at fold time" in chain.chain_stop
    assert "depends on the model's input" not in chain.chain_stop
    close(result.module(X), model.double()(X.double()))
