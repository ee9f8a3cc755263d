"""fold_model end to end: the seed's Net, shared modules, chains, refusals, numerics, errors,
report."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from fold_ref import (
    F64,
    arith_nodes,
    close,
    f_bn,
    f_layer,
    has_batchnorm,
    module_calls,
    randomize_bn,
)
from torch import nn

from bnexport.errors import FoldError
from bnexport.fold import FoldResult, fold_model
from bnexport.nets import Net, TemperatureBatchNorm2d


def _net(temperature: float, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net(temperature=temperature)
    randomize_bn(net.bn1.bn, seed)
    return net.eval()


def _net_reference(
    sd: dict[str, torch.Tensor], temperature: float, x: torch.Tensor
) -> torch.Tensor:
    """The seed's Net in float64 from its raw state_dict (keys bn1.bn.*), written with F.*."""
    d = {k: v.to(F64) for k, v in sd.items()}
    y = F.conv2d(x.to(F64), d["conv1.weight"], None, padding=1)
    y = F.batch_norm(y, d["bn1.bn.running_mean"], d["bn1.bn.running_var"], d["bn1.bn.weight"],
                     d["bn1.bn.bias"], False, 0.0, 1e-5)  # fmt: skip
    y = torch.relu(temperature * y)
    return F.linear(y.flatten(1), d["fc1.weight"])


@pytest.mark.parametrize("temperature", [1.5, -0.5])
def test_seed_net_folds_to_conv_relu_fc(temperature: float) -> None:
    net = _net(temperature)
    x = torch.randn(4, 1, 28, 28)
    result = fold_model(net, x)
    assert isinstance(result, FoldResult)
    gm = result.module
    assert module_calls(gm) == [nn.Conv2d, nn.ReLU, nn.Linear]
    assert arith_nodes(gm) == []
    assert gm.conv1.bias is not None and gm.conv1.bias.dtype == torch.float32
    assert not gm.training
    close(gm(x), _net_reference(net.state_dict(), temperature, x))
    (entry,) = result.report.entries
    assert (entry.bn, entry.bn_type, entry.into, entry.temperature) == (
        "bn1",
        "TemperatureBatchNorm2d",
        "conv1",
        temperature,
    )
    assert entry.chain == f"BatchNorm2d → ×{temperature:g} (temperature)"
    assert "bn1.bn.running_mean" not in gm.state_dict()


