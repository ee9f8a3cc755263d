"""Independent float64 references for the fold tests: layers and BatchNorms written with
torch.nn.functional on the *original* module's raw tensors (never through bnexport.fold)."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

F64 = torch.float64
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def raw(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(F64)


def f_layer(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Conv/ConvTranspose/Linear ``m`` applied to float64 ``x`` with F.* and m's raw parameters."""
    w, b = raw(m.weight), raw(m.bias)
    if isinstance(m, nn.Linear):
        return F.linear(x, w, b)
    d = len(m.kernel_size)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return CONVT[d](x, w, b, m.stride, m.padding, m.output_padding, m.groups, m.dilation)
    padding = m.padding
    if m.padding_mode != "zeros":
        pads = [p for p in reversed(m.padding) for _ in range(2)]
        x = F.pad(x, pads, mode=m.padding_mode)
        padding = 0
    return CONV[d](x, w, b, m.stride, padding, m.dilation, m.groups)


def f_bn(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode BatchNorm with m's raw running statistics and affine parameters."""
    return F.batch_norm(
        x, raw(m.running_mean), raw(m.running_var), raw(m.weight), raw(m.bias), False, 0.0, m.eps
    )


def randomize_bn(bn: nn.Module, seed: int = 0, shift: bool = True) -> nn.Module:
    """Non-trivial running stats and affine parameters (so a fold that ignores one shows)."""
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.3)
        if shift:
            bn.running_mean.copy_(torch.randn(c, generator=g))
        else:
            bn.running_mean.zero_()
        if bn.weight is not None:
            bn.weight.copy_(torch.randn(c, generator=g))
            bn.bias.copy_(torch.randn(c, generator=g) if shift else torch.zeros(c))
    return bn


def close(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    """|got − ref| within ``rel`` of the reference's output scale (float32 vs float64)."""
    ref = ref.detach()
    scale = max(float(ref.abs().max()), 1e-12)
    err = float((got.detach().to(F64) - ref).abs().max())
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} × output scale {scale:.3g}"


def module_calls(gm: fx.GraphModule) -> list[type]:
    """Types of the modules the folded graph calls, in order."""
    return [type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"]


def has_batchnorm(gm: fx.GraphModule) -> bool:
    return any(
        issubclass(t, nn.modules.batchnorm._BatchNorm) or t.__name__ == "TemperatureBatchNorm2d"
        for t in module_calls(gm)
    )


ARITH = {"mul", "truediv", "add", "sub", "div", "neg", "mul_", "div_", "add_", "sub_"}


def arith_nodes(gm: fx.GraphModule) -> list[str]:
    """Names of the mul/div/add/sub/neg nodes left in the folded graph."""
    out = []
    for n in gm.graph.nodes:
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if n.op in ("call_function", "call_method") and name in ARITH:
            out.append(n.name)
    return out
