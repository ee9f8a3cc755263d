"""How much a parity check feeds: sample counts and batch sizes sized to the model's cost, never
to measured time, so the same check on the same files feeds the same samples on an idle machine
and a busy one.

The model's cost per sample is counted on one forward of the reference (`ModelCost`: the FLOPs of
its convolutions and matrix products, the values its ops write, and how many ops it calls) and
turned into nominal seconds on the CPU the defaults were measured on (`NOMINAL_GFLOPS`,
`NOMINAL_ELEMENTS_PER_S`, the per-call costs). A default check is sized to
``DEFAULT_TIME_BUDGET_S`` of such seconds, shedding in this order until it fits:

1. everything: every edge case (and the bundled images), the random samples asked for, batch
   sizes 1, 7 and 64;
2. the largest default batch size goes, and random samples shrink, down to
   ``MIN_RANDOM_SAMPLES``;
3. the core check: the core edge cases (`CORE_EDGE_CASES`: all zeros, ±large with random
   signs) and ``MIN_RANDOM_SAMPLES`` random samples, or one when even that does not fit.

The report's note says what was checked and why (the model's cost, the budget), with
``--samples N`` as the way to more. What the user fixed (``--samples``, ``--inputs``,
``--batch-sizes``) is fed as asked.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from bnexport.defaults import DEFAULT_CHECK_BATCH_SIZES
from bnexport.errors import BnexportError, ParityInputError
from bnexport.parity.config import DEFAULT_TIME_BUDGET_S, CheckConfig
from bnexport.parity.inputs import CORE_EDGE_CASES, InputConfig, ParityInputs, build_inputs
from bnexport.runners import TorchRunner
from bnexport.signature import TensorSpec

#: Samples of the forward the cost is counted on.
PROBE_SAMPLES = 1
#: Nominal speeds of the CPU the defaults were measured on (2 cores; `docs/parity.md`): fp32
#: convolution/matrix FLOPs per second, values written per second by the other ops, and the cost
#: of one op call in PyTorch eager and in onnxruntime. They turn a counted cost into seconds; they
#: are never measured at run time.
NOMINAL_GFLOPS = 40.0
NOMINAL_ELEMENTS_PER_S = 0.5e9
TORCH_CALL_S = 20e-6
ORT_CALL_S = 2e-6
#: The float64 truth's cost per sample as a multiple of fp32's (measured 1.5–7× on the zoo).
FLOAT64_COST = 6.0
#: Fewest random samples a default check feeds (steps 2 and 3 of the module docstring; one when
#: even the core check does not fit).
MIN_RANDOM_SAMPLES = 2


@dataclass(frozen=True)
class ModelCost:
    """What one sample of the reference's forward costs, counted, not timed (`count_cost`)."""

    flops: float  # convolution and matrix-product FLOPs (torch.utils.flop_counter)
    elements: float  # values written by every op
    ops: int  # op calls of one forward
    counted: bool = (
        True  # False: estimated from the parameter count (the forward cannot be counted)
    )

    def seconds(
        self, batch: int, *, dtype_factor: float = 1.0, call_s: float = TORCH_CALL_S
    ) -> float:
        """Nominal seconds per sample of one run at ``batch``."""
        compute = self.flops / (NOMINAL_GFLOPS * 1e9) + self.elements / NOMINAL_ELEMENTS_PER_S
        return dtype_factor * compute + self.ops * call_s / batch

    def describe(self) -> str:
        """``0.36 GFLOP a sample`` (``~`` when estimated from the parameters)."""
        approx = "" if self.counted else "~"
        return f"{approx}{self.flops / 1e9:.2g} GFLOP a sample"

    def to_dict(self) -> dict[str, Any]:
        return {
            "flops": self.flops,
            "elements": self.elements,
            "ops": self.ops,
            "counted": self.counted,
        }


@dataclass(frozen=True)
class InputPlan:
    """What a default check feeds (`plan_inputs`)."""

    random: int  # random samples
    core_edge_cases_only: bool  # step 3: only `CORE_EDGE_CASES`
    all_batch_sizes: bool  # step 1: everything fits with the default batch sizes


