"""A zoo of small models for the fold tests, plus the checks every fold test shares.

The models cover what users bring (residual, depthwise-separable, transposed-conv decoders, 1-D
and 3-D nets, MLPs, learnable/negative temperatures, shared modules, branches, untracked stats,
SyncBatchNorm) and the rows of the comparison table in docs/fold-comparison.md.

The ground truth is always the *unfolded* model deep-copied to float64 in eval mode: nothing here
goes through bnexport's fold code, so a wrong fold shows up as a numeric mismatch.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from bnexport.nets import Net, TemperatureBatchNorm2d

# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------

#: Folded output must be within ``REL_TOL * max(1, max|reference|)`` of the float64 reference.
REL_TOL = 1e-5

#: Torch function names of elementwise arithmetic that a folded scale/shift chain must not leave.
ARITH_FUNCS = frozenset(
    {
        *(f"{op}{suffix}" for op in ("mul", "div", "add", "sub", "rsub") for suffix in ("", "_")),
        *(f"__{p}{op}__" for op in ("mul", "truediv", "div", "add", "sub") for p in ("", "r", "i")),
        "true_divide",
        "multiply",
        "divide",
        "subtract",
        "addcmul",
        "addcdiv",
        "neg",
        "negative",
        "__neg__",
    }
)

#: ONNX op types of a folded scale/shift chain.
ONNX_ARITH_OPS = ("Mul", "Div", "Add", "Sub")


def count_batchnorms(model: nn.Module) -> int:
    """Number of BatchNorm modules (any rank, SyncBatchNorm included) inside ``model``."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class _Recorder(TorchFunctionMode):
    """Counts the torch functions and tensor methods a forward pass calls, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        self.calls[getattr(func, "__name__", repr(func))] += 1
        return func(*args, **(kwargs or {}))


def traced_calls(module: nn.Module, *inputs: torch.Tensor) -> tuple[torch.Tensor, Counter[str]]:
    """Run ``module(*inputs)`` without grad; return (output, Counter of torch functions called)."""
    rec = _Recorder()
    with torch.no_grad(), rec:
        out = module(*inputs)
    return out, rec.calls


def batchnorm_calls(calls: Counter[str]) -> int:
    """How many batch-norm executions a traced forward pass made."""
    return sum(n for name, n in calls.items() if "batch_norm" in name)


def arith_calls(calls: Counter[str]) -> int:
    """How many elementwise mul/div/add/sub (or negation) executions a traced forward pass made."""
    return sum(n for name, n in calls.items() if name in ARITH_FUNCS)


def float64_reference(model: nn.Module) -> nn.Module:
    """A deep copy of the *unfolded* model, in float64 and eval mode: the ground truth."""
    return copy.deepcopy(model).double().eval()


def reference_output(ref: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """Run the float64 reference on float64 copies of ``inputs``."""
    with torch.no_grad():
        return ref(*(x.double() if x.is_floating_point() else x for x in inputs))


@dataclass(frozen=True)
class Comparison:
    """An output against the float64 reference: largest error, output scale, allowed error."""

    max_abs_err: float
    scale: float
    rel_tol: float

    @property
    def allowed(self) -> float:
        return self.rel_tol * self.scale

    @property
    def ok(self) -> bool:
        return self.max_abs_err <= self.allowed

    @property
    def rel_err(self) -> float:
        """The error as a fraction of the output scale (what `REL_TOL` bounds)."""
        return self.max_abs_err / self.scale

    def __str__(self) -> str:
        return (
            f"max|out - ref| = {self.max_abs_err:.3e}, allowed {self.allowed:.3e} "
            f"(= {self.rel_tol:g} x scale {self.scale:.3e}); "
            f"would pass at rel tol {self.rel_err:.3e}"
        )


def compare(got: Any, ref: torch.Tensor, rel_tol: float = REL_TOL) -> Comparison:
    """Compare ``got`` to the float64 ``ref``; tolerance ``rel_tol * max(1, max|ref|)``."""
    got64 = torch.as_tensor(got).detach().double()
    ref64 = ref.detach().double()
    assert got64.shape == ref64.shape, f"output shape {tuple(got64.shape)} != {tuple(ref64.shape)}"
    if not bool(torch.isfinite(got64).all()):
        return Comparison(float("inf"), 1.0, rel_tol)
    scale = max(1.0, float(ref64.abs().max())) if ref64.numel() else 1.0
    err = float((got64 - ref64).abs().max()) if ref64.numel() else 0.0
    return Comparison(err, scale, rel_tol)


@dataclass
class Snapshot:
    """What a user would see change if fold_model mutated its input model."""

    state: dict[str, torch.Tensor]
    structure: str
    training: bool
    temperatures: dict[str, Any]
    output: torch.Tensor

    @classmethod
    def take(cls, model: nn.Module, *inputs: torch.Tensor) -> Snapshot:
        with torch.no_grad():
            out = model(*inputs).detach().clone()
        temps = {
            name: m.temperature
            for name, m in model.named_modules()
            if isinstance(getattr(m, "temperature", None), float)  # tensors are in the state
        }
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return cls(state, repr(model), model.training, temps, out)

    def assert_unchanged(self, model: nn.Module, *inputs: torch.Tensor) -> None:
        now = Snapshot.take(model, *inputs)
        assert now.state.keys() == self.state.keys(), (
            "fold_model changed the input's state_dict keys"
        )
        for key, before in self.state.items():
            after = now.state[key]
            assert after.dtype == before.dtype, f"fold_model changed the dtype of the input's {key}"
            assert torch.equal(after, before), f"fold_model modified the input model's {key}"
        assert now.structure == self.structure, "fold_model changed the input model's modules"
        assert now.training == self.training, "fold_model changed the input's train/eval mode"
        assert now.temperatures == self.temperatures, "fold_model changed the input's temperatures"
        assert torch.equal(now.output, self.output), (
            "the input model's output changed after folding"
        )


def randomize_batchnorms(model: nn.Module, seed: int) -> nn.Module:
    """Give every BN non-trivial running stats and affine params (a fresh BN is ~identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                if m.affine:
                    sign = torch.where(torch.rand(c, generator=gen) < 0.2, -1.0, 1.0)
                    m.weight.copy_(sign * (torch.rand(c, generator=gen) + 0.5))
                    m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                    m.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.2)
    return model


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN + (optionally downsampled) skip, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.down(x))


