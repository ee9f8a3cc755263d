"""The parity engine: the one place that compares a candidate's outputs with a reference under the
noise rule (`bnexport.noise`) or a fixed tolerance.

A :class:`Baseline` is measured once per check (:func:`measure_baseline`): the fp32 reference's
outputs at the check's batch size, the truth's (float64, or whatever the caller trusts most) and,
per output, the noise floor over the reference's draws at that batch size and at
``noise_batches`` (batch 1 by default: its kernels differ, and on ill-conditioned inputs so do
their errors), ill-conditioned edge cases left out. Each candidate's outputs are then compared
with it (:func:`compare_outputs`: one `OutputComparison` per output, and its max error against
the truth). :func:`check_candidate` does both for a single candidate.

`bnexport check` / `onnx` (:mod:`bnexport.parity.run`), the ``.pt2`` check of `bnexport fold`
(:mod:`bnexport.parity.program`) and `bnexport tune`'s output check all call it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from bnexport.errors import BnexportError, ParityInputError
from bnexport.noise import (
    ILL_CONDITIONED_RATIO,
    KIND_PRECISION,
    NoiseTolerance,
    draw_floors,
    noise_floor,
    order_floors,
)
from bnexport.parity.compare import OutputComparison, compare_output
from bnexport.parity.inputs import ParityInputs
from bnexport.parity.tolerance import Tolerance
from bnexport.runners import OnnxRuntimeRunner, Runner

#: The error a failed reference (or truth) run raises: ``fail(runner, batch size, samples in the
#: failing batch, exception)``.
Fail = Callable[[Runner, int, int, Exception], BaseException]
#: Called with a finished run's description (``"torch-fp32 batch 64"``).
Step = Callable[[str], None]


@dataclass
class Baseline:
    """What candidates are compared with: the reference's outputs, the truth's (once it ran) and,
    with a truth, each output's noise floor and its ill-conditioned edge cases (`noise_floor`),
    and with reordered draws each sample's floor (`order_floors`)."""

    names: list[str]
    ref: dict[str, np.ndarray]
    truth: dict[str, np.ndarray] | None = None
    noise: dict[str, float] = field(default_factory=dict)
    ungated: dict[str, np.ndarray] = field(default_factory=dict)
    draws: dict[str, dict[str, float]] = field(default_factory=dict)  # output → draw → its N
    floors: dict[str, np.ndarray] = field(default_factory=dict)  # per-sample Nᵢ (order_floors)

    def ungated_notes(self, inputs: ParityInputs) -> list[str]:
        """For each output with ill-conditioned edge cases: which, and what is still checked."""
        notes = []
        for output, ungated in self.ungated.items():
            if ungated.any():
                names = sorted({inputs.locate(int(i))[0] for i in np.flatnonzero(ungated)})
                notes.append(  # fits 100 columns after "note: " for short names
                    f"edge cases {', '.join(names)}: ill-conditioned (fp32 error "
                    f">{ILL_CONDITIONED_RATIO:g}× the data's); {output!r}: NaN/Inf only"
                )
        return notes


def reference_failure(runner: Runner, batch: int, samples: int, exc: Exception) -> BaseException:
    """A PyTorch reference (or the truth) that fails on the inputs: bad input."""
    if isinstance(exc, BnexportError):
        return exc
    return ParityInputError(
        f"the PyTorch model ({runner.name}) fails on the inputs (batch {batch}): "
        f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    )


def run_reference(
    runner: Runner, inputs: ParityInputs, batch: int, fail: Fail | None = reference_failure
) -> dict[str, np.ndarray]:
    """``runner`` over every sample, ``batch`` at a time, each output concatenated (the samples
    a fixed-batch model's last chunk was padded with dropped); a failure is raised as ``fail``
    makes it (``None``: as it is)."""
    chunks: dict[str, list[np.ndarray]] = {}
    for feed in inputs.batches(batch):
        try:
            out = runner.infer(feed)
        except Exception as exc:
            if fail is None:
                raise
            error = fail(runner, batch, len(next(iter(feed.values()))), exc)
            if error is exc:
                raise
            raise error from exc
        for name, arr in out.items():
            chunks.setdefault(name, []).append(arr)
    return {name: np.concatenate(parts)[: inputs.size] for name, parts in chunks.items()}