class SeedMyBN(nn.Module):
    """The blog post's ``myBN`` as written (not bnexport's class): traced through, ``T * bn(x)``."""

    def __init__(self, num_features, temperature=1.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.temperature = temperature

    def forward(self, x):
        out = self.bn(x)
        out = self.temperature * out
        return out


def test_seed_mybn_class_folds_its_temperature_too() -> None:
    net = _net(1.5)
    seed_net = copy.deepcopy(net)
    seed_net.bn1 = SeedMyBN(32, temperature=1.5)
    seed_net.bn1.bn.load_state_dict(net.bn1.bn.state_dict())
    x = torch.randn(2, 1, 28, 28)
    result = fold_model(seed_net.eval(), x)
    assert module_calls(result.module) == [nn.Conv2d, nn.ReLU, nn.Linear]
    assert result.report.entries[0].chain == "BatchNorm2d → ×1.5"
    close(result.module(x), _net_reference(seed_net.state_dict(), 1.5, x))


def test_folded_net_exports_to_onnx_without_mul_or_batchnorm() -> None:
    pytest.importorskip("onnxscript")
    import warnings

    net = _net(1.5)
    gm = fold_model(net, torch.randn(2, 1, 28, 28)).module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(gm, (torch.randn(2, 1, 28, 28),), dynamo=True, verbose=False)
    ops = {n.op_type for n in program.model_proto.graph.node}
    assert ops <= {"Conv", "Relu", "Reshape", "Flatten", "Gemm", "MatMul"}, ops
    assert {"Conv", "Relu"} <= ops


# --- shared modules (pytorch#104593) ------------------------------------------------------------


class SharedConv(nn.Module):
    """One conv module called twice; only the first call feeds a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = randomize_bn(nn.BatchNorm2d(3))

    def forward(self, x):
        return self.bn(self.conv(x)) * 2.0, self.conv(x)


def test_shared_conv_is_not_rewritten_and_both_calls_stay_correct() -> None:
    model = SharedConv().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 5, 5)
    result = fold_model(model, x)
    a, b = result.module(x)
    x64 = x.to(F64)
    close(a, f_bn(model.bn, f_layer(model.conv, x64)) * 2.0)
    close(b, f_layer(model.conv, x64))  # torch.fx `fuse` gets this call wrong (pytorch#104593)
    entry = result.report.entries[0]
    assert entry.status == "folded" and entry.into == "conv" and entry.new_module == "conv_folded"
    assert any("shared" in n for n in entry.notes)
    # The input model is untouched: same tensors, same modules, same output.
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert isinstance(model.bn, nn.BatchNorm2d)
    assert not has_batchnorm(result.module)


class ConvTwiceTwoBNs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn_a = randomize_bn(nn.BatchNorm2d(3), 1)
        self.bn_b = randomize_bn(nn.BatchNorm2d(3), 2)

    def forward(self, x):
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x))

    def reference(self, x):
        return f_bn(self.bn_a, f_layer(self.conv, x)) + f_bn(self.bn_b, f_layer(self.conv, x))


def test_conv_called_twice_with_a_bn_each_folds_both_calls_separately() -> None:
    model = ConvTwiceTwoBNs().eval()
    x = torch.randn(2, 3, 4, 4)
    result = fold_model(model, x)
    assert len(result.report.folded) == 2
    assert not has_batchnorm(result.module)
    close(result.module(x), model.reference(x.to(F64)))


class TiedLinear(nn.Module):
    """fc → BN1d, and fc's weight is also read directly (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = randomize_bn(nn.BatchNorm1d(4))

    def forward(self, x):
        return self.bn(self.fc(x)) + x @ self.fc.weight


def test_layer_whose_weight_is_read_elsewhere_gets_a_new_module() -> None:
    model = TiedLinear().eval()
    x = torch.randn(3, 4)
    result = fold_model(model, x)
    assert result.report.folded[0].new_module == "fc_folded"
    x64 = x.to(F64)
    ref = f_bn(model.bn, f_layer(model.fc, x64)) + x64 @ model.fc.weight.to(F64)
    close(result.module(x), ref)


# --- chains -------------------------------------------------------------------------------------


class Chain(nn.Module):
    """conv → bn → one chain spelling (``step``) with buffers/parameters available to it."""

    def __init__(self, step) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = randomize_bn(nn.BatchNorm2d(3))
        self.register_buffer("k", torch.tensor([0.5, -2.0, 3.0]).reshape(1, 3, 1, 1))
        self.register_buffer("v", torch.tensor([1.0, 2.0, -1.0]))
        self.t = nn.Parameter(torch.tensor(1.75))
        self.step = step

    def forward(self, x):
        return self.step(self, self.bn(self.conv(x)))

    def reference(self, x):
        return self.step(self, f_bn(self.bn, f_layer(self.conv, x)))


STEPS = {
    "mul-number": lambda m, y: y * 1.5,
    "number-mul": lambda m, y: 1.5 * y,
    "div-number": lambda m, y: y / 4,
    "add-sub": lambda m, y: (y + 2) - 0.5,
    "rsub": lambda m, y: 1.0 - y,
    "neg": lambda m, y: -y,
    "mul-buffer": lambda m, y: y * m.k,
    "buffer-mul-rank1": lambda m, y: m.v.reshape(3, 1, 1) * y,
    "div-param": lambda m, y: y / m.t,
    "torch-funcs": lambda m, y: torch.sub(torch.add(torch.mul(y, m.k), m.k), 3.0),
    "torch-div-param": lambda m, y: torch.div(y, m.t),
    "methods": lambda m, y: y.mul(2).div(m.k).add(1.0).sub(m.k),
    "alpha": lambda m, y: torch.add(y, m.k, alpha=-2.0).sub(m.k, alpha=0.5),
    "const-first-add-alpha": lambda m, y: torch.add(m.k, y, alpha=3.0),
    "const-first-sub": lambda m, y: torch.sub(m.k, y),
    "inplace": lambda m, y: y.mul_(m.t).add_(m.k),
    "derived-const": lambda m, y: y * m.t.exp(),
}


@pytest.mark.parametrize("name", list(STEPS))
def test_chain_spellings_fold_completely(name: str) -> None:
    model = Chain(STEPS[name]).eval()
    x = torch.randn(2, 2, 5, 5)
    result = fold_model(model, x)
    assert not has_batchnorm(result.module)
    assert arith_nodes(result.module) == [], result.module.code
    with torch.no_grad():
        close(result.module(x), model.reference(x.to(F64)))
    assert "k" not in result.module.state_dict() and "t" not in result.module.state_dict()


def test_learnable_temperature_is_folded_and_reported() -> None:
    model = Chain(lambda m, y: y * m.t).eval()
    result = fold_model(model, torch.randn(2, 2, 5, 5))
    entry = result.report.folded[0]
    assert entry.chain == "BatchNorm2d → ×param t=1.75"
    assert any("learnable parameter t" in n for n in entry.notes)


@pytest.mark.parametrize(
    ("name", "step", "needle"),
    [
        ("input-scale", lambda m, y, x: y * x[:, :1, 1:-1, 1:-1], "not constant"),
        ("rdiv", lambda m, y, x: 2.0 / (y + 10.0), "not affine"),
        ("spatial-buffer", lambda m, y, x: y * torch.ones(1, 1, 3, 3), "not a scalar or a per-"),
        ("rounding", lambda m, y, x: torch.div(y, 2.0, rounding_mode="floor"), "rounding_mode"),
    ],
)  # fmt: skip
def test_chain_stops_at_non_affine_steps_and_says_why(name, step, needle) -> None:
    class Stop(Chain):
        def forward(self, x):
            return step(self, self.bn(self.conv(x)), x)

        def reference(self, x):
            return step(self, f_bn(self.bn, f_layer(self.conv, x)), x)

    model = Stop(None).eval()
    x = torch.randn(2, 2, 5, 5)
    result = fold_model(model, x)
    (entry,) = result.report.folded  # the BN itself still folds
    assert needle in entry.chain_stop
    assert needle in str(result.report)
    assert arith_nodes(result.module), "the non-foldable step must stay in the graph"
    close(result.module(x), model.reference(x.to(F64)))


def _inplace_then_add(m, y):
    y.mul_(2.0)
    y += 1.0  # traced as a new `add` reading the BN node, which mul_ has already overwritten
    return y


def _inplace_twice(m, y):
    y.mul_(m.t)
    y.sub_(m.k)
    return y


@pytest.mark.parametrize(
    ("step", "chain"),
    [
        (_inplace_then_add, "BatchNorm2d → ×2 → +1"),
        (_inplace_twice, "BatchNorm2d → ×param t=1.75 → −buffer k[1, 3, 1, 1]"),
    ],
    ids=["mul_-then-add", "mul_-then-sub_"],
)
def test_in_place_chain_on_the_bn_output_folds_completely(step, chain: str) -> None:
    model = Chain(step).eval()
    x = torch.randn(2, 2, 5, 5)
    result = fold_model(model, x)
    (entry,) = result.report.folded
    assert entry.chain == chain
    assert entry.chain_stop is None and "chain stops" not in str(result.report)
    assert not has_batchnorm(result.module)
    assert arith_nodes(result.module) == [], result.module.code
    close(result.module(x), model.reference(x.to(F64)))


def _read_then_inplace(m, y):
    r = torch.relu(y)  # reads the BN output before mul_ overwrites it
    y.mul_(2.0)
    return y + r


def test_in_place_step_after_another_reader_stays_and_says_why() -> None:
    model = Chain(_read_then_inplace).eval()
    x = torch.randn(2, 2, 5, 5)
    result = fold_model(model, x)
    (entry,) = result.report.folded  # the BN itself still folds into the conv
    assert entry.chain == "BatchNorm2d"
    assert "mul_ (mul) writes in place into the BatchNorm's output" in entry.chain_stop
    assert "relu already read" in entry.chain_stop
    assert f"chain stops: {entry.chain_stop}" in str(result.report)
    assert "mul_" in arith_nodes(result.module)
    close(result.module(x), model.reference(x.to(F64)))


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize(
    ("step", "chain", "needles"),
    [
        (
            lambda m, y: y * 2.0 + y,
            "BatchNorm2d",
            ["mul (mul): the BatchNorm's output (bn) has 2 users (mul, add)"],
        ),
        (
            lambda m, y: (lambda z: (z + 1.0, z))(y * 2.0),
            "BatchNorm2d → ×2",
            ["add (add): the chain's output (mul) has 2 users (add, output)"],
        ),
    ],
    ids=["bn-output", "chain-output"],
)
def test_scale_after_a_multi_user_value_stays_and_says_why(step, chain, needles) -> None:
    model = Chain(step).eval()
    x = torch.randn(2, 2, 5, 5)
    result = fold_model(model, x)
    (entry,) = result.report.folded
    assert entry.chain == chain
    for needle in needles:
        assert needle in entry.chain_stop
    assert f"chain stops: {entry.chain_stop}" in str(result.report)
    assert arith_nodes(result.module), "the step the other users can't share must stay"
    got, ref = result.module(x), model.reference(x.to(F64))
    for g, r in zip(_outputs(got), _outputs(ref), strict=True):
        close(g, r)


def test_multi_user_bn_output_without_arithmetic_has_no_chain_stop() -> None:
    model = Chain(lambda m, y: (torch.relu(y), torch.sigmoid(y))).eval()
    x = torch.randn(2, 2, 5, 5)
    result = fold_model(model, x)
    (entry,) = result.report.folded
    assert entry.chain == "BatchNorm2d" and entry.chain_stop is None
    assert "chain stops" not in str(result.report)
    got, ref = result.module(x), model.reference(x.to(F64))
    for g, r in zip(_outputs(got), _outputs(ref), strict=True):
        close(g, r)


# --- refusals and graph shapes ------------------------------------------------------------------


class Untracked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_untracked_stats_bn_is_left_with_reason() -> None:
    model = Untracked().eval()
    x = torch.randn(2, 3, 6, 6)
    result = fold_model(model, x)
    (entry,) = result.report.left
    assert entry.reason_code == "untracked_stats"
    assert "track_running_stats=False" in entry.reason and "bn" in entry.reason
    assert has_batchnorm(result.module)
    assert torch.allclose(result.module(x), model(x))
    with pytest.raises(FoldError, match=r"1 BatchNorm.*track_running_stats=False"):
        fold_model(model, x, strict=True)


class Lonely(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.bn = randomize_bn(nn.BatchNorm2d(3))

    def forward(self, x):
        return torch.sigmoid(self.bn(self.pool(x)))


def test_bn_not_next_to_a_layer_is_left_no_adjacent_layer() -> None:
    result = fold_model(Lonely().eval(), torch.randn(2, 3, 4, 4))
    (entry,) = result.report.left
    assert entry.reason_code == "no_adjacent_layer"
    assert "pool (MaxPool2d)" in entry.reason and "sigmoid" in entry.reason


class Mixed(nn.Module):
    """bn_in → conv_a (pad 0) → bn_a → dropout → conv_b → bn_b → bn_c; SyncBatchNorm in eval."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_in = randomize_bn(nn.BatchNorm2d(2), 1)
        self.conv_a = nn.Conv2d(2, 4, 3)
        self.bn_a = randomize_bn(nn.SyncBatchNorm(4), 2)
        self.drop = nn.Dropout(0.5)
        self.conv_b = nn.Conv2d(4, 4, 1, bias=False)
        self.bn_b = randomize_bn(nn.BatchNorm2d(4), 3)
        self.bn_c = randomize_bn(nn.BatchNorm2d(4), 4)

    def forward(self, x):
        y = self.drop(self.bn_a(self.conv_a(self.bn_in(x))))
        return self.bn_c(self.bn_b(self.conv_b(y)))

    def reference(self, x):
        y = f_bn(self.bn_a, f_layer(self.conv_a, f_bn(self.bn_in, x)))
        return f_bn(self.bn_c, f_bn(self.bn_b, f_layer(self.conv_b, y)))


def test_train_mode_model_folds_with_eval_semantics_and_is_not_modified() -> None:
    model = Mixed()  # train mode
    snapshot = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 2, 6, 6)
    result = fold_model(model, x)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())
    assert not result.module.training
    assert [e.status for e in result.report.entries] == ["folded"] * 4
    assert [e.direction for e in result.report.entries] == ["before", "after", "after", "after"]
    assert module_calls(result.module) == [nn.Conv2d, nn.Conv2d]
    assert any("train mode" in n for n in result.report.notes)
    assert any("Dropout" in n for n in result.report.notes)
    close(result.module(x), model.reference(x.to(F64)))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snapshot.items())


class TiedHead(nn.Module):
    """A folded conv, and a Linear head whose weight is tied to a second one (kept as it is)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, bias=False)
        self.bn = randomize_bn(nn.BatchNorm2d(3))
        self.head = nn.Linear(12, 4)
        self.head2 = nn.Linear(12, 4)
        self.head2.weight = self.head.weight

    def forward(self, x):
        y = self.bn(self.conv(x)).flatten(1)
        return self.head(y) + self.head2(y)


def test_folded_module_owns_its_parameters_and_keeps_them_tied() -> None:
    model = TiedHead().eval()
    result = fold_model(model, torch.randn(2, 2, 4, 4))
    mine = {id(p) for p in model.parameters()}
    kept = dict(result.module.named_parameters(remove_duplicate=False))
    assert not mine & {id(p) for p in kept.values()}
    assert kept["head.weight"] is kept["head2.weight"]
    assert torch.equal(kept["head.weight"], model.head.weight)
    before = model.head.weight.detach().clone()
    with torch.no_grad():
        kept["head.bias"].add_(1.0)
        kept["head.weight"].mul_(2.0)
    assert torch.equal(model.head.weight, before)
    assert not torch.equal(model.head.bias, kept["head.bias"])


class WithWeightNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(2, 3, 3))
        self.bn = randomize_bn(nn.BatchNorm2d(3))

    def forward(self, x):
        return self.bn(self.conv(x))


