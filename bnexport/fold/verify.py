"""The fold's float64 self-check: run the folded graph and the original in float64 and decide
whether they differ by more than float64 rounding explains.

Folding is exact algebra, so the folded graph, run in float64 with the fold's own float64
parameters (kept before their one cast), must agree with the unfolded model in float64 to float64
rounding. How much rounding a model amplifies is measured, not assumed, in two ways (each in
units of the model dtype's ``eps``, then scaled by ``ρ = eps64/eps``):

* ``N``, the unfolded model's own error in its dtype (fp32) against float64, on the check's sample;
* ``S``, its sensitivity: how far its float64 output moves when every floating input, parameter
  and buffer is multiplied by ``1 ± eps`` (random signs; the largest of a few seeded draws),
  i.e. conditioning × eps.

``N`` alone can be tiny by luck (fp32 exact on a one-element output) while the fold's float64
rounding is not: ``(conv(x) − μ)·s`` and ``conv_{W·s}(x) + b'`` cancel large terms when
``conv(x) ≈ μ``, so both round relative to the terms, not to the small output. ``S`` sees those
terms. The decision is the parity rule (`bnexport.noise.NoiseTolerance`) on ``max(N, S)``;
``S`` costs a few float64 forwards of one sample, so it is measured only when ``N`` alone would
fail the fold (the rule is monotone in the floor: the verdict is the same). An ill-conditioned but
correct fold passes; a fold without ``eps``, along the wrong axis or without the bias fails by
many orders of magnitude. The returned module's weights are rounded to the layer's dtype, which
a float64 comparison would count as error: hence the float64 parameters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from bnexport.errors import FoldError
from bnexport.fold.constants import float64_copy
from bnexport.noise import NoiseTolerance, relative_error

#: A Linear weight at least this large stays in its dtype in `run_float64`: converting it whole
#: means allocating (and paging in) 8 bytes per element, which on a large head (vgg's 0.4 GB
#: classifier) costs several times the forward itself; it is converted a block of rows at a time.
LARGE_WEIGHT = 1 << 22
_BLOCK = 1 << 19  # elements per converted block (4 MB in float64)

#: The ±eps perturbations that measure a model's sensitivity (`sensitivity`): their seed, and
#: how many draws (one float64 forward of one sample each; only when fp32's error alone would
#: fail the fold).
SENSITIVITY_SEED = 0
SENSITIVITY_DRAWS = 8


def clone_inputs(inputs: Sequence[Any]) -> tuple[Any, ...]:
    """Detached copies of the tensors among ``inputs`` (a forward may write to its inputs)."""
    return tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs)


def lowest_precision(module: nn.Module) -> torch.dtype:
    """The floating dtype of ``module``'s parameters with the largest eps (float32 if none)."""
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()} or {torch.float32}
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


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


