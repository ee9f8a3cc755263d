"""Running a prepared parity check: the fp32 reference, the float64 truth and the noise floor, then
each candidate at each batch size, compared per output with the reference (and the truth).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from bnexport.errors import BnexportError, ParityInputError, raise_if_interrupted
from bnexport.parity.compare import OutputComparison, compare_output
from bnexport.parity.inputs import ParityInputs, TensorSpec
from bnexport.parity.report import RunnerResult
from bnexport.parity.runners import REFERENCE_NAME, OnnxRuntimeRunner, Runner, TorchRunner
from bnexport.parity.tolerance import (
    ILL_CONDITIONED_RATIO,
    KIND_PRECISION,
    NoiseTolerance,
    Tolerance,
    noise_floor,
)

if TYPE_CHECKING:
    from bnexport.parity.check import CheckConfig, PreparedCheck, Progress


@dataclass
class _Baseline:
    """What candidates are compared with: the fp32 reference's outputs, the float64 truth's (once
    it ran) and, in noise mode, each output's noise floor."""

    names: list[str]
    ref: dict[str, np.ndarray]
    truth: dict[str, np.ndarray] | None = None
    noise: dict[str, float] = field(default_factory=dict)
    ungated: dict[str, np.ndarray] = field(default_factory=dict)  # ill-conditioned edge cases


@dataclass
class _Steps:
    """Counts finished runs and reports them as ``progress(stage, done, total)``."""

    progress: Progress | None
    total: int
    done: int = 0

    def __call__(self, stage: str) -> None:
        self.done += 1
        if self.progress:
            self.progress(stage, self.done, self.total)


def run_check(check: PreparedCheck, progress: Progress | None) -> list[RunnerResult]:
    """Every candidate at its batch sizes, compared with the reference (and the truth)."""
    # PyTorch runs once, at the largest batch size: its batching is not what is being checked, and
    # every onnxruntime batch size is compared with the same reference outputs (so a candidate that
    # mixes samples across a batch is caught too).
    ref_batch = max(check.batch_sizes)
    truth_runner = check.gt_runner if check.config.tolerance_mode == "noise" else None
    runs = [(r, ref_batch) for r in check.torch_runners]
    runs += [(r, b) for b in check.batch_sizes for r in check.ort_runners]
    step = _Steps(progress, 1 + 2 * (truth_runner is not None) + len(runs))
    base = _baseline(check, ref_batch, truth_runner, step)
    results: list[RunnerResult] = []
    for runner, batch in runs:
        out, result = _timed_run(runner, check.inputs, batch, check.config)
        own_truth = runner is check.gt_runner
        if result.error is None:
            if own_truth:
                base.truth = out
            _add_comparisons(result, runner, out, base, check.inputs, own_truth=own_truth)
        results.append(result)
        step(f"{runner.name} batch {batch}")
    return results


def _baseline(
    check: PreparedCheck, ref_batch: int, truth_runner: TorchRunner | None, step: _Steps
) -> _Baseline:
    """Run the fp32 reference; with `truth_runner`, the float64 truth and the noise floor too."""
    ref_out = _run_reference(check.ref_runner, check.inputs, ref_batch)
    _check_outputs(ref_out, check.out_specs)
    step(f"{REFERENCE_NAME} batch {ref_batch}")
    base = _Baseline([s.name for s in check.out_specs], ref_out)
    if truth_runner is None:
        return base
    base.truth = truth = _run_reference(truth_runner, check.inputs, ref_batch)
    step(f"{truth_runner.name} batch {ref_batch}")
    # The noise floor is PyTorch fp32's error over two of its own execution paths: the largest
    # batch and batch 1 run different kernels, and on ill-conditioned inputs their errors
    # differ several-fold (docs/parity.md).
    draws = [ref_out]
    if ref_batch != 1:
        draws.append(_run_reference(check.ref_runner, check.inputs, 1))
        step(f"{REFERENCE_NAME} batch 1")
    edge = check.inputs.edge_case_mask()
    for n in base.names:
        base.noise[n], base.ungated[n] = noise_floor([d[n] for d in draws], truth[n], edge)
        if base.ungated[n].any():
            check.notes.append(_ungated_note(n, base.ungated[n], check.inputs))
    return base