def test_parametrized_layer_is_left_layer_hooks() -> None:
    result = fold_model(WithWeightNorm().eval(), torch.randn(2, 2, 5, 5))
    (entry,) = result.report.left
    assert entry.reason_code == "layer_hooks" and "parametrization" in entry.reason


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.register_buffer("m", torch.zeros(3))
        self.register_buffer("v", torch.ones(3))

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.m, self.v, training=False)


def test_functional_batch_norm_with_constant_statistics_folds() -> None:
    model = Functional().eval()
    x = torch.randn(2, 2, 3, 3)
    result = fold_model(model, x)
    (entry,) = result.report.folded
    assert (entry.bn, entry.into, entry.chain) == ("Functional.forward", "conv", "batch_norm")
    expected = F.conv2d(x, model.conv.weight, model.conv.bias) / (1 + 1e-5) ** 0.5
    close(result.module(x), expected)


# --- numerics and errors ------------------------------------------------------------------------


class ConvBN(nn.Module):
    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, bias=False)
        self.bn = TemperatureBatchNorm2d(3, temperature=temperature)
        randomize_bn(self.bn.bn)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("running_mean", float("nan"), "running_mean has non-finite values at channels [1]"),
        ("running_var", -5.0, "running_var + eps <= 0 at channels [1]"),
        ("weight", float("inf"), "weight has non-finite values"),
    ],
)
def test_corrupt_statistics_raise_fold_error_naming_the_bn(field, value, needle) -> None:
    model = ConvBN().eval()
    with torch.no_grad():
        getattr(model.bn.bn, field)[1] = value
    with pytest.raises(FoldError) as exc:
        fold_model(model, torch.randn(2, 2, 5, 5))
    assert "'bn'" in str(exc.value) and needle in str(exc.value)