def plan_inputs(
    seconds_per_sample: float,
    fixed_samples: int,
    *,
    random_count: int,
    core_samples: int | None = None,
    budget_s: float = DEFAULT_TIME_BUDGET_S,
) -> InputPlan:
    """What to feed a model whose check costs ``seconds_per_sample`` per sample fed (every run
    summed: fp32 twice, float64, each candidate at each batch size).

    The ``fixed_samples`` (edge cases, images) are fed when they leave room for
    ``MIN_RANDOM_SAMPLES`` random ones, and random samples fill the rest of ``budget_s``, up to
    ``random_count``. Otherwise, when ``core_samples`` is given (the edge cases are the default
    ones), the check is the core one: the ``core_samples`` and ``MIN_RANDOM_SAMPLES`` random
    samples, or one if even that does not fit.
    """
    per_sample = max(seconds_per_sample, 1e-9)
    room = int(budget_s / per_sample)
    all_fit = (fixed_samples + random_count) * per_sample <= budget_s
    floor = min(MIN_RANDOM_SAMPLES, random_count)
    if core_samples is not None and room < fixed_samples + floor:
        # the core check: its edge cases and the random floor, or one sample if that is too much
        random = floor if room >= core_samples + floor else min(1, random_count)
        return InputPlan(random=random, core_edge_cases_only=True, all_batch_sizes=all_fit)
    random = max(min(random_count, room - fixed_samples), floor)
    return InputPlan(random=random, core_edge_cases_only=False, all_batch_sizes=all_fit)


def build_sized_inputs(
    ref_runner: TorchRunner,
    in_specs: Sequence[TensorSpec],
    config: CheckConfig,
    batch_sizes: tuple[int, ...] | None,
    normalize: Any,
    input_shape: Any,
    *,
    n_ort: int,
    truth_runner: TorchRunner | None = None,
) -> tuple[ParityInputs, tuple[int, ...], list[str]]:
    """The inputs and batch sizes to run: the configured ones, or sized to the model's counted
    cost (`count_cost`, `plan_inputs`): a check runs fp32 three times (the largest batch, batch
    1, the reordered sums), ``truth_runner`` (float64), one torch candidate and ``n_ort``
    onnxruntime runners per batch size."""
    wanted = config.inputs.random_count if config.samples is None else config.samples
    inputs_cfg = replace(config.inputs, random_count=wanted)
    build = functools.partial(build_inputs, in_specs, normalize=normalize, input_shape=input_shape)
    as_asked = config.samples is not None or inputs_cfg.inputs_file is not None
    if as_asked and batch_sizes:
        return build(inputs_cfg), batch_sizes, []
    probe = build(_probe_config(inputs_cfg))
    cost = count_cost(ref_runner, probe)
    fixed, n_edge = _fixed_samples(inputs_cfg, probe, build)
    sizes = batch_sizes or DEFAULT_CHECK_BATCH_SIZES
    per_sample = check_seconds(cost, sizes, n_ort=n_ort, truth=truth_runner is not None)
    core = None  # the fixed samples of the core check (the default edge cases only)
    if n_edge and not as_asked:
        core = fixed - n_edge + len(CORE_EDGE_CASES)
    plan = plan_inputs(
        per_sample, fixed, random_count=wanted, core_samples=core, budget_s=config.time_budget_s
    )
    random = wanted if as_asked else plan.random
    if batch_sizes is None:
        batch_sizes = DEFAULT_CHECK_BATCH_SIZES[: None if plan.all_batch_sizes else 2]
    if inputs_cfg.inputs_file is not None:
        return probe, batch_sizes, []
    inputs_cfg = replace(
        inputs_cfg, random_count=random, core_edge_cases_only=plan.core_edge_cases_only
    )
    inputs = build(inputs_cfg)
    inputs.plan = {
        "cost": cost.to_dict(),
        "nominal_seconds_per_sample": per_sample,
        "budget_s": config.time_budget_s,
        "random": random,
        "random_asked": wanted,
        "core_edge_cases_only": plan.core_edge_cases_only,
    }
    if as_asked:  # --samples: fed as asked, only the batch sizes were sized
        return inputs, batch_sizes, []
    shed = random < wanted or plan.core_edge_cases_only
    return inputs, batch_sizes, [plan_note(cost, inputs, wanted, n_edge, shed, config)]