def _ungated_note(output: str, ungated: np.ndarray, inputs: ParityInputs) -> str:
    """Which edge cases an output's precision verdict leaves out, and why."""
    names = sorted({inputs.locate(int(i))[0] for i in np.flatnonzero(ungated)})
    return (  # fits 100 columns after "note: " for short names
        f"edge cases {', '.join(names)}: ill-conditioned (fp32 error >{ILL_CONDITIONED_RATIO:g}× "
        f"the data's); {output!r}: NaN/Inf only"
    )


def _run_all(runner: Runner, inputs: ParityInputs, batch_size: int) -> dict[str, np.ndarray]:
    chunks: dict[str, list[np.ndarray]] = {}
    for feed in inputs.batches(batch_size):
        for name, arr in runner.infer(feed).items():
            chunks.setdefault(name, []).append(arr)
    return {name: np.concatenate(parts) for name, parts in chunks.items()}


def _run_reference(runner: TorchRunner, inputs: ParityInputs, batch: int) -> dict[str, np.ndarray]:
    """Run a PyTorch reference (fp32 or the float64 truth); its failure is bad input."""
    try:
        return _run_all(runner, inputs, batch)
    except BnexportError:
        raise
    except Exception as exc:
        raise ParityInputError(
            f"the PyTorch model ({runner.name}) fails on the inputs (batch {batch}): "
            f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        ) from None


def _timed_run(
    runner: Runner, inputs: ParityInputs, batch: int, config: CheckConfig
) -> tuple[dict[str, np.ndarray], RunnerResult]:
    """A candidate's outputs and its result, not yet compared; a crash is the result's error."""
    t0 = time.perf_counter()
    try:
        out = _run_all(runner, inputs, batch)
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


def _add_comparisons(
    result: RunnerResult,
    runner: Runner,
    out: Mapping[str, np.ndarray],
    base: _Baseline,
    inputs: ParityInputs,
    *,
    own_truth: bool,
) -> None:
    """Compare each output with the reference (and the truth, unless `runner` is the truth)."""
    truth = None if own_truth else base.truth
    for name in base.names:
        result.outputs.append(
            _compare(
                runner,
                name,
                out[name],
                base.ref[name],
                result.tolerance,
                inputs,
                truth=None if truth is None else truth[name],
                noise=base.noise.get(name),
                ungated=base.ungated.get(name),
            )
        )
        if truth is not None:
            result.ground_truth_max_abs_err[name] = _max_abs_err(out[name], truth[name])


def _compare(
    runner: Runner,
    name: str,
    cand: np.ndarray,
    ref: np.ndarray,
    tol: Tolerance | NoiseTolerance,
    inputs: ParityInputs,
    *,
    truth: np.ndarray | None,
    noise: float | None = None,
    ungated: np.ndarray | None = None,
) -> OutputComparison:
    if cand.shape != ref.shape:
        raise ParityInputError(
            f"output {name!r}: {runner.name} gives shape {list(cand.shape)}, the PyTorch "
            f"reference {list(ref.shape)}; the ONNX and PyTorch models do not compute the same "
            "thing"
        )
    if isinstance(runner, OnnxRuntimeRunner) and cand.dtype != ref.dtype:
        raise ParityInputError(
            f"output {name!r}: {runner.name} gives {cand.dtype}, the PyTorch reference "
            f"{ref.dtype}; export and check in the same precision"
        )
    return compare_output(
        name,
        cand,
        ref,
        tol,
        truth=truth,
        noise=noise,
        precision=KIND_PRECISION.get(runner.kind, 1.0),
        locate=inputs.locate,
        ungated=ungated,
    )


def _max_abs_err(cand: np.ndarray, truth: np.ndarray) -> float:
    """``max|a − t|`` in float64; a NaN on either side counts as infinitely far."""
    if not cand.size:
        return 0.0
    with np.errstate(invalid="ignore"):
        err = np.abs(cand.astype(np.float64) - truth.astype(np.float64))
    return float(np.max(np.where(np.isnan(err), np.inf, err)))


def _check_outputs(ref_out: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> None:
    """The reference's outputs must fit the ONNX outputs' static dims and dtypes."""
    for spec in specs:
        arr = ref_out[spec.name]
        if arr.ndim != len(spec.shape) or any(
            d is not None and d != a for d, a in zip(spec.shape, arr.shape, strict=False)
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