def test_nan_temperature_raises_fold_error() -> None:
    with pytest.raises(FoldError, match=r"BatchNorm 'bn': temperature is \[nan\]"):
        fold_model(ConvBN(float("nan")).eval(), torch.randn(2, 2, 5, 5))


def test_nan_chain_constant_raises_fold_error() -> None:
    model = Chain(lambda m, y: y * m.k).eval()
    model.k[0, 2] = float("nan")
    with pytest.raises(FoldError, match=r"'bn'.*buffer k.*non-finite at channels \[2\]"):
        fold_model(model, torch.randn(2, 2, 5, 5), verify=False)


def test_fp16_overflow_raises_fold_error_naming_the_layer() -> None:
    model = ConvBN(temperature=1000.0).eval()
    with torch.no_grad():
        model.conv.weight.fill_(60.0)
        model.bn.bn.weight.fill_(1.0)
    model = model.half()
    with pytest.raises(FoldError, match=r"'conv' overflows float16"):
        fold_model(model, torch.randn(2, 2, 5, 5).half())


def test_fp16_model_folds_in_fp16() -> None:
    model = ConvBN(temperature=1.5).eval().half()
    x = torch.randn(2, 2, 5, 5).half()
    result = fold_model(model, x)
    assert result.module.conv.weight.dtype == torch.float16
    assert result.module.conv.bias.dtype == torch.float16
    ref = model.bn.temperature * f_bn(model.bn.bn, f_layer(model.conv, x.to(F64)))
    close(result.module(x), ref, rel=5e-3)