def measure_baseline(
    reference: Runner,
    inputs: ParityInputs,
    batch: int,
    *,
    truth: Runner | None = None,
    noise_batches: Sequence[int] = (1,),
    noise_runners: Sequence[Runner] = (),
    check: Callable[[Mapping[str, np.ndarray]], None] | None = None,
    step: Step | None = None,
    fail: Fail | None = reference_failure,
) -> Baseline:
    """Run the reference at ``batch`` (``check`` sees its outputs first); with ``truth``, the
    truth too, the reference again at each of ``noise_batches``, each of ``noise_runners`` (other
    fp32 execution paths of the reference: `bnexport.parity.orders`) at ``batch``, and each
    output's noise floor over all these draws."""
    ref_out = run_reference(reference, inputs, batch, fail)
    if check is not None:
        check(ref_out)
    _step(step, f"{reference.name} batch {batch}")
    base = Baseline(list(ref_out), ref_out)
    if truth is None:
        return base
    base.truth = run_reference(truth, inputs, batch, fail)
    _step(step, f"{truth.name} batch {batch}")
    draws = {f"{reference.name} batch {batch}": ref_out}
    for extra in dict.fromkeys(b for b in noise_batches if b != batch):
        draws[f"{reference.name} batch {extra}"] = run_reference(reference, inputs, extra, fail)
        _step(step, f"{reference.name} batch {extra}")
    reordered = {}
    for runner in noise_runners:
        reordered[f"{runner.name} batch {batch}"] = run_reference(runner, inputs, batch, fail)
        _step(step, f"{runner.name} batch {batch}")
    edge = inputs.edge_case_mask()
    for n in base.names:
        own, other = [d[n] for d in draws.values()], [d[n] for d in reordered.values()]
        base.noise[n], base.ungated[n] = noise_floor(own, base.truth[n], edge)
        floors = order_floors(other, base.truth[n], base.noise[n])
        if floors is not None:
            base.floors[n] = floors
        worst = draw_floors([*own, *other], base.truth[n], base.ungated[n])
        base.draws[n] = dict(zip([*draws, *reordered], worst, strict=True))
    return base


def compare_outputs(
    runner: Runner,
    out: Mapping[str, np.ndarray],
    base: Baseline,
    inputs: ParityInputs,
    tolerance: Tolerance | NoiseTolerance,
    *,
    own_truth: bool = False,
) -> tuple[list[OutputComparison], dict[str, float]]:
    """Each output compared with the reference (and the truth, unless ``runner`` is the truth:
    ``own_truth``); and each output's max abs error against the truth."""
    truth = None if own_truth else base.truth
    comparisons = []
    truth_errors: dict[str, float] = {}
    for name in base.names:
        cand, ref = out[name], base.ref[name]
        _check_like(runner, name, cand, ref)
        comparisons.append(
            compare_output(
                name,
                cand,
                ref,
                tolerance,
                truth=None if truth is None else truth[name],
                noise=base.noise.get(name),
                precision=KIND_PRECISION.get(runner.kind, 1.0),
                locate=inputs.locate,
                ungated=base.ungated.get(name),
                sample_floors=base.floors.get(name),
            )
        )
        if truth is not None:
            truth_errors[name] = max_abs_err(cand, truth[name])
    return comparisons, truth_errors


def check_candidate(
    candidate: Runner,
    reference: Runner,
    truth: Runner | None,
    inputs: ParityInputs,
    batch: int,
    *,
    tolerance: Tolerance | NoiseTolerance,
    noise_batches: Sequence[int] = (1,),
    fail: Fail | None = reference_failure,
    candidate_fail: Fail | None = None,
) -> list[OutputComparison]:
    """One candidate against ``reference`` and ``truth`` over ``inputs`` at ``batch``: the
    baseline (`measure_baseline`), the candidate's run (a failure raised as ``candidate_fail``
    makes it), and its comparison per output (`compare_outputs`)."""
    base = measure_baseline(
        reference, inputs, batch, truth=truth, noise_batches=noise_batches, fail=fail
    )
    out = run_reference(candidate, inputs, batch, candidate_fail)
    comparisons, _ = compare_outputs(candidate, out, base, inputs, tolerance)
    return comparisons


def max_abs_err(cand: np.ndarray, truth: np.ndarray) -> float:
    """``max|a − t|`` in float64; a NaN on either side counts as infinitely far."""
    if not cand.size:
        return 0.0
    with np.errstate(invalid="ignore"):
        err = np.abs(cand.astype(np.float64) - truth.astype(np.float64))
    return float(np.max(np.where(np.isnan(err), np.inf, err)))


def _check_like(runner: Runner, name: str, cand: np.ndarray, ref: np.ndarray) -> None:
    """A candidate's output must have the reference's shape (and an onnxruntime one its dtype)."""
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


def _step(step: Step | None, what: str) -> None:
    if step is not None:
        step(what)
