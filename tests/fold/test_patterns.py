"""One positive and one negative test per fold pattern (bnexport.fold.patterns).

Positive: the folded graph calls no BatchNorm and no chain op, and its output matches an independent
float64 reference. Negative: the BatchNorm stays, the report gives the reason code and a sentence a
user can act on, and the module is still exact.
"""

from __future__ import annotations

import pytest
import torch
from fold_ref import arith_nodes, close, f_bn, f_layer, has_batchnorm, randomize_bn
from torch import nn

from bnexport.fold import PATTERNS, fold_model


class LayerBN(nn.Module):
    """layer → [relu] → bn → ×t, optionally with the layer output also added to the result."""

    def __init__(self, layer: nn.Module, bn: nn.Module, t: float = 1.0, *, act=False, branch=False):
        super().__init__()
        self.layer, self.bn, self.t, self.act, self.branch = layer, bn, t, act, branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        z = self.bn(torch.relu(y) if self.act else y) * self.t
        return z + y if self.branch else z

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        y = f_layer(self.layer, x)
        z = f_bn(self.bn, torch.relu(y) if self.act else y) * self.t
        return z + y if self.branch else z


class BNLayer(nn.Module):
    """bn → ×t → layer, optionally with the scaled BN output also fed to a second layer."""

    def __init__(self, bn: nn.Module, layer: nn.Module, t: float = 1.0, second=None):
        super().__init__()
        self.bn, self.layer, self.t, self.second = bn, layer, t, second

    def forward(self, x: torch.Tensor):
        z = self.bn(x) * self.t
        out = self.layer(z)
        return out if self.second is None else (out, self.second(z))

    def reference(self, x: torch.Tensor):
        z = f_bn(self.bn, x) * self.t
        out = f_layer(self.layer, z)
        return out if self.second is None else (out, f_layer(self.second, z))


def _fold(model: nn.Module, shape: tuple[int, ...]):
    model.eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    result = fold_model(model, x)
    ref = model.reference(x.double())
    with torch.no_grad():
        got = result.module(x)
    outs = got if isinstance(got, tuple) else (got,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    for g, r in zip(outs, refs, strict=True):
        close(g, r)
    return result


def _input(layer: nn.Module, channels: int) -> tuple[int, ...]:
    if isinstance(layer, nn.Linear):
        return (3, channels)
    return (2, channels, *[7] * len(layer.kernel_size))


def test_every_pattern_has_a_test_here() -> None:
    names = {p.name for p in PATTERNS}
    assert names == {
        "ConvThenBN",
        "ConvTransposeThenBN",
        "LinearThenBN",
        "ConcatThenBN",
        "BNThenConv",
        "BNThenConvTranspose",
        "BNThenLinear",
    }


# --- ConvThenBN ---------------------------------------------------------------------------------

CONVS = [
    pytest.param(lambda: nn.Conv1d(4, 6, 3, stride=2, bias=False), id="conv1d-stride-nobias"),
    pytest.param(
        lambda: nn.Conv2d(4, 8, 3, padding=1, groups=4, padding_mode="reflect"),
        id="conv2d-reflect-g4",
    ),
    pytest.param(
        lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4), id="depthwise-dilated"
    ),
    pytest.param(
        lambda: nn.Conv3d(4, 6, (1, 3, 3), padding="same", groups=2, bias=False),
        id="conv3d-same-g2",
    ),
]
BN_FOR = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@pytest.mark.parametrize("make", CONVS)
@pytest.mark.parametrize("t", [1.5, -2.0])
def test_conv_then_bn_folds(make, t) -> None:
    conv = make()
    bn = randomize_bn(BN_FOR[len(conv.kernel_size)](conv.out_channels))
    result = _fold(LayerBN(conv, bn, t), _input(conv, conv.in_channels))
    assert not has_batchnorm(result.module)
    assert arith_nodes(result.module) == []
    (entry,) = result.report.folded
    assert (entry.into, entry.direction, entry.layer_type) == (
        "layer",
        "after",
        type(conv).__name__,
    )
    assert entry.chain.endswith(f"×{t:g}")
    assert result.module.layer.bias is not None