def plan_note(
    cost: ModelCost, inputs: ParityInputs, wanted: int, n_edge: int, shed: bool, config: CheckConfig
) -> str:
    """What a default check feeds and why, in one line (fits 100 columns after "note: ")."""
    fed = f"all {inputs.size} samples"
    if shed:
        edge = int(inputs.edge_case_mask().sum())
        random = sum(s.size for s in inputs.sets if s.name == "random")
        fed = f"{random} of {wanted} random, {edge} of {n_edge} edge cases"
    return f"plan: {fed} ({cost.describe()}; budget {config.time_budget_s:.3g} s; --samples N)"


def check_seconds(cost: ModelCost, batch_sizes: Sequence[int], *, n_ort: int, truth: bool) -> float:
    """Nominal seconds a check spends per sample fed: PyTorch fp32 at the largest batch size
    (the reference, the reordered draw, the folded candidate) and at batch 1, the float64 truth,
    and each onnxruntime runner at each batch size."""
    big = max(batch_sizes)
    seconds = 3 * cost.seconds(big) + cost.seconds(1)
    if truth:
        seconds += cost.seconds(big, dtype_factor=FLOAT64_COST)
    seconds += n_ort * sum(cost.seconds(b, call_s=ORT_CALL_S) for b in batch_sizes)
    return seconds


def count_cost(runner: TorchRunner, probe: ParityInputs) -> ModelCost:
    """The reference's cost per sample, counted on one forward of `PROBE_SAMPLES` samples of
    ``probe``; estimated from the parameter count (2 FLOPs each) when the forward cannot run
    under PyTorch's dispatch modes."""
    from torch.utils.flop_counter import FlopCounterMode

    arrays = probe.arrays()
    feed = {k: v[:PROBE_SAMPLES] for k, v in arrays.items()}
    n = max(1, next(iter(feed.values())).shape[0]) if feed else 1
    counts: dict[str, float] = {}
    try:
        with FlopCounterMode(display=False) as flops, op_counter(counts):
            runner.infer(feed)
    except BnexportError:
        raise
    except Exception as exc:
        _raise_if_the_model_fails(runner, feed, exc)
        params = sum(p.numel() for p in runner.model.parameters())
        return ModelCost(2.0 * params, 0.0, len(list(runner.model.modules())), counted=False)
    return ModelCost(
        flops.get_total_flops() / n, counts["elements"] / n, int(counts["ops"]), counted=True
    )


def op_counter(counts: dict[str, float]) -> Any:
    """A ``TorchDispatchMode`` that adds up the op calls (``counts["ops"]``) and the values they
    write (``counts["elements"]``)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    counts.update(ops=0, elements=0)

    class OpCounter(TorchDispatchMode):
        def __torch_dispatch__(
            self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
        ) -> Any:
            out = func(*args, **(kwargs or {}))
            counts["ops"] += 1
            counts["elements"] += sum(
                t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)
            )
            return out

    return OpCounter()


def _raise_if_the_model_fails(runner: TorchRunner, feed: dict[str, Any], exc: Exception) -> None:
    """A forward that fails without the counting modes too is bad input, not a counting issue."""
    try:
        runner.infer(feed)
    except BnexportError:
        raise
    except Exception as plain:
        raise ParityInputError(
            f"{runner.name} fails on the inputs: "
            f"{type(plain).__name__}: {' '.join(str(plain).split())}"
        ) from None
    del exc


def _probe_config(config: InputConfig) -> InputConfig:
    """The inputs the cost is counted on: a few random samples (or the given file)."""
    if config.inputs_file is not None:
        return config
    return replace(
        config, random_count=PROBE_SAMPLES, edge_cases=False, bundled=False, data_dir=None
    )


def _fixed_samples(
    config: InputConfig, probe: ParityInputs, build: Callable[[InputConfig], ParityInputs]
) -> tuple[int, int]:
    """``(samples fed whatever the budget, how many of them are edge cases)``: edge cases,
    images, or the given file."""
    if config.inputs_file is not None:
        return probe.size, 0
    try:
        fixed = build(replace(config, random_count=0))
    except ParityInputError:  # random samples only (a bad --data fails the real build too)
        return 0, 0
    return fixed.size, int(fixed.edge_case_mask().sum())