def test_subnormal_folded_weights_are_flushed_and_counted() -> None:
    model = ConvBN().eval()
    with torch.no_grad():
        model.conv.weight[0].fill_(1e-36)  # × a BN scale < 0.01 → below float32's smallest normal
        model.bn.bn.weight[0] = 1e-3
    result = fold_model(model, torch.randn(2, 2, 5, 5))
    entry = result.report.folded[0]
    assert entry.subnormals_flushed == 2 * 3 * 3
    assert "18 subnormals flushed" in str(result.report)
    assert torch.count_nonzero(result.module.conv.weight[0]) == 0


def test_max_relative_weight_change_is_reported() -> None:
    model = ConvBN(temperature=2.0).eval()
    result = fold_model(model, torch.randn(2, 2, 5, 5))
    bn = model.bn.bn
    s = 2.0 * bn.weight.detach().to(F64) / torch.sqrt(bn.running_var.to(F64) + bn.eps)
    assert result.report.folded[0].max_rel_weight_change == pytest.approx(
        float((s - 1).abs().max()), rel=1e-9
    )


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.bn = randomize_bn(nn.BatchNorm2d(3))

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: FX can't trace this
            return self.bn(self.conv(x))
        return self.bn(self.conv(-x))


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Untraceable()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = randomize_bn(nn.BatchNorm2d(3), 5)

    def forward(self, x):
        return self.bn(self.conv(self.inner(x)))


