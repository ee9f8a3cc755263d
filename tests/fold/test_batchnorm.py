"""What counts as a BatchNorm (bnexport.fold.batchnorm): functional calls, BatchNorm subclasses with
their own forward (timm's BatchNormAct2d), frozen BatchNorms, registered classes, leaves, and
constant chains after a layer without any BatchNorm. References are written with torch.nn.functional
on the original tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fold_ref import arith_nodes, close, f_layer, randomize_bn
from torch import nn

from bnexport.fold import BNParams, fold_model, register_batchnorm


def bn_ref(x, mean, var, eps, weight=None, bias=None):
    return F.batch_norm(x.double(), mean.double(), var.double(), weight, bias, False, 0.0, eps)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d, as in timm/layers/norm_act.py: BN via F.batch_norm, then drop, act."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            0.1,
            self.eps,
        )
        return self.act(self.drop(x))


class ConvBNAct(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn1 = randomize_bn(BatchNormAct2d(4), 2)

    def forward(self, x):
        return self.bn1(self.conv(x))


def test_batchnorm_subclass_with_its_own_forward_folds_and_keeps_its_activation() -> None:
    model = ConvBNAct().eval()
    x = torch.randn(2, 3, 6, 6)
    result = fold_model(model, x)
    (entry,) = result.report.entries
    assert (entry.bn, entry.bn_type, entry.status, entry.into) == (
        "bn1",
        "BatchNormAct2d",
        "folded",
        "conv",
    )
    calls = [n.target for n in result.module.graph.nodes if n.op == "call_module"]
    assert calls == ["conv", "bn1.act"]
    bn = model.bn1
    expected = torch.relu(
        bn_ref(
            f_layer(model.conv, x.double()),
            bn.running_mean,
            bn.running_var,
            bn.eps,
            bn.weight.double(),
            bn.bias.double(),
        )
    )
    close(result.module(x), expected)


class AtenBN(nn.Module):
    """torch.batch_norm (aten argument order) and F.batch_norm twice in one module."""

    def __init__(self, training: bool = False) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(2, 3, 1)
        self.conv_b = nn.Conv2d(3, 3, 1)
        g = torch.Generator().manual_seed(1)
        self.register_buffer("mean", torch.randn(3, generator=g))
        self.register_buffer("var", torch.rand(3, generator=g) + 0.5)
        self.gamma = nn.Parameter(torch.rand(3, generator=g) + 0.5)
        self.training_flag = training

    def forward(self, x):
        y = torch.batch_norm(
            self.conv_a(x),
            self.gamma,
            None,
            self.mean,
            self.var,
            self.training_flag,
            0.1,
            1e-3,
            False,
        )
        return F.batch_norm(self.conv_b(y), self.mean, self.var, eps=0.5)


def test_aten_and_functional_batch_norm_calls_fold_with_their_own_eps() -> None:
    model = AtenBN().eval()
    x = torch.randn(2, 2, 4, 4)
    result = fold_model(model, x)
    assert [(e.bn, e.status, e.into) for e in result.report.entries] == [
        ("AtenBN.forward (call 1 of 2)", "folded", "conv_a"),
        ("AtenBN.forward (call 2 of 2)", "folded", "conv_b"),
    ]
    y = bn_ref(f_layer(model.conv_a, x.double()), model.mean, model.var, 1e-3, model.gamma.double())
    expected = bn_ref(f_layer(model.conv_b, y), model.mean, model.var, 0.5)
    close(result.module(x), expected)


def test_functional_batch_norm_in_training_mode_is_left_with_the_reason() -> None:
    result = fold_model(AtenBN(training=True).eval(), torch.randn(2, 2, 4, 4), verify=False)
    first = result.report.entries[0]
    assert (first.status, first.reason_code) == ("left", "functional_training")
    assert "training=True" in first.reason


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d (plain buffers, its own eps)."""

    def __init__(self, n: int, eps: float = 1e-5, forget_eps: bool = False) -> None:
        super().__init__()
        self.eps, self.forget_eps = eps, forget_eps
        g = torch.Generator().manual_seed(n)
        self.register_buffer("weight", torch.rand(n, generator=g) + 0.5)
        self.register_buffer("bias", torch.randn(n, generator=g))
        self.register_buffer("running_mean", torch.randn(n, generator=g))
        self.register_buffer("running_var", torch.rand(n, generator=g) * 0.1 + 0.05)

    def forward(self, x):
        eps = 0.0 if self.forget_eps else self.eps
        scale = self.weight * (self.running_var + eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class ConvFrozen(nn.Module):
    def __init__(self, **kw) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3)
        self.bn = FrozenBatchNorm2d(5, **kw)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def test_frozen_batchnorm_folds_with_its_own_eps() -> None:
    model = ConvFrozen(eps=0.05).eval()
    x = torch.randn(2, 2, 5, 5)
    result = fold_model(model, x)
    (entry,) = result.report.entries
    assert (entry.bn, entry.bn_type, entry.status) == ("bn", "FrozenBatchNorm2d", "folded")
    b = model.bn
    expected = torch.relu(
        bn_ref(
            f_layer(model.conv, x.double()),
            b.running_mean,
            b.running_var,
            0.05,
            b.weight.double(),
            b.bias.double(),
        )
    )
    close(result.module(x), expected)
    assert arith_nodes(result.module) == []


