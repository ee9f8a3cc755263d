"""Fold BatchNorm — with temperature and any constant scale/shift chain after it — into the adjacent
Conv/ConvTranspose/Linear layer of any traceable PyTorch model, and report every BatchNorm.

``fold_model(model, example_inputs)`` copies the model (its modules; the Parameters it keeps are
copied at the end, the folded ones are new), traces it with torch.fx, propagates shapes with the
example inputs, applies the patterns of `bnexport.fold.patterns` by rewriting *nodes* (a shared
module is never mutated), checks the fold (:func:`self_check`), and returns
``FoldResult(module, report)``. Math: `bnexport.fold.math`.

**Self-check** (`bnexport.fold.verify`). Folding is exact algebra, so the folded graph, run in
float64 with the fold's own float64 parameters, must agree with the unfolded model in float64 to
what float64 rounding explains on this model, measured: the model's own fp32 error and, when that
alone would fail the fold, its sensitivity to ±eps changes of its inputs and parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
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
from bnexport.fold.patterns import PATTERNS
from bnexport.fold.report import REASONS, ChainEntry, FoldEntry, FoldReport, rename_entries
from bnexport.fold.rules import Pattern, Rule
from bnexport.fold.trace import Traced, remove_eval_identities, trace
from bnexport.fold.verify import clone_inputs, self_check

__all__ = [
    "PATTERNS",
    "REASONS",
    "BNParams",
    "ChainEntry",
    "FoldEntry",
    "FoldReport",
    "FoldResult",
    "Pattern",
    "Rule",
    "fold_model",
    "register_batchnorm",
    "self_check",
]

#: Reasons meaning a BatchNorm normalizes with each batch's statistics (a batch-dependent output).
BATCH_STATISTICS = frozenset({"untracked_stats", "functional_training"})

NO_VERIFY_NOTE = "the float64 self-check was skipped (--no-verify / verify=False)"

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


def _shapes(inputs: Sequence[Any]) -> str:
    return ", ".join(
        f"{list(x.shape)} {str(x.dtype).removeprefix('torch.')}"
        if isinstance(x, torch.Tensor)
        else type(x).__name__
        for x in inputs
    )


@dataclass
class _Folded:
    gm: fx.GraphModule
    entries: list[FoldEntry]
    chains: list[ChainEntry]
    removed: int  # eval identities removed
    exact: dict[str, torch.Tensor]  # folded parameters in float64, by path
    reference_outputs: list[torch.Tensor]  # the unfolded model's outputs on the example inputs
    memo64: dict[int, torch.Tensor]  # float64 copies of the original parameters the fold read
    notes: list[str]  # what the trace changed (`_trace_notes`)


def _fold_copy(
    work: nn.Module, inputs: Sequence[Any], leaf_modules: Sequence[type[nn.Module]]
) -> _Folded:
    """Trace ``work`` (a copy, eval mode), propagate shapes (that forward's outputs are kept for
    the self-check), fold."""
    traced = trace(work, leaf_modules, inputs)
    gm = traced.gm
    removed = remove_eval_identities(gm)  # ShapeProp interprets the graph: no recompile needed
    try:
        with torch.no_grad():
            out = ShapeProp(gm).propagate(*clone_inputs(inputs))
    except Exception as exc:
        raise FoldError(
            f"the example inputs ({_shapes(inputs)}) don't run through {type(work).__name__} "
            f"({type(exc).__name__}: {exc}); fix: pass inputs shaped like the model's real input, "
            "with a batch dimension (e.g. torch.randn(2, C, H, W))"
        ) from exc
    outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    memo64: dict[int, torch.Tensor] = {}
    entries, chains, exact = fold_graph(gm, untraceable=traced.untraceable, memo64=memo64)
    rename_entries([*entries, *chains], traced.renames)
    gm.eval()
    return _Folded(gm, entries, chains, removed, exact, outputs, memo64, _trace_notes(traced))


def _trace_notes(traced: Traced) -> list[str]:
    """What the trace changed: names renamed, shapes the forward branched on."""
    notes = [
        f"the submodule {old!r} is called {new!r} in the folded module (torch.fx.GraphModule "
        f"reserves the name {old!r})"
        for new, old in traced.renames.items()
    ]
    if traced.specialized:
        notes.append(
            "the forward branches on tensor shapes; it was traced with the example inputs, so the "
            "folded module takes the branches they took and a torch._assert refuses inputs that "
            f"would take another: {'; '.join(traced.specialized)}"
        )
    return notes


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
    propagate shapes (channel dims, ranks, dtypes) and for the self-check (``verify``; see the
    module docstring; ``report.verification`` holds its numbers, or a note says it was skipped).
    ``leaf_modules``: module types traced as black
    boxes (for code torch.fx can't trace). ``strict``: raise `FoldError` if any BatchNorm is left.
    Non-finite or negative statistics, a NaN temperature, a folded weight that overflows the layer's
    dtype: `FoldError` naming the layer, the values and the fix.
    """
    if not isinstance(model, nn.Module):
        raise FoldError(f"fold_model needs a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_tuple(example_inputs)
    was_training = any(m.training for m in model.modules())
    # The copy shares the model's Parameters while folding (nothing writes to them, and most are
    # replaced); the result gets its own copies of those it keeps (`_own_parameters`).
    originals = {id(p): p for p in model.parameters()}
    work = copy.deepcopy(model, dict(originals)).eval()
    fold = _fold_copy(work, inputs, leaf_modules)
    gm, entries, chains, removed = fold.gm, fold.entries, fold.chains, fold.removed
    report = FoldReport(entries=entries, chains=chains, notes=list(fold.notes))
    if was_training:
        report.notes.append(TRAIN_MODE_NOTE)
    if removed:
        report.notes.append(
            f"removed {removed} op(s) that are the identity in eval mode (Dropout, Identity)"
        )
    if verify:
        batch_stats = any(e.reason_code in BATCH_STATISTICS for e in entries)
        report.verification = self_check(
            work,
            gm,
            inputs,
            exact=fold.exact,
            draw=fold.reference_outputs,
            one_sample=not batch_stats,
            memo64=fold.memo64,
        )
    else:
        report.notes.append(NO_VERIFY_NOTE)
    if strict and report.left:
        listed = "; ".join(f"{e.bn}: {e.reason}" for e in report.left)
        raise FoldError(f"{len(report.left)} BatchNorm(s) could not be folded: {listed}")
    _own_parameters(gm, originals)
    return FoldResult(gm, report)


def _own_parameters(module: nn.Module, originals: Mapping[int, nn.Parameter]) -> None:
    """Replace every Parameter of ``module`` that is one of ``originals`` (the input model's) by a
    deep copy, once per Parameter (tied parameters stay tied)."""
    memo: dict[int, Any] = {}
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and id(p) in originals:
                m._parameters[name] = copy.deepcopy(p, memo)