class ResNetTiny(nn.Module):
    """Stem + two basic blocks (one downsampling) + pooled linear head: 6 BNs, 2 skip Adds."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.block1 = BasicBlock(8, 8)
        self.block2 = BasicBlock(8, 12, stride=2)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand-BN-ReLU6, 3x3 depthwise-BN-ReLU6, 1x1 project-BN, + skip."""

    def __init__(self, c: int, expand: int = 3) -> None:
        super().__init__()
        h = c * expand
        self.expand = nn.Conv2d(c, h, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(h)
        self.dw = nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False)
        self.bn2 = nn.BatchNorm2d(h)
        self.project = nn.Conv2d(h, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        return x + self.bn3(self.project(y))


class DepthwiseSeparableNet(nn.Module):
    """Stem, depthwise-separable block (dw stride 2 with bias, pw), inverted residual: 6 BNs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, 1, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, 2, 1, groups=6, bias=True)
        self.bn_dw = nn.BatchNorm2d(6)
        self.pw = nn.Conv2d(6, 8, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(8)
        self.block = InvertedResidual(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn0(self.stem(x)))
        x = F.relu(self.bn_dw(self.dw(x)))
        x = F.relu(self.bn_pw(self.pw(x)))
        return self.block(x)


class TransposedDecoder(nn.Module):
    """ConvTranspose2d decoder: groups 2, depthwise (with output_padding), groups 4 with bias."""

    def __init__(self) -> None:
        super().__init__()
        self.up1 = nn.ConvTranspose2d(8, 8, 4, 2, 1, groups=2, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 8, 3, 2, 1, output_padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.up3 = nn.ConvTranspose2d(8, 4, 2, 1, 0, groups=4, bias=True, dilation=2)
        self.bn3 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.up1(x)))
        x = F.relu(self.bn2(self.up2(x)))
        return self.bn3(self.up3(x))


class Net1d(nn.Module):
    """1-D: reflect-padded dilated Conv1d, grouped Conv1d, ConvTranspose1d, each + BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 6, 3, padding=2, dilation=2, padding_mode="reflect")
        self.b1 = nn.BatchNorm1d(6)
        self.c2 = nn.Conv1d(6, 6, 3, stride=2, padding=1, groups=2, bias=False)
        self.b2 = nn.BatchNorm1d(6)
        self.t3 = nn.ConvTranspose1d(6, 3, 4, stride=2, padding=1, groups=3)
        self.b3 = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.b3(self.t3(x))


