"""Fold BatchNorm — with temperature and any constant scale/shift chain after it — into the adjacent
Conv/ConvTranspose/Linear layer of any traceable PyTorch model, and report every BatchNorm.

``fold_model(model, example_inputs)`` copies the model (its modules; the Parameters it keeps are
copied at the end, the folded ones are new), traces it with torch.fx, propagates shapes with the
example inputs, applies the patterns of `bnexport.fold.patterns` by rewriting *nodes* (a shared
module is never mutated), checks the fold (:func:`self_check`), and returns
``FoldResult(module, report)``. Math: `bnexport.fold.math`.

**Self-check.** Folding is exact algebra, so the folded graph, run in float64 with the fold's own
float64 parameters (kept before their one cast), must agree with the unfolded model in float64 to
float64 rounding. How much rounding a model amplifies is measured, not assumed: the unfolded
model's own error in its dtype (fp32) against float64 is ``N``, so float64 rounding accounts for
about ``N · eps64/eps32``. The check is the parity rule (`bnexport.parity.tolerance.NoiseTolerance`)
with ``ρ = eps64/eps_model``: an ill-conditioned but
correct fold passes (its ``N`` is large), a fold without ``eps``, along the wrong axis or without
the bias fails by many orders of magnitude. The returned module's weights are rounded to the
layer's dtype, which a float64 comparison would count as error: hence the float64 parameters. The
check costs two float64 forwards of one sample; the fp32 draw of ``N`` is the shape-propagation
forward's.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_leaves

from bnexport.errors import FoldError
from bnexport.fold.batchnorm import BNParams, register_batchnorm
from bnexport.fold.graph import float64_copy
from bnexport.fold.passes import fold_graph
from bnexport.fold.patterns import PATTERNS, Pattern, Rule
from bnexport.fold.report import REASONS, ChainEntry, FoldEntry, FoldReport
from bnexport.fold.trace import remove_eval_identities, trace

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


#: A Linear weight at least this large stays in its dtype in `run_float64`: converting it whole
#: means allocating (and paging in) 8 bytes per element, which on a large head (vgg's 0.4 GB
#: classifier) costs several times the forward itself; it is converted a block of rows at a time.
LARGE_WEIGHT = 1 << 22
_BLOCK = 1 << 19  # elements per converted block (4 MB in float64)


class _BlockwiseFloat64Linear(torch.overrides.TorchFunctionMode):
    """``F.linear`` of a float64 input with a weight in another dtype, in exact float64: the
    weight is converted a block of output rows at a time into a small reused buffer."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is not F.linear:
            return func(*args, **kwargs)
        x, weight = args[:2]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if x.dtype != torch.float64 or weight.dtype == torch.float64:
            return func(*args, **kwargs)
        out = x.new_empty(*x.shape[:-1], weight.shape[0])
        rows = max(1, _BLOCK // max(1, weight.shape[1]))
        for start in range(0, weight.shape[0], rows):
            block = weight[start : start + rows].double()
            torch.matmul(x, block.T, out=out[..., start : start + rows])
        return out if bias is None else out.add_(bias.double())


def run_float64(
    module: nn.Module,
    inputs: Sequence[Any],
    overrides: Mapping[str, torch.Tensor] | None = None,
    memo: dict[int, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """``module``'s output tensors with every floating parameter and buffer in float64 (as
    ``deepcopy(module).double()`` would give, without copying the module: a fold's check on a
    large model is then two forwards, not two deep copies); ``overrides`` replace parameters by
    path (the fold's exact float64 values); ``memo`` (tensor id → float64 copy) lets a second
    call reuse the copies of the tensors both modules share (the unfolded layers). Linear
    weights of `LARGE_WEIGHT` elements or more are converted block by block as they are used."""
    memo = {} if memo is None else memo
    large = {
        f"{path}.weight" if path else "weight"
        for path, m in module.named_modules(remove_duplicate=False)
        if isinstance(m, nn.Linear)
        and type(m).forward is nn.Linear.forward
        and m.weight.numel() >= LARGE_WEIGHT
    }

    def as64(name: str, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point() or name in large:
            return t
        return float64_copy(t, memo)

    overrides = overrides or {}
    state = {
        name: overrides[name].double() if name in overrides else as64(name, t)
        for name, t in [
            *module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False),
        ]
    }
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad(), _BlockwiseFloat64Linear():
            out = torch.func.functional_call(module, state, _clone(inputs))
    finally:
        for m, training in modes:
            m.training = training
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _first_sample(inputs: Sequence[Any]) -> tuple[Any, ...] | None:
    """The first sample of a batch of inputs (every tensor batch-first, one batch size ≥ 2), or
    None when there is no such batch to cut."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if not tensors or any(x.dim() == 0 for x in tensors):
        return None
    batches = {int(x.shape[0]) for x in tensors}
    if len(batches) != 1 or batches.pop() < 2:
        return None
    return tuple(x[:1] if isinstance(x, torch.Tensor) else x for x in inputs)


def _outputs(module: nn.Module, inputs: Sequence[Any]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = module(*_clone(inputs))
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def self_check(
    reference: nn.Module,
    folded: nn.Module,
    inputs: Sequence[Any],
    rule: Any = None,
    *,
    exact: Mapping[str, torch.Tensor] | None = None,
    draw: Sequence[torch.Tensor] | None = None,
    one_sample: bool = True,
    memo64: dict[int, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Check ``folded`` against ``reference`` (unfolded, in its own dtype), both run in float64,
    ``folded`` with its folded parameters' ``exact`` float64 values (no rounding to fp32).

    With ``one_sample`` it runs on the first sample of the example batch (the fold is exact
    algebra, so one sample checks every channel; two float64 forwards of one sample cost one of
    the batch of two); not for a model whose output depends on the batch (batch statistics).
    Per output: ``E`` = the float64 fold's error against the float64 forward of ``reference``,
    ``N`` = ``reference``'s own error in its dtype (``draw``: its outputs on ``inputs``, if
    already computed; ``memo64``: float64 copies of its parameters already made, by tensor id),
    decided by ``rule`` (default
    `NoiseTolerance()`) with ``ρ = eps64 / eps_dtype``. Returns the measurements; `FoldError`
    when the rule fails, saying what it means.
    """
    import numpy as np

    from bnexport.parity.tolerance import NoiseTolerance, relative_error

    rule = rule or NoiseTolerance()
    one = _first_sample(inputs) if one_sample else None
    if one is not None:  # exact algebra: one sample sees every channel, at half the cost
        inputs = one
        draw = [t[:1] for t in draw] if draw is not None else None
    dtype = _lowest_precision(reference)
    eps = float(torch.finfo(dtype).eps)
    rho = float(torch.finfo(torch.float64).eps) / eps
    xs64 = tuple(
        x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs
    )
    # The unfolded layers both share are converted once (``memo64``: copies the fold made).
    memo: dict[int, torch.Tensor] = {} if memo64 is None else memo64
    truth = run_float64(reference, xs64, memo=memo)
    got = run_float64(folded, xs64, exact, memo=memo)
    if len(truth) != len(got) or any(t.shape != g.shape for t, g in zip(truth, got, strict=False)):
        raise FoldError(
            "the folded module's outputs differ in number or shape from the original's; this is "
            "a bnexport bug: please report it with the model"
        )
    # One draw of the model's own rounding: per-sample runs would be another, but not for models
    # whose eval output depends on the batch (BatchNorm without running statistics).
    if draw is None or [d.shape for d in draw] != [t.shape for t in truth]:
        draw = _outputs(reference, inputs)
    draws = [list(draw)]
    worst: dict[str, Any] | None = None
    for k, (t, g) in enumerate(zip(truth, got, strict=True)):
        if not t.is_floating_point():
            err, noise = (0.0 if torch.equal(t, g) else float("inf")), 0.0
        else:
            tn = t.detach().numpy()
            err = relative_error(g.detach().numpy(), tn).value
            noise = max(
                relative_error(d[k].detach().double().numpy(), tn).value
                for d in draws
                if len(d) > k and d[k].shape == t.shape
            )
        limit = rule.limit(noise, eps, rho)
        row = {
            "output": k,
            "error": err,
            "noise": noise,
            "floor": rule.floor(noise, eps) * rho,
            "limit": limit,
            "passed": rule.passes(err, noise, eps, rho),
        }
        if worst is None or (not row["passed"], err / limit) > (
            not worst["passed"],
            worst["error"] / worst["limit"],
        ):
            worst = row
    assert worst is not None
    result = {
        "rule": "noise",
        "factor": rule.factor,
        "precision": rho,
        "dtype": str(dtype).removeprefix("torch."),
        "relative_error": worst["error"],
        "noise_floor": worst["floor"],
        "limit": worst["limit"],
        "passed": worst["passed"],
    }
    if not worst["passed"]:
        again = run_float64(reference, xs64)
        deterministic = all(
            bool(np.array_equal(a.numpy(), b.numpy(), equal_nan=a.is_floating_point()))
            for a, b in zip(truth, again, strict=True)
        )
        raise FoldError(_self_check_message(result, deterministic))
    return result


def _self_check_message(result: dict[str, Any], deterministic: bool) -> str:
    head = (
        f"fold self-check failed: in float64 the folded model differs from the original by "
        f"{result['relative_error']:.3g} of the output scale, "
        f"{result['relative_error'] / result['noise_floor']:.3g}× what float64 rounding explains "
        "on "
        f"this model ({result['noise_floor']:.3g}: its {result['dtype']} error × eps64/eps); the "
        f"limit is {result['factor']:g}×. Folding is exact algebra, so the folded graph computes "
        "something else"
    )
    if not deterministic:
        return (
            head + ": the model is not deterministic in eval mode (two float64 runs differ), so "
            "no fold can be checked this way; pass --no-verify (verify=False) to skip the check"
        )
    return (
        head + "; the model is deterministic, so this is a bnexport bug: please report it with the "
        "fold report (--report-json). --no-verify (verify=False) skips the check"
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


def _fold_copy(
    work: nn.Module, inputs: Sequence[Any], leaf_modules: Sequence[type[nn.Module]]
) -> _Folded:
    """Trace ``work`` (a copy, eval mode), propagate shapes (that forward's outputs are kept for
    the self-check), fold."""
    traced = trace(work, leaf_modules)
    gm = traced.gm
    removed = remove_eval_identities(gm)  # ShapeProp interprets the graph: no recompile needed
    try:
        with torch.no_grad():
            out = ShapeProp(gm).propagate(*_clone(inputs))
    except Exception as exc:
        raise FoldError(
            f"the example inputs ({_shapes(inputs)}) don't run through {type(work).__name__} "
            f"({type(exc).__name__}: {exc}); fix: pass inputs shaped like the model's real input, "
            "with a batch dimension (e.g. torch.randn(2, C, H, W))"
        ) from exc
    outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    memo64: dict[int, torch.Tensor] = {}
    entries, chains, exact = fold_graph(gm, untraceable=traced.untraceable, memo64=memo64)
    gm.eval()
    return _Folded(gm, entries, chains, removed, exact, outputs, memo64)


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
    report = FoldReport(entries=entries, chains=chains)
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
