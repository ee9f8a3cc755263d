"""What counts as a BatchNorm: how to read γ, β, μ, σ², ε (and a temperature) from a module or a
functional call, and the extension point for a user's own BatchNorm class.

A BatchNorm in eval mode is the per-channel affine map ``T·(γ·(x − μ)/√(σ² + ε) + β)`` (``T`` = 1
without a temperature). bnexport recognises it by what it computes, not by class name:

* a module whose ``forward`` is torch's own BatchNorm forward (``nn.BatchNorm1d/2d/3d``, their
  subclasses that keep it, ``SyncBatchNorm``);
* a module of a class registered with `register_batchnorm` (the seed's `TemperatureBatchNorm2d` is
  registered this way), or any module shaped like a frozen BatchNorm (buffers ``weight``, ``bias``,
  ``running_mean``, ``running_var`` and a float ``eps``, no parameters, no submodules: torchvision's
  ``FrozenBatchNorm2d``); these are checked numerically against the formula before folding
  (`bnexport.fold.sites.bn_site`);
* a call of ``F.batch_norm``, ``torch.batch_norm`` or ``aten.batch_norm`` whose statistics and
  affine parameters are constants (buffers/parameters) and whose ``training`` is ``False`` — what a
  BatchNorm subclass with its own forward (timm's ``BatchNormAct2d``) traces to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import SyncBatchNorm, _BatchNorm

from bnexport.nets import TemperatureBatchNorm2d


@dataclass(frozen=True)
class BNParams:
    """The constants of an eval-mode BatchNorm: ``T·(γ·(x − μ)/√(σ² + ε) + β)``.

    ``running_mean``/``running_var`` None: the BatchNorm uses batch statistics (it can't fold).
    ``weight``/``bias`` None: γ = 1, β = 0. ``temperature`` None: no scale after the BatchNorm.
    """

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    eps: float
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    temperature: Any = None

    @property
    def num_features(self) -> int:
        for t in (self.running_mean, self.running_var, self.weight, self.bias):
            if t is not None:
                return int(t.numel())
        return 0


#: How to read the BatchNorm constants from a module of a registered class.
Reader = Callable[[nn.Module], BNParams]

_REGISTRY: dict[type[nn.Module], Reader] = {}


def register_batchnorm(cls: type[nn.Module], reader: Reader) -> None:
    """Tell bnexport that ``cls`` computes an eval-mode BatchNorm and how to read its constants.

    ``reader(module)`` returns the module's `BNParams`. Registered modules are traced as one call
    (never looked into), folded like ``nn.BatchNorm2d``, and checked numerically against the
    formula first: a reader that does not describe what the module computes leaves the module in
    the graph with the reason in the fold report. Subclasses that override ``forward`` are not
    covered. Example::

        register_batchnorm(MyNorm, lambda m: BNParams(m.mean, m.var, m.eps, m.gamma, m.beta))
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_batchnorm needs an nn.Module subclass, got {cls!r}")
    _REGISTRY[cls] = reader


def _read_stock(m: nn.Module) -> BNParams:
    bn: Any = m
    return BNParams(bn.running_mean, bn.running_var, float(bn.eps), bn.weight, bn.bias)


def _read_temperature_bn(m: nn.Module) -> BNParams:
    bn: Any = m.bn  # type: ignore[union-attr]
    return BNParams(
        bn.running_mean, bn.running_var, float(bn.eps), bn.weight, bn.bias, m.temperature
    )


register_batchnorm(TemperatureBatchNorm2d, _read_temperature_bn)

_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def _is_frozen_bn(m: nn.Module) -> bool:
    """Shaped like torchvision's ``FrozenBatchNorm2d``: four 1-D buffers of one length, ``eps``."""
    if isinstance(m, _BatchNorm) or m._parameters or m._modules:
        return False
    bufs = [m._buffers.get(n) for n in _FROZEN_BUFFERS]
    if any(b is None or b.dim() != 1 for b in bufs):
        return False
    return len({b.numel() for b in bufs}) == 1 and isinstance(  # type: ignore[union-attr]
        getattr(m, "eps", None), float | int
    )


def _registered_reader(m: nn.Module) -> Reader | None:
    for cls in type(m).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls] if type(m).forward is cls.forward else None
    return None


def is_stock_batchnorm(m: nn.Module) -> bool:
    """A torch BatchNorm whose forward is torch's own (nothing to verify)."""
    return isinstance(m, _BatchNorm) and type(m).forward in (
        _BatchNorm.forward,
        SyncBatchNorm.forward,
    )


def read_batchnorm(m: nn.Module | None) -> BNParams | None:
    """The `BNParams` of a BatchNorm-like module (see the module docstring), else None."""
    if m is None:
        return None
    reader = _registered_reader(m)
    if reader is not None:
        return reader(m)
    if is_stock_batchnorm(m):
        return _read_stock(m)
    if _is_frozen_bn(m):
        return BNParams(m.running_mean, m.running_var, float(m.eps), m.weight, m.bias)  # type: ignore[arg-type]
    return None


def is_batchnorm_like(m: nn.Module) -> bool:
    """Whether `read_batchnorm` reads ``m`` (without touching its tensors: safe while tracing)."""
    return _registered_reader(m) is not None or is_stock_batchnorm(m) or _is_frozen_bn(m)


def needs_probe(m: nn.Module) -> bool:
    """Whether a BatchNorm-like module's forward must be checked against the formula."""
    return not is_stock_batchnorm(m)


def is_batchnorm_class(m: nn.Module) -> bool:
    """A `_BatchNorm` of any forward (incl. timm's ``BatchNormAct2d``), or BatchNorm-like."""
    return isinstance(m, _BatchNorm) or is_batchnorm_like(m)


# --- functional calls --------------------------------------------------------------------------

_F_ORDER = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_ATEN_ORDER = (
    "input",
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "training",
    "momentum",
    "eps",
    "cudnn_enabled",
)
_F_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}

#: Functional BatchNorm targets and their positional argument order.
FUNCTIONAL_BATCHNORMS: dict[Any, tuple[str, ...]] = {
    F.batch_norm: _F_ORDER,
    torch.batch_norm: _ATEN_ORDER,
    torch.ops.aten.batch_norm: _ATEN_ORDER,
    torch.ops.aten.batch_norm.default: _ATEN_ORDER,
}


def functional_args(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a functional BatchNorm call by name (defaults filled in)."""
    order = FUNCTIONAL_BATCHNORMS[target]
    named = dict(_F_DEFAULTS)
    named.update(zip(order, args, strict=False))
    named.update(kwargs)
    return named