class Net3d(nn.Module):
    """3-D: Conv3d (replicate padding), depthwise Conv3d, ConvTranspose3d, each + BatchNorm3d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv3d(2, 4, 3, padding=1, padding_mode="replicate", bias=False)
        self.b1 = nn.BatchNorm3d(4)
        self.c2 = nn.Conv3d(4, 4, 3, stride=2, padding=1, groups=4)
        self.b2 = nn.BatchNorm3d(4)
        self.t3 = nn.ConvTranspose3d(4, 2, 2, stride=2, groups=2, bias=False)
        self.b3 = nn.BatchNorm3d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.b3(self.t3(x))


class LearnableTemperature(nn.Module):
    """Conv -> BN -> * nn.Parameter temperature (a learned scalar) -> ReLU -> Conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.temperature = nn.Parameter(torch.tensor(1.7))
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.bn(self.conv(x)) * self.temperature))


class MLP(nn.Module):
    """Linear -> BatchNorm1d -> ReLU, twice, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 12, bias=False)
        self.bn2 = nn.BatchNorm1d(12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.fc1(x)))
        x = F.relu(self.bn2(self.fc2(x)))
        return self.head(x)


class SharedConv(nn.Module):
    """One conv module called twice, BN after the first call only (pytorch#104593)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(self.bn(self.conv(x))))


class Branch(nn.Module):
    """Conv output used twice (BN input and skip): the BN cannot be absorbed by the conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return F.relu(self.bn(y)) + y


class UntrackedStats(nn.Module):
    """BN with track_running_stats=False normalizes with batch stats even in eval: not foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class SyncBNNet(nn.Module):
    """Conv -> SyncBatchNorm (eval, no process group needed) -> ReLU -> Conv -> SyncBatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.SyncBatchNorm(6)
        self.conv2 = nn.Conv2d(6, 4, 3, stride=2)
        self.bn2 = nn.SyncBatchNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class NegativeTemperature(nn.Module):
    """Two Conv -> TemperatureBatchNorm2d with negative temperatures (flips sign before ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = TemperatureBatchNorm2d(6, temperature=-0.7)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.bn2 = TemperatureBatchNorm2d(4, temperature=-2.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class BNLinear(nn.Module):
    """BatchNorm1d -> Linear: the BN folds forward into the Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(10)
        self.fc = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


class BNConv(nn.Module):
    """BatchNorm2d -> Conv2d. Exact to fold only with padding 0 (or a zero shift)."""

    def __init__(self, padding: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 5, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


class ConvBNDiv(nn.Module):
    """Conv -> BN -> / T (Python number) -> ReLU."""

    def __init__(self, t: float = 2.5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.t = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)) / self.t)


class ConvBNMulBuffer(nn.Module):
    """Conv -> BN -> * buffer[1, C, 1, 1] -> + buffer -> ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        gen = torch.Generator().manual_seed(7)
        self.register_buffer("scale", torch.rand(1, 6, 1, 1, generator=gen) * 2 - 0.5)
        self.register_buffer("shift", torch.randn(1, 6, 1, 1, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)) * self.scale + self.shift)


class ConvBNMulT(nn.Module):
    """Conv -> BN -> * T (Python number), the seed's temperature written out."""

    def __init__(self, t: float = 1.7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.t = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)) * self.t)