def test_conv_then_bn_left_when_conv_output_has_two_users() -> None:
    model = LayerBN(nn.Conv2d(3, 4, 3), randomize_bn(nn.BatchNorm2d(4)), branch=True)
    result = _fold(model, (2, 3, 6, 6))
    (entry,) = result.report.left
    assert entry.reason_code == "multi_user"
    assert "2 users" in entry.reason and "layer" in entry.reason
    assert has_batchnorm(result.module)


# --- ConvTransposeThenBN ------------------------------------------------------------------------

CONVTS = [
    pytest.param(lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2), id="convT1d-g2"),
    pytest.param(
        lambda: nn.ConvTranspose2d(6, 6, 3, stride=2, padding=1, output_padding=1, groups=6),
        id="convT2d-depthwise",
    ),
    pytest.param(lambda: nn.ConvTranspose3d(4, 2, 2, stride=2, bias=False), id="convT3d-nobias"),
]


@pytest.mark.parametrize("make", CONVTS)
def test_conv_transpose_then_bn_folds_per_group_axis_1(make) -> None:
    conv = make()
    bn = randomize_bn(BN_FOR[len(conv.kernel_size)](conv.out_channels))
    result = _fold(LayerBN(conv, bn, -0.75), _input(conv, conv.in_channels))
    assert not has_batchnorm(result.module) and arith_nodes(result.module) == []
    assert result.report.folded[0].layer_type == type(conv).__name__


def test_conv_transpose_then_relu_then_bn_is_left_nonlinearity() -> None:
    model = LayerBN(
        nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2), randomize_bn(nn.BatchNorm2d(4))
    )
    model.act = True
    result = _fold(model, (2, 4, 3, 3))
    (entry,) = result.report.left
    assert entry.reason_code == "nonlinearity"
    assert "relu" in entry.reason and "between layer and bn" in entry.reason


# --- LinearThenBN -------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_linear_then_bn1d_folds(bias: bool) -> None:
    lin = nn.Linear(5, 7, bias=bias)
    result = _fold(LayerBN(lin, randomize_bn(nn.BatchNorm1d(7)), 0.5), (4, 5))
    assert not has_batchnorm(result.module) and arith_nodes(result.module) == []
    assert result.module.layer.bias.shape == (7,)


def test_linear_on_rank3_then_bn1d_is_left_layout() -> None:
    """BatchNorm1d on [N, C, L] normalizes dim 1, but Linear's features are the last dim."""
    model = LayerBN(nn.Linear(6, 5), randomize_bn(nn.BatchNorm1d(4)))
    result = _fold(model, (2, 4, 6))
    (entry,) = result.report.left
    assert entry.reason_code == "layout"
    assert "dim 1" in entry.reason


# --- BNThenConv ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "shift"),
    [
        pytest.param(lambda: nn.Conv2d(4, 6, 3, groups=2), True, id="pad0-g2"),
        pytest.param(lambda: nn.Conv1d(4, 8, 3, groups=4, stride=2), True, id="pad0-depthwise1d"),
        pytest.param(
            lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="replicate"), True, id="replicate"
        ),
        pytest.param(lambda: nn.Conv3d(4, 2, 3, padding=1, bias=False), False, id="zero-shift"),
    ],
)
def test_bn_then_conv_folds_where_exact(make, shift: bool) -> None:
    conv = make()
    bn = randomize_bn(BN_FOR[len(conv.kernel_size)](conv.in_channels), shift=shift)
    result = _fold(BNLayer(bn, conv, 1.5), _input(conv, conv.in_channels))
    assert not has_batchnorm(result.module) and arith_nodes(result.module) == []
    (entry,) = result.report.folded
    assert (entry.direction, entry.into) == ("before", "layer")


def test_bn_then_zero_padded_conv_with_shift_is_left() -> None:
    model = BNLayer(randomize_bn(nn.BatchNorm2d(3)), nn.Conv2d(3, 4, 3, padding=1), 2.0)
    result = _fold(model, (2, 3, 6, 6))
    (entry,) = result.report.left
    assert entry.reason_code == "not_exact_padding"
    assert "padding=(1, 1)" in entry.reason and "shift" in entry.reason
    assert entry.chain == "BatchNorm2d → ×2"


