"""How much a parity check feeds: sample counts and batch sizes sized to the model's cost.

The fp32 reference's forward is timed on a few samples (onnxruntime's too, and in a batch, when
call overhead dominates), the float64 truth's on one when it could matter, and a default check is
sized to ``DEFAULT_TIME_BUDGET_S`` of forwards, shedding in this order until it fits:

1. everything: every edge case (and the bundled images), the random samples asked for, batch
   sizes 1, 7 and 64;
2. the largest default batch size goes, and random samples shrink, down to
   ``MIN_RANDOM_SAMPLES``;
3. the core check: the core edge cases (`CORE_EDGE_CASES`: all zeros, ±large with random
   signs) and ``MIN_RANDOM_SAMPLES`` random samples, or one when even that does not fit.

Each step is named in the report's notes with ``--samples N`` as the way back. What the user
fixed (``--samples``, ``--inputs``, ``--batch-sizes``) is fed as asked.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from bnexport.defaults import DEFAULT_CHECK_BATCH_SIZES
from bnexport.errors import BnexportError, ParityInputError
from bnexport.parity.config import DEFAULT_TIME_BUDGET_S, CheckConfig
from bnexport.parity.inputs import CORE_EDGE_CASES, InputConfig, ParityInputs, build_inputs
from bnexport.runners import Runner, TorchRunner
from bnexport.signature import TensorSpec

#: Samples of the timed fp32 forward that sizes a default check (after a warm-up call on them).
PROBE_SAMPLES = 2
#: A probe call faster than this is mostly call overhead: the model is timed again on
#: ``AMORTIZED_SAMPLES`` samples for its cost per sample in a batch.
AMORTIZED_CALL_S = 0.01
AMORTIZED_SAMPLES = 32
#: The float64 truth's cost per sample as a multiple of fp32's, assumed for a model cheap enough
#: that timing it would cost more than it saves (measured 1.5–5.2× on the real-model zoo).
FLOAT64_COST_BOUND = 6.0
#: Fewest random samples a default check feeds (steps 2 and 3 of the module docstring; one when
#: even the core check does not fit).
MIN_RANDOM_SAMPLES = 2


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
    ort_runner: Runner | None = None,
) -> tuple[ParityInputs, tuple[int, ...], list[str]]:
    """The inputs and batch sizes to run: the configured ones, or sized to the model's cost
    (`plan_inputs`): a check runs fp32 twice, ``truth_runner`` (float64), one torch candidate
    and ``n_ort`` onnxruntime runners (timed on ``ort_runner``) per batch size."""
    wanted = config.inputs.random_count if config.samples is None else config.samples
    inputs_cfg = replace(config.inputs, random_count=wanted)
    build = functools.partial(build_inputs, in_specs, normalize=normalize, input_shape=input_shape)
    as_asked = config.samples is not None or inputs_cfg.inputs_file is not None
    if as_asked and batch_sizes:
        return build(inputs_cfg), batch_sizes, []
    probe = build(_probe_config(inputs_cfg))
    fp32_s, batched_s, ort_s, ort_batched_s = _probe_costs(ref_runner, ort_runner, probe)
    fixed, n_edge = _fixed_samples(inputs_cfg, probe, build)
    n_batches = len(batch_sizes or DEFAULT_CHECK_BATCH_SIZES)
    # PyTorch: an fp32 noise draw at batch 1, fp32 and the torch candidate batched; each
    # onnxruntime runner at batch 1 and at the other batch sizes
    per_sample = fp32_s + 2 * batched_s + n_ort * (ort_s + (n_batches - 1) * ort_batched_s)
    fp64_s = 0.0 if truth_runner is None else batched_s * FLOAT64_COST_BOUND
    if truth_runner is not None and (fixed + wanted) * (per_sample + fp64_s) > config.time_budget_s:
        fp64_s = _seconds_per_sample(truth_runner, probe, 1, warm=False)  # it may matter: time it
    per_sample += fp64_s
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
    notes = []
    if random < wanted or plan.core_edge_cases_only:
        shed = f"random samples {random} of {wanted}"
        if plan.core_edge_cases_only:
            shed += f", edge cases {len(CORE_EDGE_CASES)} of {n_edge}"
        notes.append(  # fits 100 columns after "note: "
            f"{shed} (forward {fp32_s * 1e3:.0f} ms, budget {config.time_budget_s:g} s; "
            "--samples N overrides)"
        )
    return build(inputs_cfg), batch_sizes, notes


def _probe_costs(
    ref_runner: Runner, ort_runner: Runner | None, probe: ParityInputs
) -> tuple[float, float, float, float]:
    """Seconds per sample: fp32 at batch 1 and batched, onnxruntime at batch 1 and batched.

    A call this fast is mostly overhead, so the model is timed again in a batch, and onnxruntime
    (whose overhead is far smaller) on its own; a slower model costs about the same in both.
    """
    fp32_s = _seconds_per_sample(ref_runner, probe, PROBE_SAMPLES)
    batched_s = ort_s = ort_batched_s = fp32_s
    if fp32_s * PROBE_SAMPLES < AMORTIZED_CALL_S:
        batched_s = min(fp32_s, _seconds_per_sample(ref_runner, probe, AMORTIZED_SAMPLES))
        if ort_runner is not None:
            try:
                ort_s = _seconds_per_sample(ort_runner, probe, PROBE_SAMPLES)
                ort_batched_s = min(
                    ort_s, _seconds_per_sample(ort_runner, probe, AMORTIZED_SAMPLES)
                )
            except ParityInputError:  # a failing session is a result: its own run reports it
                ort_s = ort_batched_s = fp32_s
    return fp32_s, batched_s, ort_s, ort_batched_s


def _probe_config(config: InputConfig) -> InputConfig:
    """The inputs the timed forward runs on: a few random samples (or the given file)."""
    if config.inputs_file is not None:
        return config
    return replace(
        config, random_count=PROBE_SAMPLES, edge_cases=False, bundled=False, data_dir=None
    )


def _seconds_per_sample(
    runner: Runner, probe: ParityInputs, samples: int, *, warm: bool = True
) -> float:
    """``runner``'s forward time per sample on ``samples`` samples of `probe`, after a warm-up
    call on them unless ``warm`` is False (the float64 truth: one call is all it can spare);
    the fastest of three calls when one is shorter than ``AMORTIZED_CALL_S``."""
    arrays = probe.arrays()
    have = next(iter(arrays.values())).shape[0]
    n = samples if have else 0
    feed = {k: np.resize(v, (n, *v.shape[1:])) for k, v in arrays.items()}  # repeats samples
    timings: list[float] = []
    while True:
        t0 = time.perf_counter()
        try:
            runner.infer(feed)
        except BnexportError:
            raise
        except Exception as exc:
            raise ParityInputError(
                f"{runner.name} fails on the inputs: "
                f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            ) from None
        timings.append(time.perf_counter() - t0)
        # after the warm-up, one timed call (the warm-up's time counts when it is faster: a hiccup
        # of the machine hit the timed one); three when a call is so short that a hiccup would
        # dominate it
        timed = len(timings) - 1 if warm else len(timings)
        if timed and (min(timings) >= AMORTIZED_CALL_S or timed >= 3 or not warm):
            return min(timings) / max(n, 1)


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