class NonlinearityBetween(nn.Module):
    """Conv -> ReLU -> BN: the ReLU sits between the layer and the BN, so nothing folds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.relu(self.conv(x)))


class GroupedConvTransposeBN(nn.Module):
    """ConvTranspose2d with the given groups -> BN (the table's grouped/depthwise rows)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, groups=groups)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class LinearBN(nn.Module):
    """Linear -> BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class SeedTemperature(nn.Module):
    """Conv -> TemperatureBatchNorm2d (the seed's myBN: ``T * bn(x)``) -> ReLU."""

    def __init__(self, t: float = 1.7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = TemperatureBatchNorm2d(6, temperature=t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


# --------------------------------------------------------------------------------------------
# The zoo
# --------------------------------------------------------------------------------------------

#: Per refusal (the report's ``reason_code``): words the human-readable reason must contain (any).
REASON_WORDS: dict[str, tuple[str, ...]] = {
    "multi_user": ("user",),
    "untracked_stats": ("track_running_stats",),
    "not_exact_padding": ("padding",),
    "nonlinearity": ("nonlinearity", "relu"),
}


@dataclass(frozen=True)
class ZooCase:
    """One model with what folding it must do.

    ``left_reasons`` has one reason code (see REASON_WORDS) per BN expected to be left.
    ``onnx_arith`` is the number of Mul/Div/Add/Sub nodes the exported folded graph may keep
    (residual adds); None: not fully foldable, not exported.
    """

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    folded: int
    left_reasons: tuple[str, ...] = ()
    onnx_arith: dict[str, int] | None = field(default_factory=dict)

    @property
    def left(self) -> int:
        return len(self.left_reasons)

    def build(self, seed: int = 0) -> nn.Module:
        """The model in eval mode with randomized BN stats and seeded weights."""
        torch.manual_seed(seed)
        return randomize_batchnorms(self.factory(), seed).eval()

    def example_input(self, seed: int = 1) -> torch.Tensor:
        return torch.randn(self.input_shape, generator=torch.Generator().manual_seed(seed))


def _seed_net_negative() -> nn.Module:
    return Net(temperature=-0.5)


ZOO: tuple[ZooCase, ...] = (
    ZooCase("resnet_tiny", ResNetTiny, (2, 3, 8, 8), folded=6, onnx_arith={"Add": 2}),
    ZooCase(
        "depthwise_separable", DepthwiseSeparableNet, (2, 3, 8, 8), folded=6, onnx_arith={"Add": 1}
    ),
    ZooCase("convtranspose_decoder", TransposedDecoder, (2, 8, 3, 3), folded=3),
    ZooCase("net_1d", Net1d, (2, 2, 12), folded=3),
    ZooCase("net_3d", Net3d, (2, 2, 4, 4, 4), folded=3),
    ZooCase("learnable_temperature", LearnableTemperature, (2, 3, 6, 6), folded=1),
    ZooCase("mlp_linear_bn1d", MLP, (4, 10), folded=2),
    ZooCase("shared_conv_twice", SharedConv, (2, 4, 6, 6), folded=1),
    ZooCase(
        "branch", Branch, (2, 3, 6, 6), folded=0, left_reasons=("multi_user",), onnx_arith=None
    ),
    ZooCase(
        "untracked_stats",
        UntrackedStats,
        (2, 3, 6, 6),
        folded=0,
        left_reasons=("untracked_stats",),
        onnx_arith=None,
    ),
    ZooCase("syncbatchnorm_eval", SyncBNNet, (2, 3, 7, 7), folded=2),
    ZooCase("negative_temperature", NegativeTemperature, (2, 3, 6, 6), folded=2),
    ZooCase("seed_net_negative_temperature", _seed_net_negative, (2, 1, 28, 28), folded=1),
    ZooCase("bn_linear", BNLinear, (4, 10), folded=1),
    ZooCase("bn_conv_pad0", lambda: BNConv(padding=0), (2, 3, 6, 6), folded=1),
    ZooCase(
        "bn_conv_pad1_shift",
        lambda: BNConv(padding=1),
        (2, 3, 6, 6),
        folded=0,
        left_reasons=("not_exact_padding",),
        onnx_arith=None,
    ),
    ZooCase("conv_bn_div_t", ConvBNDiv, (2, 3, 6, 6), folded=1),
    ZooCase("conv_bn_mul_buffer", ConvBNMulBuffer, (2, 3, 6, 6), folded=1),
    ZooCase("conv_bn_mul_t_seed", SeedTemperature, (2, 3, 6, 6), folded=1),
    ZooCase("convtranspose_groups2_bn", lambda: GroupedConvTransposeBN(2), (2, 4, 4, 4), folded=1),
    ZooCase(
        "convtranspose_depthwise_bn", lambda: GroupedConvTransposeBN(4), (2, 4, 4, 4), folded=1
    ),
    ZooCase("linear_bn1d", LinearBN, (4, 10), folded=1),
    ZooCase(
        "nonlinearity_between",
        NonlinearityBetween,
        (2, 3, 6, 6),
        folded=0,
        left_reasons=("nonlinearity",),
        onnx_arith=None,
    ),
)