def test_a_module_shaped_like_a_frozen_bn_that_computes_something_else_is_left() -> None:
    model = ConvFrozen(eps=0.05, forget_eps=True).eval()
    x = torch.randn(2, 2, 5, 5)
    result = fold_model(model, x)
    (entry,) = result.report.entries
    assert (entry.status, entry.reason_code) == ("left", "not_batchnorm")
    assert "its forward computes something else" in entry.reason
    close(result.module(x), model.double()(x.double()))


class MyNorm(nn.Module):
    """A user's BatchNorm with other attribute names."""

    def __init__(self, n: int, wrong: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.mu = nn.Parameter(torch.randn(n, generator=g), requires_grad=False)
        self.sigma2 = nn.Parameter(torch.rand(n, generator=g) + 0.2, requires_grad=False)
        self.gamma = nn.Parameter(torch.rand(n, generator=g) + 0.5)
        self.wrong = wrong

    def forward(self, x):
        x = (x - self.mu[:, None, None]) / torch.sqrt(self.sigma2[:, None, None] + 1e-3)
        return x * self.gamma[:, None, None]


class ConvMyNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.norm = MyNorm(3)

    def forward(self, x):
        return self.norm(self.conv(x))


@pytest.fixture
def my_norm_registered():
    from bnexport.fold import batchnorm

    register_batchnorm(MyNorm, lambda m: BNParams(m.mu, m.sigma2, 1e-3, m.gamma, None))
    yield
    del batchnorm._REGISTRY[MyNorm]


def test_a_registered_batchnorm_class_folds(my_norm_registered) -> None:
    model = ConvMyNorm().eval()
    x = torch.randn(2, 2, 4, 4)
    result = fold_model(model, x)
    (entry,) = result.report.entries
    assert (entry.bn, entry.bn_type, entry.status) == ("norm", "MyNorm", "folded")
    n = model.norm
    expected = bn_ref(f_layer(model.conv, x.double()), n.mu, n.sigma2, 1e-3, n.gamma.double())
    close(result.module(x), expected)


def test_a_registered_reader_that_misdescribes_the_module_is_caught() -> None:
    from bnexport.fold import batchnorm

    register_batchnorm(MyNorm, lambda m: BNParams(m.mu, m.sigma2, 1e-5, m.gamma, None))
    try:
        result = fold_model(ConvMyNorm().eval(), torch.randn(2, 2, 4, 4))
    finally:
        del batchnorm._REGISTRY[MyNorm]
    (entry,) = result.report.entries
    assert (entry.status, entry.reason_code) == ("left", "not_batchnorm")


def test_register_batchnorm_refuses_a_non_module() -> None:
    with pytest.raises(TypeError, match=r"nn\.Module subclass"):
        register_batchnorm(int, lambda m: None)  # type: ignore[arg-type]


def test_a_batchnorm_subclass_kept_as_a_leaf_is_reported_as_not_traced() -> None:
    model = ConvBNAct().eval()
    result = fold_model(model, torch.randn(2, 3, 6, 6), leaf_modules=(BatchNormAct2d,))
    (entry,) = result.report.entries
    assert (entry.bn, entry.status, entry.reason_code) == ("bn1", "left", "leaf_module")
    assert entry.reason.startswith("not traced: kept as a leaf")


class ScaledHead(nn.Module):
    """conv → ×per-channel buffer → +c, and a temperature-scaled head ``linear(x) / T``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, 5)
        self.register_buffer("gain", torch.tensor([0.5, -2.0, 3.0]).reshape(1, 3, 1, 1))
        self.temperature = 1.7

    def forward(self, x):
        y = self.conv(x) * self.gain + 0.25
        return self.fc(torch.relu(y).flatten(1)) / self.temperature


def test_constant_chains_after_layers_fold_without_any_batchnorm() -> None:
    model = ScaledHead().eval()
    x = torch.randn(2, 2, 6, 6)
    result = fold_model(model, x)
    assert result.report.entries == []
    assert [(c.layer, c.chain, c.status) for c in result.report.chains] == [
        ("conv", "×buffer gain[1, 3, 1, 1] → +0.25", "folded"),
        ("fc", "÷1.7", "folded"),
    ]
    assert arith_nodes(result.module) == []
    y = f_layer(model.conv, x.double()) * model.gain.double() + 0.25
    close(result.module(x), f_layer(model.fc, torch.relu(y).flatten(1)) / 1.7)


class PadSameConv(nn.Conv2d):
    """A Conv2d subclass with its own forward (timm's Conv2dSame pads at run time)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride)


class CustomConvBN(nn.Module):
    def __init__(self, conv: type[nn.Conv2d], bn_first: bool = False) -> None:
        super().__init__()
        self.conv = conv(2, 3, 3) if not bn_first else conv(3, 3, 3)
        self.bn = randomize_bn(nn.BatchNorm2d(3), 3)
        self.bn_first = bn_first

    def forward(self, x):
        return self.conv(self.bn(x)) if self.bn_first else self.bn(self.conv(x))


def test_a_bn_after_a_conv_subclass_whose_forward_is_linear_in_its_weight_folds() -> None:
    """timm's Conv2dSame pattern: its own forward pads at run time, then convolves with the stored
    weight and bias; probed linear, so the BN after it folds (the copy keeps the class)."""
    model = CustomConvBN(PadSameConv).eval()
    x = torch.randn(2, 2, 5, 5)
    result = fold_model(model, x)
    (entry,) = result.report.entries
    assert entry.status == "folded"
    assert type(result.module.get_submodule("conv")) is PadSameConv
    close(result.module(x), model.double()(x.double()))


def test_a_bn_before_a_conv_subclass_with_its_own_forward_is_left_naming_it() -> None:
    """Before the layer, the run-time padding would see the shift as 0: never folded."""
    model = CustomConvBN(PadSameConv, bn_first=True).eval()
    x = torch.randn(2, 3, 5, 5)
    result = fold_model(model, x)
    (entry,) = result.report.entries
    assert (entry.status, entry.reason_code) == ("left", "custom_layer")
    assert entry.reason.startswith("conv (PadSameConv) is a Conv2d subclass with its own forward")
    close(result.module(x), model.double()(x.double()))


class StandardizedConv(nn.Conv2d):
    """A weight-standardized conv: its output is not linear in the stored weight."""

    def forward(self, x):
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        w = w / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias)


class PlainLinear(nn.Linear):
    """A Linear subclass with its own forward that is still ``W x + b``."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def test_a_bn_after_a_conv_that_transforms_its_weight_is_left() -> None:
    model = CustomConvBN(StandardizedConv).eval()
    x = torch.randn(2, 2, 5, 5)
    result = fold_model(model, x)
    (entry,) = result.report.entries
    assert (entry.status, entry.reason_code) == ("left", "custom_layer")
    assert "StandardizedConv" in entry.reason
    close(result.module(x), model.double()(x.double()))


def test_a_bn_after_a_linear_subclass_whose_forward_is_linear_folds() -> None:
    model = nn.Sequential(PlainLinear(4, 3), randomize_bn(nn.BatchNorm1d(3), 5)).eval()
    x = torch.randn(6, 4)
    result = fold_model(model, x)
    assert [e.status for e in result.report.entries] == ["folded"]
    close(result.module(x), model.double()(x.double()))


class ScaledStdConv(nn.Conv2d):
    """timm's ScaledStdConv2d: weight standardization through F.batch_norm on the weight."""

    def forward(self, x):
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, eps=1e-6
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias)