def test_a_model_whose_own_forward_cant_be_traced_is_folded_child_by_child() -> None:
    """Its forward branches on tensor values: the children fold on their own (conv has no BN),
    and the BN the forward calls itself is left with the reason; no leaf_modules hint."""
    model = Untraceable().eval()
    x = torch.randn(2, 2, 3, 3)
    result = fold_model(model, x)
    (entry,) = result.report.entries
    assert (entry.bn, entry.status, entry.reason_code) == ("bn", "left", "not_traceable")
    assert "called by Untraceable.forward itself, which torch.fx can't trace" in entry.reason
    assert "leaf_modules" not in str(result.report)
    assert type(result.module) is Untraceable
    close(result.module(x), model(x))


def test_an_untraceable_block_runs_as_a_black_box_and_its_bn_is_reported() -> None:
    model = Wrapper().eval()
    x = torch.randn(2, 2, 3, 3)
    result = fold_model(model, x)
    assert [(e.bn, e.status, e.reason_code) for e in result.report.entries] == [
        ("inner.bn", "left", "not_traceable"),
        ("bn", "folded", None),
    ]
    assert "inside a non-traceable region: torch.fx can't trace inner" in str(result.report)
    assert module_calls(result.module) == [Untraceable, nn.Conv2d]
    close(result.module(x), model(x))


