"""`fold_model`: copy, trace, fold, self-check — and when the self-check fails, localize the fold
step that broke, leave that BatchNorm unfolded and fold again, so the result always checks exact.
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
from bnexport.fold.children import fold_children
from bnexport.fold.context import Probe
from bnexport.fold.localize import Localization, StepCheck, localize
from bnexport.fold.passes import fold_graph
from bnexport.fold.report import ChainEntry, FoldEntry, FoldReport, rename_entries, renamed_back
from bnexport.fold.trace import ForwardNotTraceable, Traced, remove_eval_identities, trace
from bnexport.fold.verify import check_inputs, clone_inputs, measure_fold

#: Reasons meaning a BatchNorm normalizes with each batch's statistics (a batch-dependent output).
BATCH_STATISTICS = frozenset({"untracked_stats", "functional_training"})

#: How many fold steps may be left unfolded, one at a time, to make the fold check exact.
MAX_EXCLUDED = 8

NO_VERIFY_NOTE = "the float64 self-check was skipped (--no-verify / verify=False)"

TRAIN_MODE_NOTE = (
    "the model was in train mode: it was folded with eval semantics (BatchNorm running statistics, "
    "dropout off); the folded module is in eval mode and matches the original's eval()"
)


@dataclass
class FoldResult:
    """The folded module (in eval mode, called like the original: a GraphModule, or the model's
    own class with folded children when its forward can't be traced) and its report."""

    module: nn.Module
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
    reference: fx.GraphModule  # the traced graph before folding (for localization)
    entries: list[FoldEntry]
    chains: list[ChainEntry]
    removed: int  # eval identities removed
    exact: dict[str, torch.Tensor]  # folded parameters in float64, by path
    probes: list[Probe]  # the fold steps, for localization
    reference_outputs: list[torch.Tensor]  # the unfolded model's outputs on the example inputs
    memo64: dict[int, torch.Tensor]  # float64 copies of the original parameters the fold read
    traced: Traced

    @property
    def one_sample(self) -> bool:
        """Whether one sample checks the fold (no BatchNorm uses batch statistics)."""
        return not any(e.reason_code in BATCH_STATISTICS for e in self.entries)


def _fold_copy(
    work: nn.Module,
    inputs: Sequence[Any],
    leaf_modules: Sequence[type[nn.Module]],
    excluded: Mapping[str, str] | None = None,
) -> _Folded:
    """Trace ``work`` (a copy, eval mode), propagate shapes (that forward's outputs are kept for
    the self-check), fold all but the ``excluded`` BatchNorms (graph name → reason)."""
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
    reference = fx.GraphModule(gm, copy.deepcopy(gm.graph), type(work).__name__)
    memo64: dict[int, torch.Tensor] = {}
    entries, chains, ctx = fold_graph(
        gm, untraceable=traced.untraceable, memo64=memo64, excluded=excluded
    )
    rename_entries([*entries, *chains], traced.renames)
    gm.eval()
    return _Folded(
        gm, reference, entries, chains, removed, ctx.exact, ctx.probes, outputs, memo64, traced
    )


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


def localize_fold(fold: _Folded, inputs: Sequence[Any]) -> Localization:
    """Compare every fold step of ``fold`` with the unfolded graph (`bnexport.fold.localize`) on
    the self-check's inputs; names as the report shows them."""
    loc = localize(
        fold.reference,
        fold.gm,
        fold.probes,
        check_inputs(inputs, fold.one_sample),
        fold.exact,
        fold.memo64,
    )
    for step in loc.steps:
        step.bn = renamed_back(step.bn, fold.traced.renames)
        step.into = renamed_back(step.into, fold.traced.renames)
    return loc


def _measure(work: nn.Module, fold: _Folded, inputs: Sequence[Any]) -> dict[str, Any]:
    return measure_fold(
        work,
        fold.gm,
        inputs,
        exact=fold.exact,
        draw=fold.reference_outputs,
        one_sample=fold.one_sample,
        memo64=fold.memo64,
    )


def _excluded_reason(step: StepCheck) -> str:
    return (
        f"folding it into {step.into} failed the float64 self-check: that step's output differs "
        f"from the unfolded model's by {step.error:.3g} of its scale, {step.ratio():.3g}× what "
        f"float64 rounding explains there (limit {step.limit / step.floor:g}×); left unfolded so "
        "the rest of the fold checks exact. This is a bnexport bug: please report it with the model"
    )


def _checked_fold(
    work: nn.Module,
    fold: _Folded,
    inputs: Sequence[Any],
    leaf_modules: Sequence[type[nn.Module]],
) -> tuple[_Folded, dict[str, Any], Localization | None]:
    """Self-check ``fold``; while it fails, localize the step that broke, leave it unfolded and
    fold again (at most `MAX_EXCLUDED` steps). `FoldError` when that doesn't make it exact."""
    excluded: dict[str, str] = {}
    loc: Localization | None = None
    result = _measure(work, fold, inputs)
    while not result["passed"]:
        message = result.pop("message")
        if not result.get("deterministic", True) or len(excluded) >= MAX_EXCLUDED:
            raise FoldError(message)
        loc = localize_fold(fold, inputs)
        step = loc.first_failing
        if step is None or step.key in excluded:
            raise FoldError(f"{message} (no single fold step diverges on its own)")
        excluded[step.key] = _excluded_reason(step)
        fold = _fold_copy(work, inputs, leaf_modules, excluded)
        result = _measure(work, fold, inputs)
    if excluded:
        result["excluded"] = sorted(renamed_back(k, fold.traced.renames) for k in excluded)
    return fold, result, loc


def fold_model(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Sequence[type[nn.Module]] = (),
    verify: bool = True,
    strict: bool = False,
    localize: bool = False,
) -> FoldResult:
    """Fold every foldable BatchNorm of ``model`` (never modified) and report all of them.

    ``example_inputs``: a tensor or tuple of positional inputs (a batch of 2 is plenty), used to
    trace (control flow on shapes takes their branches), propagate shapes (channel dims, ranks,
    dtypes) and for the self-check (``verify``; `bnexport.fold.verify`; ``report.verification``
    holds its numbers, or a note says it was skipped). A fold step that fails the self-check is
    localized, left unfolded with the reason, and the rest folded again. ``localize``: compare
    every fold step with the unfolded model in float64 (``report.localization``) even when the
    check passes. ``leaf_modules``: module types traced as black boxes (for code torch.fx can't
    trace). ``strict``: raise `FoldError` if any BatchNorm is left. Non-finite or negative
    statistics, a NaN temperature, a folded weight that overflows the layer's dtype: `FoldError`
    naming the layer, the values and the fix.
    """
    if not isinstance(model, nn.Module):
        raise FoldError(f"fold_model needs a torch.nn.Module, got {type(model).__name__}")
    inputs = _as_tuple(example_inputs)
    was_training = any(m.training for m in model.modules())
    # The copy shares the model's Parameters while folding (nothing writes to them, and most are
    # replaced); the result gets its own copies of those it keeps (`_own_parameters`).
    originals = {id(p): p for p in model.parameters()}
    work = copy.deepcopy(model, dict(originals)).eval()
    try:
        fold = _fold_copy(work, inputs, leaf_modules)
    except ForwardNotTraceable as exc:  # fold each child on its own
        options = {"leaf_modules": leaf_modules, "verify": verify, "localize": localize}
        report, module = _fold_by_children(work, inputs, exc, options)
        return _finish(module, report, was_training, strict, originals)
    verification, loc = None, None
    if verify:
        fold, verification, loc = _checked_fold(work, fold, inputs, leaf_modules)
    if localize and loc is None:
        loc = localize_fold(fold, inputs)
    report = _report(fold, verification, loc)
    return _finish(fold.gm, report, was_training, strict, originals)


def _finish(
    module: nn.Module,
    report: FoldReport,
    was_training: bool,
    strict: bool,
    originals: Mapping[int, nn.Parameter],
) -> FoldResult:
    """The train-mode note, --strict, and the result's own copies of the Parameters it kept."""
    if was_training:
        report.notes.append(TRAIN_MODE_NOTE)
    if strict and report.left:
        listed = "; ".join(f"{e.bn}: {e.reason}" for e in report.left)
        raise FoldError(f"{len(report.left)} BatchNorm(s) could not be folded: {listed}")
    _own_parameters(module, originals)
    return FoldResult(module.eval(), report)


def _fold_by_children(
    work: nn.Module, inputs: tuple[Any, ...], exc: ForwardNotTraceable, options: dict[str, Any]
) -> tuple[FoldReport, nn.Module]:
    """`bnexport.fold.children`: each child folded and self-checked on its own; the report's
    verification is the child check closest to its limit."""
    cause = exc.__cause__ or exc
    why = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause) else ''}"
    done = fold_children(work, inputs, why, lambda m, args: fold_model(m, args, **options))
    report = FoldReport(entries=done.entries, chains=done.chains, notes=done.notes)
    if done.checks:
        worst = max(done.checks, key=lambda c: c["relative_error"] / c["limit"])
        report.verification = {**worst, "scope": "each folded child, the one closest to its limit"}
    elif not options["verify"]:
        report.notes.append(NO_VERIFY_NOTE)
    if options["localize"]:
        first = next((s["bn"] for s in done.steps if not s["passed"]), None)
        report.localization = {"rule": "noise", "steps": done.steps, "first_failing": first}
    return report, done.module


def _report(
    fold: _Folded, verification: dict[str, Any] | None, loc: Localization | None
) -> FoldReport:
    """The report of ``fold``, with its notes (trace, identities, skipped check)."""
    report = FoldReport(entries=fold.entries, chains=fold.chains, notes=_trace_notes(fold.traced))
    report.verification = verification
    report.localization = loc.to_dict() if loc is not None else None
    if fold.removed:
        report.notes.append(
            f"removed {fold.removed} op(s) that are the identity in eval mode (Dropout, Identity)"
        )
    if verification is None:
        report.notes.append(NO_VERIFY_NOTE)
    elif verification.get("excluded"):
        report.notes.append(
            "the float64 self-check failed; it was localized to the fold of "
            f"{', '.join(verification['excluded'])}, left unfolded, and the rest checks exact"
        )
    return report


def _own_parameters(module: nn.Module, originals: Mapping[int, nn.Parameter]) -> None:
    """Replace every Parameter of ``module`` that is one of ``originals`` (the input model's) by a
    deep copy, once per Parameter (tied parameters stay tied)."""
    memo: dict[int, Any] = {}
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and id(p) in originals:
                m._parameters[name] = copy.deepcopy(p, memo)
