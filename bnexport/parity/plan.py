"""How much a parity check feeds: sample counts and batch sizes sized to the model's cost.

One forward of the fp32 reference is timed and the default check is sized to
``DEFAULT_TIME_BUDGET_S``: random samples shrink (never below ``MIN_RANDOM_SAMPLES``) and a slow
model drops the largest default batch size. What the user fixed (``--samples``, ``--inputs``,
``--batch-sizes``) is fed as asked.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from bnexport.errors import BnexportError, ParityInputError
from bnexport.parity.inputs import InputConfig, ParityInputs, TensorSpec, build_inputs
from bnexport.parity.runners import TorchRunner

if TYPE_CHECKING:
    from bnexport.parity.check import CheckConfig

DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 7, 64)
#: Seconds of model forwards a default check aims at (``plan_inputs``): the random sample count
#: and the batch sizes shrink for a model whose single forward is expensive.
DEFAULT_TIME_BUDGET_S = 6.0
#: Samples of the timed forward that sizes a default check (timed twice: the first warms up).
PROBE_SAMPLES = 2
#: Fewest random samples a default check feeds (besides the edge cases), however slow the model.
MIN_RANDOM_SAMPLES = 2


def plan_inputs(
    seconds_per_sample: float,
    fixed_samples: int,
    *,
    random_count: int,
    runs_per_sample: float,
    budget_s: float = DEFAULT_TIME_BUDGET_S,
) -> tuple[int, bool]:
    """``(random samples, cheap)`` for a model whose fp32 forward takes ``seconds_per_sample``.

    A check costs about ``seconds_per_sample · runs_per_sample`` per sample fed (fp32, float64 ≈ 2,
    folded, each onnxruntime level × batch size). The ``fixed_samples`` (edge cases, images) are
    always fed; random samples fill the rest of ``budget_s``, between ``MIN_RANDOM_SAMPLES`` and
    ``random_count``. ``cheap``: everything fits with the default batch sizes.
    """
    per_sample = max(seconds_per_sample, 1e-9) * runs_per_sample
    room = int(budget_s / per_sample) - fixed_samples
    random = max(min(random_count, room), min(MIN_RANDOM_SAMPLES, random_count))
    return random, (fixed_samples + random_count) * per_sample <= budget_s


def build_sized_inputs(
    ref_runner: TorchRunner,
    in_specs: Sequence[TensorSpec],
    config: CheckConfig,
    batch_sizes: tuple[int, ...] | None,
    normalize: Any,
    input_shape: Any,
    *,
    n_ort: int,
) -> tuple[ParityInputs, tuple[int, ...], list[str]]:
    """The inputs and batch sizes to run: the configured ones, or sized to the model's cost
    (`plan_inputs`): a check runs fp32 twice, float64, one torch candidate and ``n_ort``
    onnxruntime runners per batch size."""
    wanted = config.inputs.random_count if config.samples is None else config.samples
    inputs_cfg = replace(config.inputs, random_count=wanted)
    build = functools.partial(build_inputs, in_specs, normalize=normalize, input_shape=input_shape)
    as_asked = config.samples is not None or inputs_cfg.inputs_file is not None
    if as_asked and batch_sizes:
        return build(inputs_cfg), batch_sizes, []
    probe = build(_probe_config(inputs_cfg))
    per_sample = _seconds_per_sample(ref_runner, probe)
    fixed = _fixed_samples(inputs_cfg, probe, build)
    n_batches = len(batch_sizes or DEFAULT_BATCH_SIZES)
    runs = 5.0 + n_ort * n_batches  # fp32 twice, float64 (≈ 2), folded; onnxruntime
    random, cheap = plan_inputs(
        per_sample, fixed, random_count=wanted, runs_per_sample=runs, budget_s=config.time_budget_s
    )
    notes: list[str] = []
    if as_asked:
        random = wanted
    elif random < wanted:
        notes.append(
            f"{random} of {wanted} random samples (a forward takes {per_sample * 1e3:.0f} ms; "
            f"{config.time_budget_s:g} s budget; --samples N overrides)"
        )
    if batch_sizes is None:
        batch_sizes = DEFAULT_BATCH_SIZES if cheap else DEFAULT_BATCH_SIZES[:2]
    if inputs_cfg.inputs_file is not None:
        return probe, batch_sizes, notes
    return build(replace(inputs_cfg, random_count=random)), batch_sizes, notes


def _probe_config(config: InputConfig) -> InputConfig:
    """The inputs the timed forward runs on: a few random samples (or the given file)."""
    if config.inputs_file is not None:
        return config
    return replace(
        config, random_count=PROBE_SAMPLES, edge_cases=False, bundled=False, data_dir=None
    )


def _seconds_per_sample(ref_runner: TorchRunner, probe: ParityInputs) -> float:
    """The reference's forward time per sample over ``PROBE_SAMPLES`` samples of `probe`."""
    one = {k: v[:PROBE_SAMPLES] for k, v in probe.arrays().items()}
    n_probe = next(iter(one.values())).shape[0]
    timings = []
    for _ in range(2):  # the first call warms up
        t0 = time.perf_counter()
        try:
            ref_runner.infer(one)
        except BnexportError:
            raise
        except Exception as exc:
            raise ParityInputError(
                f"the PyTorch reference fails on the inputs: {type(exc).__name__}: "
                f"{' '.join(str(exc).split())}"
            ) from None
        timings.append(time.perf_counter() - t0)
    return timings[-1] / max(n_probe, 1)


def _fixed_samples(
    config: InputConfig, probe: ParityInputs, build: Callable[[InputConfig], ParityInputs]
) -> int:
    """How many samples are fed whatever the budget: edge cases, images, or the given file."""
    if config.inputs_file is not None:
        return probe.size
    if config.edge_cases or config.bundled is not False or config.data_dir:
        return build(replace(config, random_count=0)).size
    return 0  # random samples only
