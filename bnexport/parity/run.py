"""Running a prepared parity check: the baseline (the fp32 reference, the float64 truth and the
noise floor, `bnexport.parity.engine`), then each candidate at each batch size, timed and compared
per output with the reference (and the truth).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bnexport.errors import BnexportError, ParityInputError, raise_if_interrupted
from bnexport.parity.config import CheckConfig, PreparedCheck
from bnexport.parity.engine import compare_outputs, measure_baseline, run_reference
from bnexport.parity.inputs import ParityInputs
from bnexport.parity.orders import ReorderedRunner, reordered_notes
from bnexport.parity.report import RunnerResult
from bnexport.progress import Progress, ProgressEvent
from bnexport.runners import Runner
from bnexport.signature import TensorSpec

#: The stage of the `ProgressEvent`s a parity check reports.
PARITY_STAGE = "parity"


@dataclass
class _Steps:
    """Counts finished runs and reports each as a `ProgressEvent`."""

    progress: Progress | None
    total: int
    done: int = 0

    def __call__(self, message: str) -> None:
        self.done += 1
        if self.progress:
            self.progress(ProgressEvent(PARITY_STAGE, self.done, self.total, message))


def run_check(check: PreparedCheck, progress: Progress | None) -> list[RunnerResult]:
    """Every candidate at its batch sizes, compared with the reference (and the truth)."""
    # PyTorch runs once, at the largest batch size: its batching is not what is being checked, and
    # every onnxruntime batch size is compared with the same reference outputs (so a candidate that
    # mixes samples across a batch is caught too).
    ref_batch = max(check.batch_sizes)
    truth_runner = check.gt_runner if check.config.tolerance_mode == "noise" else None
    runs = [(r, ref_batch) for r in check.torch_runners]
    runs += [(r, b) for b in check.batch_sizes for r in check.ort_runners]
    reordered = [ReorderedRunner(check.ref_runner)] if truth_runner is not None else []
    step = _Steps(progress, 1 + (2 + len(reordered)) * (truth_runner is not None) + len(runs))
    # The noise floor is PyTorch fp32's error over three of its own execution paths: the largest
    # batch and batch 1 run different kernels (on ill-conditioned inputs their errors differ
    # several-fold), and the long sums added in another order (docs/parity.md).
    base = measure_baseline(
        check.ref_runner,
        check.inputs,
        ref_batch,
        truth=truth_runner,
        noise_batches=(1,),
        noise_runners=reordered,
        check=lambda out: _check_outputs(out, check.out_specs),
        step=step,
    )
    check.notes.extend(base.ungated_notes(check.inputs))
    for runner in reordered:
        check.notes.extend(reordered_notes(base, runner))
    results: list[RunnerResult] = []
    for runner, batch in runs:
        out, result = _timed_run(runner, check.inputs, batch, check.config)
        own_truth = runner is check.gt_runner
        if result.error is None:
            if own_truth:
                base.truth = out
            result.outputs, result.ground_truth_max_abs_err = compare_outputs(
                runner, out, base, check.inputs, result.tolerance, own_truth=own_truth
            )
        results.append(result)
        step(f"{runner.name} batch {batch}")
    return results


def _timed_run(
    runner: Runner, inputs: ParityInputs, batch: int, config: CheckConfig
) -> tuple[dict[str, np.ndarray], RunnerResult]:
    """A candidate's outputs and its result, not yet compared; a crash is the result's error."""
    t0 = time.perf_counter()
    try:
        out = run_reference(runner, inputs, batch, fail=None)
        error = None
    except BnexportError:
        raise
    except Exception as exc:
        raise_if_interrupted(exc)
        out, error = {}, f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return out, RunnerResult(
        runner=runner.name,
        kind=runner.kind,
        gating=runner.gating,
        batch_size=batch,
        batches=-(-inputs.size // batch),
        samples=inputs.size,
        seconds=time.perf_counter() - t0,
        tolerance=config.tolerance_for(runner.kind),
        error=error,
    )


def _check_outputs(ref_out: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> None:
    """The reference's outputs must fit the ONNX outputs' static dims (after the batch: the
    reference's hold every sample) and dtypes."""
    for spec in specs:
        arr = ref_out[spec.name]
        if arr.ndim != len(spec.shape) or any(
            d is not None and d != a for d, a in zip(spec.shape[1:], arr.shape[1:], strict=False)
        ):
            raise ParityInputError(
                f"ONNX output {spec.describe()} but the PyTorch model returns shape "
                f"{list(arr.shape)} for it; the models' outputs do not match (by name or order)"
            )
        if arr.dtype != spec.dtype:
            raise ParityInputError(
                f"ONNX output {spec.describe()} but the PyTorch model returns {arr.dtype}; export "
                "and check in the same precision"
            )
