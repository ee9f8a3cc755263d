"""Folding across reshapes that keep the channel axis (timm LeViT's ``LinearNorm``), and refusing
the ones that mix channels with other dims. References: float64 forwards with F.* on the original
modules' raw tensors (`fold_ref`)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from fold_ref import F64, close, f_bn, f_layer, has_batchnorm, module_calls, randomize_bn
from torch import nn

from bnexport.fold import REASONS, fold_model

Reshape = Callable[[torch.Tensor], torch.Tensor]


class LayerReshapeBN(nn.Module):
    """``layer → into → BN → back``: the BN sees the layer's output through reshapes."""

    def __init__(self, layer: nn.Module, bn: nn.Module, into: Reshape, back: Reshape) -> None:
        super().__init__()
        self.layer, self.bn, self.into, self.back = layer, bn, into, back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        return self.back(self.bn(self.into(y)), y)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        y = f_layer(self.layer, x.to(F64))
        return self.back(f_bn(self.bn, self.into(y)), y)


def _levit(y: torch.Tensor) -> torch.Tensor:
    return y.flatten(0, 1)


def _channels_last(y: torch.Tensor) -> torch.Tensor:
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def _channels_first(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    n, c, h, w = y.shape
    return z.reshape(n, h, w, c).permute(0, 3, 1, 2)


AFTER = {
    # timm LeViT's LinearNorm: bn(linear(x).flatten(0, 1)).reshape_as(x)
    "linear-flatten-reshape_as": (
        nn.Linear(6, 5),
        nn.BatchNorm1d(5),
        (2, 7, 6),
        _levit,
        lambda z, y: z.reshape_as(y),
    ),
    "conv-channels-last-bn1d": (
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm1d(4),
        (2, 3, 6, 6),
        _channels_last,
        _channels_first,
    ),
    "conv-flatten2-bn1d": (
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm1d(4),
        (2, 3, 5, 5),
        lambda y: y.flatten(2),
        lambda z, y: z.view_as(y),
    ),
    "linear-transpose-bn1d": (
        nn.Linear(6, 4),
        nn.BatchNorm1d(4),
        (2, 7, 6),
        lambda y: y.transpose(1, 2),
        lambda z, y: z.transpose(1, 2),
    ),
}


@pytest.mark.parametrize("case", list(AFTER))
def test_a_bn_behind_reshapes_that_keep_the_channel_axis_folds_into_the_layer(case: str) -> None:
    layer, bn, shape, into, back = AFTER[case]
    model = LayerReshapeBN(layer, randomize_bn(bn, seed=len(case)), into, back).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    result = fold_model(model, x)
    (entry,) = result.report.entries
    assert (entry.status, entry.into, entry.direction) == ("folded", "layer", "after")
    assert not has_batchnorm(result.module)
    assert module_calls(result.module) == [type(layer)]
    close(result.module(x), model.reference(x))


def test_reshapes_that_mix_channels_with_tokens_are_left_layout() -> None:
    """[N, 4, 4] tokens × features, transposed and flattened: dim 1 is the token, not the
    feature, though both have 4 entries."""
    model = LayerReshapeBN(
        nn.Linear(6, 4),
        randomize_bn(nn.BatchNorm1d(4)),
        lambda y: y.transpose(1, 2).reshape(-1, 4),
        lambda z, y: z.reshape(y.shape[0], 4, 4).transpose(1, 2),
    ).eval()
    x = torch.randn(2, 4, 6)
    result = fold_model(model, x)
    (entry,) = result.report.left
    assert entry.reason_code == "layout"
    assert "after transpose → reshape" in entry.reason and "last dim" in entry.reason
    close(result.module(x), model.reference(x))


def test_a_flatten_that_merges_channels_and_pixels_is_left_layout() -> None:
    model = LayerReshapeBN(
        nn.Conv2d(3, 2, 1),
        randomize_bn(nn.BatchNorm1d(2 * 3 * 3)),
        lambda y: y.flatten(1),
        lambda z, y: z.view_as(y),
    ).eval()
    x = torch.randn(2, 3, 3, 3)
    (entry,) = fold_model(model, x).report.left
    assert entry.reason_code == "layout" and "dim 1" in entry.reason


def test_a_reshaped_value_with_another_reader_is_left_multi_user() -> None:
    class TwoReaders(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(6, 5), randomize_bn(nn.BatchNorm1d(5))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            flat = self.fc(x).flatten(0, 1)
            return self.bn(flat), flat * 2

    model = TwoReaders().eval()
    x = torch.randn(2, 3, 6)
    result = fold_model(model, x)
    (entry,) = result.report.left
    assert entry.reason_code == "multi_user" and "flatten" in entry.reason
    for got, want in zip(result.module(x), model(x), strict=True):
        close(got, want.double())


class BNReshapeLinear(nn.Module):
    """BatchNorm1d over ``[N·T, C]`` tokens, reshaped back to ``[N, T, C]``, then a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.fc = randomize_bn(nn.BatchNorm1d(6), seed=3), nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x.flatten(0, 1)).reshape(x.shape[0], -1, 6))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        z = f_bn(self.bn, x.to(F64).flatten(0, 1)).reshape(x.shape[0], -1, 6)
        return f_layer(self.fc, z)


def test_a_bn_before_reshapes_folds_into_the_next_linear() -> None:
    model = BNReshapeLinear().eval()
    x = torch.randn(2, 5, 6)
    result = fold_model(model, x)
    (entry,) = result.report.entries
    assert (entry.status, entry.into, entry.direction) == ("folded", "fc", "before")
    close(result.module(x), model.reference(x))


def test_no_adjacent_layer_reads_true_when_its_detail_names_the_layer() -> None:
    """An op that is no reshape/affine between the layer and the BN: the code's text allows a
    layer separated from the BN, which the detail names."""

    class Between(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(6, 5), randomize_bn(nn.BatchNorm1d(5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.fc(x).cumsum(1))

    (entry,) = fold_model(Between().eval(), torch.randn(3, 6)).report.left
    assert entry.reason_code == "no_adjacent_layer"
    assert "cumsum" in entry.reason and "sits between fc and bn" in entry.reason
    assert "separated from it by an op" in REASONS["no_adjacent_layer"]