def test_leaf_modules_make_untraceable_blocks_opaque() -> None:
    model = Wrapper().eval()
    x = torch.randn(2, 2, 3, 3)
    result = fold_model(model, x, leaf_modules=(Untraceable,))
    assert [e.bn for e in result.report.folded] == ["bn"]
    assert torch.allclose(result.module(x), model(x), atol=1e-6)


def test_bad_example_inputs_raise_fold_error() -> None:
    with pytest.raises(FoldError, match=r"example inputs \(\[2, 5, 3, 3\] float32\)"):
        fold_model(ConvBN().eval(), torch.randn(2, 5, 3, 3))


def test_not_a_module_raises_fold_error() -> None:
    with pytest.raises(FoldError, match=r"torch\.nn\.Module"):
        fold_model(lambda x: x, torch.randn(1))  # type: ignore[arg-type]


# --- report -------------------------------------------------------------------------------------


def test_report_renders_and_serializes() -> None:
    model = Mixed().eval()
    model.bn_c = nn.BatchNorm2d(4, track_running_stats=False)
    result = fold_model(model, torch.randn(2, 2, 6, 6))
    report = result.report
    text = str(report)
    assert text.splitlines()[0] == "Fold report: 3 folded, 1 left (of 4 BatchNorms)"
    assert "folded  bn_in (BatchNorm2d) before conv_a (Conv2d)" in text
    assert "left    bn_c (BatchNorm2d): track_running_stats=False" in text
    assert "self-check: folded in float64" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert (data["batchnorms"], data["folded"], data["left"]) == (4, 3, 1)
    assert data["entries"][3]["reason_code"] == "untracked_stats"
    assert report.entry("bn_a").into == "conv_a"
    assert isinstance(result.module, fx.GraphModule)


def test_batchnorms_inside_leaf_modules_are_reported_left() -> None:
    result = fold_model(Wrapper().eval(), torch.randn(2, 2, 3, 3), leaf_modules=(Untraceable,))
    entry = result.report.entry("inner.bn")
    assert (entry.status, entry.reason_code) == ("left", "leaf_module")
    assert "inner (Untraceable)" in entry.reason
    with pytest.raises(FoldError, match=r"inner\.bn"):
        fold_model(
            Wrapper().eval(), torch.randn(2, 2, 3, 3), leaf_modules=(Untraceable,), strict=True
        )