def _large_linear_weights(module: nn.Module) -> set[str]:
    """Paths of the plain Linear weights of `LARGE_WEIGHT` elements or more."""
    return {
        f"{path}.weight" if path else "weight"
        for path, m in module.named_modules(remove_duplicate=False)
        if isinstance(m, nn.Linear)
        and type(m).forward is nn.Linear.forward
        and m.weight.numel() >= LARGE_WEIGHT
    }


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]


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
    large = _large_linear_weights(module)

    def as64(name: str, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point() or name in large:
            return t
        return float64_copy(t, memo)

    overrides = overrides or {}
    state = {
        name: overrides[name].double() if name in overrides else as64(name, t)
        for name, t in _named_tensors(module)
    }
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad(), _BlockwiseFloat64Linear():
            out = torch.func.functional_call(module, state, clone_inputs(inputs))
    finally:
        for m, training in modes:
            m.training = training
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def sensitivity(
    module: nn.Module,
    inputs64: Sequence[Any],
    truth: Sequence[torch.Tensor],
    eps: float,
    memo: dict[int, torch.Tensor] | None = None,
) -> list[float]:
    """Per output of ``module``: how far its float64 output moves from ``truth`` (its float64
    output on ``inputs64``), relative to the sample's scale, when every floating input, parameter
    and buffer is multiplied by ``1 ± eps`` (random signs): conditioning × eps, what rounding
    each value to ``eps`` can do. The largest of `SENSITIVITY_DRAWS` seeded draws: one draw is a
    sum of random signs and may land near zero by chance (on a small output it varies 100-fold
    from draw to draw). Tied tensors move together; Linear weights of `LARGE_WEIGHT` elements or
    more keep their values (their inputs still move)."""
    gen = torch.Generator().manual_seed(SENSITIVITY_SEED)
    worst = [0.0] * len(truth)
    for _ in range(SENSITIVITY_DRAWS):
        outputs = perturbed_forward(module, inputs64, eps, gen, memo)
        for k, (o, t) in enumerate(zip(outputs, truth, strict=True)):
            if t.is_floating_point():
                worst[k] = max(worst[k], relative_error(o.numpy(), t.numpy()).value)
    return worst


def perturbed_forward(
    module: nn.Module,
    inputs64: Sequence[Any],
    eps: float,
    gen: torch.Generator,
    memo: dict[int, torch.Tensor] | None,
) -> list[torch.Tensor]:
    """`run_float64` with every floating input, parameter and buffer times ``1 ± eps`` (random
    signs from ``gen``; tied tensors move together)."""
    moved: dict[int, torch.Tensor] = {}

    def nudge(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in moved:
            t64 = float64_copy(t, {} if memo is None else memo)
            signs = torch.empty(t64.shape, dtype=torch.float64).bernoulli_(0.5, generator=gen)
            moved[id(t)] = t64 * (1.0 + eps * (2.0 * signs - 1.0))
        return moved[id(t)]

    large = _large_linear_weights(module)
    overrides = {
        name: nudge(t)
        for name, t in _named_tensors(module)
        if t.is_floating_point() and name not in large
    }
    xs = tuple(
        nudge(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs64
    )
    return run_float64(module, xs, overrides, memo)


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
        out = module(*clone_inputs(inputs))
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def check_inputs(inputs: Sequence[Any], one_sample: bool) -> tuple[Any, ...]:
    """The inputs the self-check runs on: the first sample of the example batch with
    ``one_sample`` (the fold is exact algebra, so one sample checks every channel), else all."""
    one = _first_sample(inputs) if one_sample else None
    return tuple(inputs) if one is None else one


def self_check(
    reference: nn.Module,
    folded: nn.Module,
    inputs: Sequence[Any],
    rule: Any = None,
    **options: Any,
) -> dict[str, Any]:
    """Check ``folded`` against ``reference`` (`measure_fold`, which takes the same ``options``);
    `FoldError` when the rule fails, saying what it means. Returns the measurements."""
    result = measure_fold(reference, folded, inputs, rule, **options)
    if not result["passed"]:
        raise FoldError(result.pop("message"))
    return result


def measure_fold(
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
    """Measure ``folded`` against ``reference`` (unfolded, in its own dtype), both run in
    float64, ``folded`` with its folded parameters' ``exact`` float64 values (no rounding to fp32).

    With ``one_sample`` it runs on the first sample of the example batch (`check_inputs`); not
    for a model whose output depends on the batch (batch statistics).

    Per output: ``E`` = the float64 fold's error against the float64 forward of ``reference``;
    what float64 rounding explains is ``ρ · max(N, S)`` with ``ρ = eps64 / eps_dtype``, where
    ``N`` = ``reference``'s own error in its dtype (``draw``: its outputs on ``inputs``, if
    already computed) and ``S`` = its measured `sensitivity` to ±eps changes of every input,
    parameter and buffer (measured only when ``N`` alone fails: the verdict is the same).
    ``rule`` (default `NoiseTolerance()`) decides, never below its floor of a few ulps.
    ``memo64``: float64 copies of ``reference``'s parameters already made, by tensor id. A failed
    check adds ``message`` (what it means) and ``deterministic`` (two float64 runs agree).
    """
    rule = rule or NoiseTolerance()
    one = _first_sample(inputs) if one_sample else None
    if one is not None:  # exact algebra: one sample sees every channel, at half the cost
        inputs = one
        draw = [t[:1] for t in draw] if draw is not None else None
    dtype = lowest_precision(reference)
    eps = float(torch.finfo(dtype).eps)
    rho = float(torch.finfo(torch.float64).eps) / eps
    xs64 = float64_inputs(inputs)
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
    errors, noise = _errors_and_noise(truth, got, draw)
    worst = _worst(errors, noise, [0.0] * len(errors), rule, eps, rho)
    if not worst["passed"]:  # N alone may be small by luck: measure the conditioning
        sens = sensitivity(reference, xs64, truth, eps, memo)
        worst = _worst(errors, noise, sens, rule, eps, rho)
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
        deterministic = _deterministic(reference, xs64, truth)
        result["deterministic"] = deterministic
        result["message"] = _self_check_message(result, worst, deterministic)
    return result


def float64_inputs(inputs: Sequence[Any]) -> tuple[Any, ...]:
    """The floating tensors among ``inputs`` in float64 (the others as they are)."""
    return tuple(
        x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs
    )


def _errors_and_noise(
    truth: Sequence[torch.Tensor], got: Sequence[torch.Tensor], draw: Sequence[torch.Tensor]
) -> tuple[list[float], list[float]]:
    """Per output: the fold's error ``E`` and the model's own error ``N`` (its ``draw`` in its
    dtype), both relative to the float64 truth; an integer output is exact or infinitely wrong."""
    errors, noise = [], []
    for t, g, d in zip(truth, got, draw, strict=True):
        if not t.is_floating_point():
            errors.append(0.0 if torch.equal(t, g) else float("inf"))
            noise.append(0.0)
            continue
        tn = t.detach().numpy()
        errors.append(relative_error(g.detach().numpy(), tn).value)
        noise.append(relative_error(d.detach().double().numpy(), tn).value)
    return errors, noise


def _worst(
    errors: Sequence[float],
    noise: Sequence[float],
    sens: Sequence[float],
    rule: Any,
    eps: float,
    rho: float,
) -> dict[str, Any]:
    """The output that fails (or comes closest) under ``rule`` on ``max(N, S)``, with its
    numbers."""
    worst: dict[str, Any] | None = None
    for k, (err, n, s) in enumerate(zip(errors, noise, sens, strict=True)):
        floor = max(n, s)
        limit = rule.limit(floor, eps, rho)
        row = {
            "output": k,
            "error": err,
            "noise": n,
            "sensitivity": s,
            "floor": rule.floor(floor, eps) * rho,
            "limit": limit,
            "passed": rule.passes(err, floor, eps, rho),
        }
        if worst is None or (not row["passed"], err / limit) > (
            not worst["passed"],
            worst["error"] / worst["limit"],
        ):
            worst = row
    assert worst is not None
    return worst


def _deterministic(
    reference: nn.Module, xs64: Sequence[Any], truth: Sequence[torch.Tensor]
) -> bool:
    """Whether a second float64 forward of ``reference`` gives ``truth`` again, bit for bit."""
    import numpy as np

    again = run_float64(reference, xs64)
    return all(
        bool(np.array_equal(a.numpy(), b.numpy(), equal_nan=a.is_floating_point()))
        for a, b in zip(truth, again, strict=True)
    )


def _self_check_message(result: dict[str, Any], worst: dict[str, Any], deterministic: bool) -> str:
    head = (
        f"fold self-check failed: in float64 the folded model differs from the original by "
        f"{result['relative_error']:.3g} of the output scale, "
        f"{result['relative_error'] / result['noise_floor']:.3g}× what float64 rounding explains "
        f"on this model ({result['noise_floor']:.3g}: the larger of its {result['dtype']} error "
        f"{worst['noise']:.3g} and its sensitivity {worst['sensitivity']:.3g} to ±eps changes of "
        "every input and parameter, × eps64/eps, never below a few ulps); the limit is "
        f"{result['factor']:g}×. Folding is exact algebra, so the folded graph computes something "
        "else"
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