def test_a_batch_norm_of_a_weight_is_not_reported_as_a_batchnorm() -> None:
    model = nn.Sequential(ScaledStdConv(2, 3, 3), nn.ReLU()).eval()
    result = fold_model(model, torch.randn(2, 2, 5, 5))
    assert result.report.entries == []


class GainStdConv(nn.Conv2d):
    """timm's ScaledStdConv2d with its ``gain``: standardized weight × gain (timm zero-inits the
    gain of each block's last conv, which makes any weight transform vanish)."""

    def __init__(self, *args, gain: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), gain))

    def forward(self, x):
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, eps=1e-6
        ).reshape_as(self.weight)
        return F.conv2d(x, w * self.gain, self.bias)


class MaskedConv(nn.Conv2d):
    """A conv whose weight is multiplied by a (zero-initialized) mask: linear in the weight."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", torch.zeros_like(self.weight))

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias)


class ConvScaled(nn.Module):
    """custom conv → ×0.2 (nf_resnet's residual scale) and custom conv → BN."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv, self.conv2 = conv, type(conv)(3, 3, 1)
        self.bn = randomize_bn(nn.BatchNorm2d(3), 7)

    def forward(self, x):
        return self.bn(self.conv2(self.conv(x) * 0.2))


@pytest.mark.parametrize("gain", [0.0, 1.3])
def test_the_linearity_probe_does_not_rest_on_a_zero_gain(gain: float) -> None:
    """Zero or not, the gain doesn't make the standardized conv linear in its weight: the chain
    and the BN after it are left with the reason, and the output stays exact."""
    model = ConvScaled(GainStdConv(2, 3, 3, gain=gain)).eval()
    with torch.no_grad():
        model.conv2.gain.fill_(gain)
    x = torch.randn(2, 2, 5, 5)
    result = fold_model(model, x)
    (entry,) = result.report.entries
    assert (entry.status, entry.reason_code) == ("left", "custom_layer")
    (chain,) = result.report.chains
    assert (chain.layer, chain.status, chain.chain) == ("conv", "left", "×0.2")
    assert "not linear in its stored weight and bias (probed with random parameters" in chain.reason
    close(result.module(x), model.double()(x.double()))


def test_a_conv_linear_in_its_weight_folds_whatever_its_other_parameters() -> None:
    """The probe randomizes the mask too, and the layer is linear for every mask: it folds."""
    model = ConvScaled(MaskedConv(2, 3, 3)).eval()
    x = torch.randn(2, 2, 5, 5)
    result = fold_model(model, x)
    assert [e.status for e in result.report.entries] == ["folded"]
    assert [(c.layer, c.status) for c in result.report.chains] == [("conv", "folded")]
    close(result.module(x), model.double()(x.double()))
