"""Fold BatchNorm — with temperature and any constant scale/shift chain after it — into the adjacent
Conv/ConvTranspose/Linear layer of any traceable PyTorch model, and report every BatchNorm.

``fold_model(model, example_inputs)`` deep-copies the model, traces it with torch.fx, propagates
shapes with the example inputs, applies the patterns of `bnexport.fold.patterns` by rewriting
*nodes* (a shared module is never mutated), checks the folded module against the original in
float64, and returns ``FoldResult(module, report)``. Math: `bnexport.fold.math`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_leaves

from bnexport.errors import FoldError
from bnexport.fold.batchnorm import BNParams, register_batchnorm
from bnexport.fold.passes import fold_graph
from bnexport.fold.patterns import PATTERNS, Pattern, Rule
from bnexport.fold.report import REASONS, ChainEntry, FoldEntry, FoldReport
from bnexport.fold.trace import remove_eval_identities, trace

__all__ = [
    "PATTERNS",
    "REASONS",
    "VERIFY_TOLERANCE",
    "BNParams",
    "ChainEntry",
    "FoldEntry",
    "FoldReport",
    "FoldResult",
    "Pattern",
    "Rule",
    "fold_model",
    "register_batchnorm",
]

#: Largest ``max|folded − original| / max|original|`` the float64 self-check accepts, keyed by the
#: lowest-precision dtype among the model's parameters (folded weights are rounded to it once).
VERIFY_TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}

TRAIN_MODE_NOTE = (
    "the model was in train mode: it was folded with eval semantics (BatchNorm running statistics, "
    "dropout off); the folded module is in eval mode and matches the original's eval()"
)


@dataclass
class FoldResult:
    """The folded module (a GraphModule in eval mode, called like the original) and its report."""

    module: fx.GraphModule
    report: FoldReport


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, tuple | list):
        return tuple(example_inputs)
    return (example_inputs,)


def _clone(inputs: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs)


def _shapes(inputs: Sequence[Any]) -> str:
    return ", ".join(
        f"{list(x.shape)} {str(x.dtype).removeprefix('torch.')}"
        if isinstance(x, torch.Tensor)
        else type(x).__name__
        for x in inputs
    )


def _lowest_precision(module: nn.Module) -> torch.dtype:
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()} or {torch.float32}
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def run_float64(module: nn.Module, inputs: Sequence[Any]) -> list[torch.Tensor]:
    """``module``'s output tensors with every floating parameter and buffer in float64 (as
    ``deepcopy(module).double()`` would give, without copying the module: a fold's check on a
    large model is then two forwards, not two deep copies)."""
    state = {
        name: t.detach().double() if t.is_floating_point() else t
        for name, t in [
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
        ]
    }
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            out = torch.func.functional_call(module, state, _clone(inputs))
    finally:
        for m, training in modes:
            m.training = training
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def check_against_original(
    reference: nn.Module, folded: nn.Module, inputs: Sequence[Any], tolerance: float
) -> dict[str, Any]:
    """Run both modules in float64 on ``inputs``; `FoldError` if they differ by more than
    ``tolerance`` relative to the output's largest magnitude."""
    xs = tuple(
        x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs
    )
    expected = run_float64(reference, xs)
    got = run_float64(folded, xs)
    if len(expected) != len(got) or any(
        e.shape != g.shape for e, g in zip(expected, got, strict=False)
    ):
        raise FoldError(
            "the folded module's outputs differ in number or shape from the original's; this is "
            "a bnexport bug: please report it with the model"
        )
    max_abs, scale = 0.0, 0.0
    for e, g in zip(expected, got, strict=True):
        if not e.is_floating_point():
            max_abs = max(max_abs, float((e != g).any()) * float("inf"))
            continue
        fin_e, fin_g = torch.isfinite(e), torch.isfinite(g)
        if bool((fin_e != fin_g).any()) or bool((e[~fin_e] != g[~fin_g]).any()):
            max_abs = float("inf")
            continue
        if bool(fin_e.any()):
            max_abs = max(max_abs, float((e[fin_e] - g[fin_e]).abs().max()))
            scale = max(scale, float(e[fin_e].abs().max()))
    relative = max_abs / scale if scale > 0 else max_abs
    result = {
        "max_abs_error": max_abs,
        "output_scale": scale,
        "relative_error": relative,
        "tolerance": tolerance,
    }
    if not relative <= tolerance:
        raise FoldError(
            f"the folded module differs from the original by {max_abs:.3g} ({relative:.3g} of the "
            f"output scale {scale:.3g}) in a float64 check, above the {tolerance:g} tolerance; "
            "unless the model is random in eval mode (then pass verify=False) this is a bnexport "
            "bug: please report it with the fold report"
        )
    return result


def fold_model(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[type[nn.Module]] = (),
    verify: bool = True,
    strict: bool = False,
) -> FoldResult:
    """Fold every foldable BatchNorm of ``model`` (never modified) and report all of them.

    ``example_inputs``: a tensor or tuple of positional inputs (a batch of 2 is plenty), used to
    propagate shapes (channel dims, ranks, dtypes) and for the float64 self-check
    (``verify``; tolerance `VERIFY_TOLERANCE`). ``leaf_modules``: module types traced as black
    boxes (for code torch.fx can't trace). ``strict``: raise `FoldError` if any BatchNorm is left.
    Non-finite or negative statistics, a NaN temperature, a folded weight that overflows the layer's
    dtype: `FoldError` naming the layer, the values and the fix.
    """
    if not isinstance(model, nn.Module):
        raise FoldError(f"fold_model needs a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_tuple(example_inputs)
    was_training = any(m.training for m in model.modules())
    work = copy.deepcopy(model).eval()
    traced = trace(work, leaf_modules)
    gm = traced.gm
    removed = remove_eval_identities(gm)
    gm.recompile()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*_clone(inputs))
    except Exception as exc:
        raise FoldError(
            f"the example inputs ({_shapes(inputs)}) don't run through {type(model).__name__} "
            f"({type(exc).__name__}: {exc}); fix: pass inputs shaped like the model's real input, "
            "with a batch dimension (e.g. torch.randn(2, C, H, W))"
        ) from exc
    entries, chains = fold_graph(gm, untraceable=traced.untraceable)
    report = FoldReport(entries=entries, chains=chains)
    if was_training:
        report.notes.append(TRAIN_MODE_NOTE)
    if removed:
        report.notes.append(
            f"removed {removed} op(s) that are the identity in eval mode (Dropout, Identity)"
        )
    gm.eval()
    if verify:
        tolerance = VERIFY_TOLERANCE.get(_lowest_precision(work), VERIFY_TOLERANCE[torch.float32])
        report.verification = check_against_original(work, gm, inputs, tolerance)
    if strict and report.left:
        listed = "; ".join(f"{e.bn}: {e.reason}" for e in report.left)
        raise FoldError(f"{len(report.left)} BatchNorm(s) could not be folded: {listed}")
    return FoldResult(gm, report)
