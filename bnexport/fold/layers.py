"""What a foldable layer is (a plain Conv/ConvTranspose/Linear), and how a folded copy is made.

A layer is folded into only when its own torch forward computes ``W ∗ x + b`` with its weight as
stored: a subclass with its own forward, a parametrization or forward hooks transform the weight
or the output, so folding into the stored weight would be undone or wrong.
"""

from __future__ import annotations

import copy
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


def layer_kind(module: nn.Module | None) -> fm.LayerKind | None:
    """The fold kind of a plain Conv/ConvTranspose/Linear (its own torch forward), else None.

    A subclass that overrides ``forward``/``_conv_forward`` (weight standardization, QAT
    fake-quant…) transforms its weight, so folding into the weight would be wrong: None.
    """
    if module is None:
        return None
    for base, kind in _LAYER_BASES:
        if isinstance(module, base):
            cls = type(module)
            if cls.forward is not base.forward:
                return None
            if kind != "linear" and getattr(cls, "_conv_forward", None) is not getattr(
                base, "_conv_forward", None
            ):
                return None
            return kind
    return None


def custom_layer(cls: type | None) -> str | None:
    """The torch layer class that ``cls`` subclasses while replacing its forward (timm's
    ``Conv2dSame``, a weight-standardized conv…), else None: such a layer is never folded into."""
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
