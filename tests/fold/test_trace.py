"""Tracing for the fold: submodule names that `torch.fx.GraphModule` reserves, and Python control
flow on shapes (answered from the example inputs, kept as a run-time guard)."""

from __future__ import annotations

import pytest
import torch
from fold_ref import close, has_batchnorm, randomize_bn
from torch import nn

from bnexport.fold import fold_model
from bnexport.fold.trace import reserved_names

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _conv_bn(cin: int = 3, cout: int = 4, stride: int = 1) -> nn.Sequential:
    bn = randomize_bn(nn.BatchNorm2d(cout), seed=cout + stride)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=1), bn, nn.ReLU())


class Named(nn.Module):
    """A conv → BN block stored under ``name`` at the top level."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.add_module(name, _conv_bn())
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._modules[self.name](x))


@pytest.mark.parametrize(
    "name", ["meta", "graph", "code", "_code", "recompile", "print_readable", "_tracer_cls"]
)
def test_a_submodule_named_like_a_graphmodule_attribute_folds(name: str) -> None:
    assert name in reserved_names()
    model = Named(name).eval()
    result = fold_model(model, X)
    report = result.report
    assert [(e.bn, e.status, e.into) for e in report.entries] == [
        (f"{name}.1", "folded", f"{name}.0")
    ]
    assert any(f"{name!r} is called {name + '_'!r} in the folded module" in n for n in report.notes)
    assert not has_batchnorm(result.module)
    close(result.module(X), model(X))


@pytest.mark.parametrize("name", ["meta", "graph"])
def test_the_folded_module_of_a_reserved_name_exports(name: str) -> None:
    model = Named(name).eval()
    program = torch.export.export(fold_model(model, X).module, (X,))
    close(program.module()(X), model(X))


def test_ordinary_names_are_not_renamed() -> None:
    result = fold_model(Named("submodule").eval(), X)
    assert result.report.entries[0].bn == "submodule.1"
    assert not any("is called" in n for n in result.report.notes)


class ShapeBranch(nn.Module):
    """``if x.shape[-1] > 4:`` in the top-level forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn()
        self.down = _conv_bn(4, 4, 2)
        self.head = _conv_bn(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.shape[-1] > 4:
            x = self.down(x)
        return self.head(x)


class ShapeLoop(nn.Module):
    """A loop bound from a shape, through ``range`` (an int from a proxy)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn()
        self.down = _conv_bn(4, 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for _ in range(x.size(-1) // 4):
            x = self.down(x)
        return x


@pytest.mark.parametrize(
    ("model", "needle"),
    [(ShapeBranch, "stem.2(…).shape[-1] > 4 was True"), (ShapeLoop, "size(-1) // 4 was 2")],
)
def test_shape_dependent_control_flow_is_traced_with_the_example_shapes(model, needle) -> None:
    m = model().eval()
    result = fold_model(m, X)
    assert result.report.left == [] and len(result.report.folded) >= 3
    note = next(n for n in result.report.notes if "branches on tensor shapes" in n)
    assert needle in note
    assert not has_batchnorm(result.module)
    x5 = torch.randn(5, 3, 8, 8)  # another batch size takes the same branches
    close(result.module(x5), m(x5))
    with pytest.raises(AssertionError, match="traced this model with inputs for which"):
        result.module(torch.randn(2, 3, 4, 4))  # another branch: refused, not miscomputed


class BufferFlag(nn.Module):
    """Control flow on a buffer (a constant of the model): no guard, no note."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _conv_bn()
        self.register_buffer("enabled", torch.tensor(True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y * 2 if self.enabled else y


def test_control_flow_on_a_buffer_is_answered_without_a_guard() -> None:
    m = BufferFlag().eval()
    result = fold_model(m, X)
    assert result.report.left == [] and result.report.notes == []
    close(result.module(X), m(X))


class DataBranch(nn.Module):
    """``if x.sum() > 0`` in the top-level forward: tensor data, not a shape."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _conv_bn()
        self.twice = _conv_bn(4, 4)
        self.last = randomize_bn(nn.BatchNorm2d(4), seed=9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x) if x.sum() > 0 else self.block(-x)
        return self.last(self.twice(self.twice(y)))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_control_flow_on_tensor_values_folds_the_children_on_their_own(sign: float) -> None:
    """Not specialized on the example's values: the top-level forward stays as written, and each
    child called once folds with the inputs it receives."""
    model = DataBranch().eval()
    x = X.abs() * sign  # either branch
    result = fold_model(model, x, localize=True)
    report = result.report
    assert report.localization is not None and report.localization["first_failing"] is None
    assert [s["bn"] for s in report.localization["steps"]] == ["block.1"]
    assert [(e.bn, e.status, e.reason_code) for e in report.entries] == [
        ("block.1", "folded", None),
        ("twice.1", "left", "not_traceable"),
        ("last", "left", "not_traceable"),
    ]
    assert "called 2 times by DataBranch.forward" in report.entry("twice.1").reason
    assert report.entry("block.1").into == "block.0"
    assert report.verification is not None and report.verification["passed"]
    assert any("each of its children was folded on its own" in n for n in report.notes)
    assert type(result.module) is DataBranch
    for x2 in (X.abs(), -X.abs()):  # both branches, whichever the example took
        close(result.module(x2), model(x2))