# --- BNThenConvTranspose ------------------------------------------------------------------------


def test_bn_then_conv_transpose_folds_with_zero_shift() -> None:
    conv = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
    result = _fold(BNLayer(randomize_bn(nn.BatchNorm2d(4), shift=False), conv, -1.0), (2, 4, 5, 5))
    assert not has_batchnorm(result.module) and arith_nodes(result.module) == []
    assert result.report.folded[0].direction == "before"


def test_bn_then_conv_transpose_with_shift_is_left() -> None:
    model = BNLayer(randomize_bn(nn.BatchNorm2d(4)), nn.ConvTranspose2d(4, 2, 3, stride=2))
    result = _fold(model, (2, 4, 5, 5))
    (entry,) = result.report.left
    assert entry.reason_code == "not_exact_transpose"
    assert "shift" in entry.reason


# --- BNThenLinear -------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_bn_then_linear_folds(bias: bool) -> None:
    model = BNLayer(randomize_bn(nn.BatchNorm1d(5)), nn.Linear(5, 3, bias=bias), -1.5)
    result = _fold(model, (4, 5))
    assert not has_batchnorm(result.module) and arith_nodes(result.module) == []
    assert result.report.folded[0].direction == "before"


def test_bn_feeding_two_linears_is_left() -> None:
    model = BNLayer(randomize_bn(nn.BatchNorm1d(5)), nn.Linear(5, 3), 1.0, second=nn.Linear(5, 2))
    result = _fold(model, (4, 5))
    (entry,) = result.report.left
    assert entry.reason_code == "multi_user"
    assert "2 users" in entry.reason


# --- ConcatThenBN -------------------------------------------------------------------------------


class MixedKernels(nn.Module):
    """split → one conv per slice (3×3, 5×5 depthwise, a ConvTranspose…) → cat → BN → ÷t."""

    def __init__(self, t: float = 1.0, shared_part: bool = False) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(2, 3, 3, padding=1, bias=False),
                nn.Conv2d(2, 2, 5, padding=2, groups=2),
                nn.ConvTranspose2d(2, 4, 3, padding=1, groups=2),
            ]
        )
        self.bn = randomize_bn(nn.BatchNorm2d(9), 4)
        self.t, self.shared_part = t, shared_part

    def forward(self, x: torch.Tensor):
        xs = torch.split(x, 2, 1)  # indexed, as timm's MixedConv2d does (a Proxy can't be iterated)
        parts = [c(xs[i]) for i, c in enumerate(self.convs)]
        z = self.bn(torch.cat(parts, 1)) / self.t
        return (z, parts[0]) if self.shared_part else z

    def reference(self, x: torch.Tensor):
        parts = [f_layer(c, xs) for c, xs in zip(self.convs, torch.split(x, 2, 1), strict=True)]
        z = f_bn(self.bn, torch.cat(parts, 1)) / self.t
        return (z, parts[0]) if self.shared_part else z


@pytest.mark.parametrize("t", [0.7, -2.0])
def test_concat_then_bn_folds_each_slice_into_its_layer(t) -> None:
    result = _fold(MixedKernels(t), (2, 6, 7, 7))
    assert not has_batchnorm(result.module)
    assert arith_nodes(result.module) == []
    (entry,) = result.report.folded
    assert entry.into == "convs.0, convs.1, convs.2"
    assert entry.layer_type == "torch.cat of 3 layers"
    assert entry.chain == f"BatchNorm2d → ÷{t:g}"


def test_concat_then_bn_left_when_a_part_has_another_user() -> None:
    result = _fold(MixedKernels(shared_part=True), (2, 6, 7, 7))
    (entry,) = result.report.left
    assert entry.reason_code == "multi_user"
    assert "part 0 of the concat (channels 0…2 of bn)" in entry.reason
    assert has_batchnorm(result.module)
