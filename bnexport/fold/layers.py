"""What a foldable layer is (a Conv/ConvTranspose/Linear), and how a folded copy is made.

A layer is folded into when its forward computes ``W ∗ x + b`` with its weight and bias as stored.
torch's own forward does. A Conv/Linear subclass with its own forward (timm's ``Conv2dSame``, which
pads at run time; a weight-standardized or fake-quantized conv) is probed: in float64, with the
weight scaled per output channel by ``s`` and the bias set to ``b·s + t``, its output must be
``s·y + t`` (what a BatchNorm after it folds into). Only that direction is probed: folding a
BatchNorm *before* such a layer also needs to know its padding, so that stays torch's own layers
only. A parametrization or forward hooks recompute the weight or the output: never folded into.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from bnexport.fold import math as fm

_LAYER_BASES: tuple[tuple[type[nn.Module], fm.LayerKind], ...] = (
    (nn.Conv1d, "conv"),
    (nn.Conv2d, "conv"),
    (nn.Conv3d, "conv"),
    (nn.ConvTranspose1d, "conv_transpose"),
    (nn.ConvTranspose2d, "conv_transpose"),
    (nn.ConvTranspose3d, "conv_transpose"),
    (nn.Linear, "linear"),
)


def layer_kind(module: nn.Module | None, *, probe: bool = True) -> fm.LayerKind | None:
    """The fold kind of a Conv/ConvTranspose/Linear whose forward is ``W ∗ x + b`` in its stored
    weight and bias, else None: torch's own forward, or (``probe``) a Conv/Linear subclass with
    its own forward that passes `folds_after` (output side only)."""
    if module is None:
        return None
    for base, kind in _LAYER_BASES:
        if isinstance(module, base):
            if custom_layer(type(module)) is None:
                return kind
            return kind if probe and kind != "conv_transpose" and folds_after(module) else None
    return None


#: Probe verdicts by module (a module's forward and parameters' shapes don't change while folding).
_PROBED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
PROBE_RTOL = 1e-9  # float64: a linear forward agrees to ~1e-15; weight transforms miss by far more


def folds_after(layer: nn.Module) -> bool:
    """Whether ``layer``'s own forward is linear in its stored weight and bias, per output
    channel: in float64, ``y(W·s, b·s + t) = s·y(W, b) + t`` for random ``s``, ``t`` and input,
    on a copy whose parameters and buffers are random (`_randomize`), not the layer's own values.
    Any failure to run the probe counts as no."""
    if layer not in _PROBED:
        try:
            _PROBED[layer] = _probe(layer)
        except Exception:
            _PROBED[layer] = False
    return _PROBED[layer]


def _probe(layer: nn.Module) -> bool:
    gen = torch.Generator().manual_seed(0)
    probe = copy.deepcopy(layer).double().eval()
    _randomize(probe, gen)  # never decide on degenerate values (timm zero-inits some gains)
    weight = probe.weight.detach()
    if isinstance(probe, nn.Linear):
        x = torch.randn(2, probe.in_features, generator=gen, dtype=torch.float64)
    else:
        spatial = [
            d * (k - 1) + 1 + 2 * st
            for d, k, st in zip(probe.dilation, probe.kernel_size, probe.stride, strict=True)
        ]
        x = torch.randn(2, probe.in_channels, *spatial, generator=gen, dtype=torch.float64)
    channels = weight.shape[0]
    s = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5
    t = torch.randn(channels, generator=gen, dtype=torch.float64)
    bias = probe.bias.detach() if probe.bias is not None else torch.zeros_like(s)
    with torch.no_grad():
        y = probe(x)
        probe.weight = nn.Parameter(weight * s.view(-1, *[1] * (weight.dim() - 1)))
        probe.bias = nn.Parameter(bias * s + t)  # as `new_layer` sets it
        got = probe(x)
    if not isinstance(y, torch.Tensor) or got.shape != y.shape or y.dim() < 2:
        return False
    view = (1, -1, *[1] * (y.dim() - 2))
    want = y * s.view(view) + t.view(view)
    scale = float(want.abs().max()) or 1.0
    return bool((got - want).abs().max() <= PROBE_RTOL * scale)


def _randomize(probe: nn.Module, gen: torch.Generator) -> None:
    """Give every floating parameter and buffer of the probe copy a random, non-degenerate value:
    weight and bias ~ N(0, 1), the others (gains, scales, masks) ~ U(0.5, 1.5). A layer whose
    output is linear in its weight only for its current values (a zero gain makes any weight
    transform vanish) is then seen as what it is."""
    with torch.no_grad():
        for name, t in [*probe.named_parameters(), *probe.named_buffers()]:
            if not t.is_floating_point():
                continue
            if name in ("weight", "bias"):
                t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype))
            else:
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)


def custom_layer(cls: type | None) -> str | None:
    """The torch layer class that ``cls`` subclasses while replacing its forward (timm's
    ``Conv2dSame``, a weight-standardized conv…), else None: such a layer takes a BatchNorm after
    it only when `folds_after` holds, and one before it never."""
    if not isinstance(cls, type):
        return None
    for base, kind in _LAYER_BASES:
        if issubclass(cls, base):
            own_conv = kind != "linear" and getattr(cls, "_conv_forward", None) is not getattr(
                base, "_conv_forward", None
            )
            return base.__name__ if cls.forward is not base.forward or own_conv else None
    return None


def new_layer(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A copy of ``layer`` with new weight and bias Parameters (the original is never touched)."""
    device = layer.weight.device
    new_weight = nn.Parameter(weight.to(device), requires_grad=layer.weight.requires_grad)
    req = layer.bias.requires_grad if layer.bias is not None else layer.weight.requires_grad
    new_bias = nn.Parameter(bias.to(device), requires_grad=req)
    # The memo makes deepcopy use the new Parameters instead of copying the old ones.
    memo: dict[int, Any] = {id(layer.weight): new_weight}
    if layer.bias is not None:
        memo[id(layer.bias)] = new_bias
    new = copy.deepcopy(layer, memo)
    new.bias = new_bias
    return new


def layer_hook_reason(layer: nn.Module, name: str) -> str | None:
    """Why folding into ``layer``'s weight would be undone (parametrization, pre-hooks), or None."""
    if parametrize.is_parametrized(layer):
        return (
            f"{name} has a parametrization on its weight (e.g. weight_norm/spectral_norm) that "
            "recomputes it; fix: torch.nn.utils.parametrize.remove_parametrizations first"
        )
    if layer._forward_pre_hooks or layer._forward_hooks:
        return (
            f"{name} has forward hooks (e.g. the old torch.nn.utils.weight_norm) that may "
            "recompute or change its weight/output; fix: remove the hooks (remove_weight_norm) "
            "first"
        )
    return None
