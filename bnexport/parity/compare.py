"""Compare one candidate output with the truth and the reference: statistics that explain a result.

The pass/fail decision is the tolerance's own (:meth:`NoiseTolerance.passes` on the error against
the float64 truth and fp32's noise floor, or :meth:`Tolerance.passes` element-wise against the fp32
reference); this module only measures. For each output (first axis = batch)
:func:`compare_output` reports the noise-relative error (``E``, ``N``, their ratio, the limit) when
a truth is given, the absolute error statistics against the reference,
the worst sample's error relative to that sample's ``max|ref|``, cosine similarity, argmax
agreement, NaN/Inf counts, the smallest tolerances that would have passed, a log10 histogram of
``|a − r|``, and the worst element (the largest ``|a − r| / allowed``) by sample and output index.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bnexport.noise import (
    NoiseTolerance,
    gated_candidate,
    relative_error,
    sample_scale,
    worst_sample,
)
from bnexport.parity.tolerance import Tolerance

# Histogram of |a − r|: exact zeros, then decades 1e-9 … 1e1, then the rest and the non-finite.
HISTOGRAM_DECADES: tuple[int, ...] = tuple(range(-9, 2))


@dataclass(frozen=True)
class WorstElement:
    """Where the candidate is furthest outside (or closest to the edge of) the tolerance."""

    sample: int  # index along the batch axis, over every input fed
    index: tuple[int, ...]  # index inside that sample's output (e.g. the logit)
    candidate: float
    reference: float
    abs_err: float
    allowed: float  # the largest error that passes at this element
    input_set: str = ""  # which input set the sample came from ("bundled", "random", …)
    set_index: int = -1  # the sample's index inside that set

    def ratio(self) -> float:
        """``abs_err / allowed``: above 1 fails."""
        if self.allowed > 0:
            return self.abs_err / self.allowed
        return 0.0 if self.abs_err == 0 else math.inf

    def describe(self) -> str:
        """``#sample set[i] out[j]: candidate vs reference (err e, allowed t)``."""
        where = f" {self.input_set}[{self.set_index}]" if self.input_set else ""
        idx = ",".join(str(i) for i in self.index)
        return (
            f"#{self.sample}{where} out[{idx}]: {self.candidate:.7g} vs "
            f"{self.reference:.7g} (err {self.abs_err:.3g}, allowed {self.allowed:.3g})"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["index"] = list(self.index)
        d["ratio"] = finite_or_str(self.ratio())
        return d


@dataclass(frozen=True)
class OutputComparison:
    """Statistics for one output of one runner against the reference."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    passed: bool
    tolerance: Tolerance | NoiseTolerance
    violations: int  # elements outside the tolerance
    elements: int
    max_abs_err: float
    mean_abs_err: float
    median_abs_err: float
    rel_err: float  # max over samples of max|a−r| / max|ref| (that sample's)
    ref_max_abs: float
    cosine: float  # whole output, flattened
    min_sample_cosine: float  # worst sample
    argmax_agreement: float | None  # fraction of samples with equal argmax over the last axis
    nan_candidate: int
    inf_candidate: int
    nan_reference: int
    inf_reference: int
    min_atol_scale: float  # smallest atol_scale that passes at this rtol
    min_rtol: float  # smallest rtol that passes at this atol
    histogram: dict[str, int] = field(default_factory=dict)
    worst: WorstElement | None = None
    # Against the float64 truth (None without one): E, N, F = max(N, ulps·eps), factor·ρ·F.
    error: float | None = None
    noise: float | None = None
    floor: float | None = None
    limit: float | None = None
    classifier: bool = False  # [N, C>1] output: argmax agreement means something
    base_floor: float | None = None  # PyTorch's own floor, before summation order raised a sample's

    @property
    def noise_ratio(self) -> float | None:
        """``E / F``: the error as a multiple of the noise floor."""
        if self.error is None or not self.floor:
            return None
        return self.error / self.floor

    @property
    def margin(self) -> float:
        """How close to failing: error / limit (noise rule) or the worst element's err/allowed."""
        if isinstance(self.tolerance, NoiseTolerance) and self.limit:
            return (self.error or 0.0) / self.limit
        return self.worst.ratio() if self.worst else 0.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for key, value in asdict(self).items():
            d[key] = finite_or_str(value) if isinstance(value, float) else value
        d["shape"] = list(self.shape)
        d["tolerance"] = self.tolerance.to_dict()
        d["worst"] = self.worst.to_dict() if self.worst else None
        ratio = self.noise_ratio
        d["noise_ratio"] = None if ratio is None else finite_or_str(ratio)
        return d


def finite_or_str(value: float) -> float | str:
    """JSON has no inf/nan: spell them."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def error_histogram(abs_err: np.ndarray) -> dict[str, int]:
    """Counts of ``|a − r|`` per log10 bin: ``0``, ``<1e-9``, ``1e-9..1e-8``, …, ``>=1e1``,
    ``non-finite`` (a NaN or infinity where the other side differs)."""
    err = np.asarray(abs_err, dtype=np.float64).ravel()
    finite = err[np.isfinite(err)]
    hist: dict[str, int] = {"0": int(np.count_nonzero(finite == 0))}
    nonzero = finite[finite > 0]
    lo = HISTOGRAM_DECADES[0]
    hist[f"<1e{lo}"] = int(np.count_nonzero(nonzero < 10.0**lo))
    for k in HISTOGRAM_DECADES[:-1]:
        hist[f"1e{k}..1e{k + 1}"] = int(
            np.count_nonzero((nonzero >= 10.0**k) & (nonzero < 10.0 ** (k + 1)))
        )
    hi = HISTOGRAM_DECADES[-1]
    hist[f">=1e{hi}"] = int(np.count_nonzero(nonzero >= 10.0**hi))
    hist["non-finite"] = int(err.size - finite.size)
    return hist


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """``a·b / (|a||b|)`` in float64; 1.0 when both are all zeros, 0.0 when only one is; NaN when
    either holds a non-finite value."""
    return float(row_cosines(np.reshape(a, (1, -1)), np.reshape(b, (1, -1)))[0])


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of two ``[n, k]`` arrays (same conventions as above)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    bad = ~(np.isfinite(x).all(axis=1) & np.isfinite(y).all(axis=1))
    x = np.where(np.isfinite(x), x, 0.0)
    y = np.where(np.isfinite(y), y, 0.0)
    nx = np.linalg.norm(x, axis=1)
    ny = np.linalg.norm(y, axis=1)
    dot = np.einsum("ij,ij->i", x, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(
            (nx > 0) & (ny > 0), dot / (nx * ny), np.where((nx == 0) & (ny == 0), 1.0, 0.0)
        )
    return np.where(bad, np.nan, np.clip(cos, -1.0, 1.0))


def compare_output(
    name: str,
    candidate: np.ndarray,
    reference: np.ndarray,
    tolerance: Tolerance | NoiseTolerance,
    *,
    truth: np.ndarray | None = None,
    noise: float | None = None,
    precision: float = 1.0,
    locate: Any = None,
    ungated: np.ndarray | None = None,
    sample_floors: np.ndarray | None = None,
) -> OutputComparison:
    """Compare ``candidate`` with ``truth`` and ``reference`` (same shape; first axis = samples).

    With a :class:`NoiseTolerance` (needs ``truth``, the float64 forward): ``E`` is the
    candidate's error against the truth, ``N`` the reference's (or ``noise``, measured over
    several runs of the reference), and the tolerance decides; ``precision`` is the candidate's
    ``ρ``. With a :class:`Tolerance`: element-wise against the
    reference (``E``/``N`` still reported when a truth is given).
    ``locate(sample) -> (input_set, index_in_set)`` names where the worst sample came from.
    ``ungated``: samples left out of ``E`` (ill-conditioned edge cases; `noise_floor`), where
    only a NaN/Inf the truth does not have counts. ``sample_floors``: each sample's floor ``Nᵢ``
    (`bnexport.noise.order_floors`); then ``E`` and ``N`` are those of the sample with the largest
    ``Eᵢ / Nᵢ``.
    Smallest passing tolerances, per element with ``e = |a − r|`` and ``s`` the sample's
    ``max(1, max|ref|)``: ``min_atol_scale = max((e − rtol·|r|)⁺ / s)``,
    ``min_rtol = max((e − atol)⁺ / |r|)`` (inf where the reference is 0 and ``e > atol``).
    Non-finite values agree only where both are NaN or the same infinity; otherwise both
    minima are inf.
    """
    cand = np.asarray(candidate, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if cand.shape != ref.shape:
        raise ValueError(f"output {name!r}: shape {cand.shape} vs reference {ref.shape}")
    if isinstance(tolerance, NoiseTolerance) and truth is None:
        raise ValueError("the noise-relative tolerance needs the float64 truth")
    abs_err, agree_nonfinite = _abs_errors(cand, ref)
    # Fixed-tolerance statistics (against the reference) use the default fixed tolerance's rtol
    # when the noise rule decides: "would pass with --tolerance fixed --atol X" at that rtol.
    fixed = tolerance if isinstance(tolerance, Tolerance) else Tolerance(0.0, 0.0)
    allowed, violations, min_atol_scale, min_rtol = _fixed_stats(cand, ref, abs_err, fixed)
    passed = violations == 0
    stats = _TruthStats(noise=noise)
    if truth is not None:
        stats = _against_truth(
            name,
            candidate,
            ref,
            truth,
            tolerance,
            noise=noise,
            precision=precision,
            ungated=ungated,
            locate=locate,
            sample_floors=sample_floors,
        )
        if isinstance(tolerance, NoiseTolerance):
            passed = stats.passed
    worst = stats.worst
    if worst is None and abs_err.size:
        worst = _fixed_worst(ref, cand, abs_err, allowed, locate)
    return OutputComparison(
        name=name,
        shape=tuple(int(d) for d in ref.shape),
        dtype=str(np.asarray(candidate).dtype),
        passed=passed,
        tolerance=tolerance,
        violations=violations,
        elements=int(ref.size),
        max_abs_err=float(abs_err.max()) if abs_err.size else 0.0,
        mean_abs_err=float(abs_err.mean()) if abs_err.size else 0.0,
        median_abs_err=float(np.median(abs_err)) if abs_err.size else 0.0,
        rel_err=_worst_relative(abs_err, ref),
        ref_max_abs=float(np.max(np.abs(ref[np.isfinite(ref)]))) if np.isfinite(ref).any() else 0.0,
        min_atol_scale=min_atol_scale,
        min_rtol=min_rtol,
        histogram=error_histogram(abs_err),
        worst=worst,
        error=stats.error,
        noise=stats.noise,
        floor=stats.floor,
        limit=stats.limit,
        base_floor=stats.base_floor,
        **_similarity(cand, ref, truth, agree_nonfinite),
    )


@dataclass
class _TruthStats:
    """Against the truth: ``N``, ``E``, ``F``, the limit, the noise rule's verdict and its worst
    element (`compare_output`)."""

    noise: float | None = None
    error: float | None = None
    floor: float | None = None
    limit: float | None = None
    passed: bool = True
    worst: WorstElement | None = None
    base_floor: float | None = None


def _against_truth(
    name: str,
    candidate: np.ndarray,
    ref: np.ndarray,
    truth: np.ndarray,
    tolerance: Tolerance | NoiseTolerance,
    *,
    noise: float | None,
    precision: float,
    ungated: np.ndarray | None,
    locate: Any,
    sample_floors: np.ndarray | None = None,
) -> _TruthStats:
    """``E`` (ungated samples left out), ``N`` (the reference's error, unless measured; the
    worst sample's own with ``sample_floors``), ``F`` and the limit; with the noise rule, its
    verdict and worst element."""
    cand = np.asarray(candidate, dtype=np.float64)
    tru = np.asarray(truth, dtype=np.float64)
    if tru.shape != ref.shape:
        raise ValueError(f"output {name!r}: truth shape {tru.shape} vs {ref.shape}")
    eps = _eps(candidate)
    gated = gated_candidate(cand, tru, ungated)
    noise = relative_error(ref, tru).value if noise is None else noise
    rule = tolerance if isinstance(tolerance, NoiseTolerance) else NoiseTolerance()
    base_floor = rule.floor(noise, eps)
    if sample_floors is not None:
        e, noise = worst_sample(gated, tru, sample_floors, eps)
    else:
        e = relative_error(gated, tru)
    limit = rule.limit(noise, eps, precision)
    stats = _TruthStats(noise, e.value, rule.floor(noise, eps), limit, base_floor=base_floor)
    if not isinstance(tolerance, NoiseTolerance):
        return stats
    stats.passed = tolerance.passes(e.value, noise, eps, precision)
    if tru.size:
        pos = (e.sample, *e.index) if tru.ndim else ()
        set_name, set_index = locate(e.sample) if locate is not None else ("", -1)
        stats.worst = WorstElement(
            sample=e.sample,
            index=e.index,
            candidate=float(cand[pos]),
            reference=float(tru[pos]),
            abs_err=e.value * e.scale,
            allowed=limit * e.scale,
            input_set=set_name,
            set_index=int(set_index),
        )
    return stats


def _fixed_worst(
    ref: np.ndarray, cand: np.ndarray, abs_err: np.ndarray, allowed: np.ndarray, locate: Any
) -> WorstElement:
    """The element with the largest ``|a − r| / allowed`` under the fixed tolerance."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(allowed > 0, abs_err / allowed, np.where(abs_err > 0, np.inf, 0.0))
    pos = np.unravel_index(int(np.argmax(ratio)), ref.shape)
    sample = int(pos[0]) if ref.ndim >= 1 else 0
    set_name, set_index = locate(sample) if locate is not None else ("", -1)
    return WorstElement(
        sample=sample,
        index=tuple(int(i) for i in pos[1:]),
        candidate=float(cand[pos]),
        reference=float(ref[pos]),
        abs_err=float(abs_err[pos]),
        allowed=float(allowed[pos]),
        input_set=set_name,
        set_index=int(set_index),
    )


def _abs_errors(cand: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``|a − r|`` (0 where both are NaN or the same infinity, inf where only one is NaN), and
    where the two agree on a non-finite value."""
    agree_nonfinite = (np.isnan(cand) & np.isnan(ref)) | (np.isinf(cand) & (cand == ref))
    with np.errstate(invalid="ignore"):
        abs_err = np.abs(cand - ref)
    abs_err = np.where(agree_nonfinite, 0.0, abs_err)
    abs_err = np.where(np.isnan(abs_err), np.inf, abs_err)  # NaN vs a number: infinitely wrong
    return abs_err, agree_nonfinite


def _fixed_stats(
    cand: np.ndarray, ref: np.ndarray, abs_err: np.ndarray, fixed: Tolerance
) -> tuple[np.ndarray, int, float, float]:
    """Against the reference under ``fixed``: the allowed error per element, the violations, and
    the smallest passing ``atol_scale`` and ``rtol`` (`compare_output`)."""
    scale = np.broadcast_to(np.maximum(1.0, sample_scale(ref)), ref.shape)
    abs_ref = np.where(np.isfinite(ref), np.abs(ref), 0.0)
    atol = fixed.atol_scale * scale
    allowed = atol + fixed.rtol * abs_ref
    ok = fixed.passes(cand, ref)
    violations = int(ok.size - np.count_nonzero(ok))
    if not np.all(np.isfinite(abs_err)):
        return allowed, violations, math.inf, math.inf
    min_atol_scale = float(np.max(np.maximum(abs_err - fixed.rtol * abs_ref, 0.0) / scale))
    over = np.maximum(abs_err - atol, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.where(over > 0, over / abs_ref, 0.0)
    min_rtol = float(np.max(need)) if need.size else 0.0
    return allowed, violations, min_atol_scale, min_rtol


def _worst_relative(abs_err: np.ndarray, ref: np.ndarray) -> float:
    """The worst sample's ``max|a−r| / max|ref|`` (that sample's)."""
    raw_scale = np.broadcast_to(sample_scale(ref), ref.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(abs_err == 0, 0.0, abs_err / raw_scale)
    return float(np.max(rel)) if rel.size else 0.0


def _similarity(
    cand: np.ndarray, ref: np.ndarray, truth: np.ndarray | None, agree_nonfinite: np.ndarray
) -> dict[str, Any]:
    """Cosine (whole output, worst sample) over comparable values (agreeing non-finite pairs count
    as equal zeros) and argmax agreement with the truth (else the reference)."""
    cand_c = np.where(agree_nonfinite, 0.0, cand)
    ref_c = np.where(agree_nonfinite, 0.0, ref)
    n = ref.shape[0] if ref.ndim >= 1 else 1
    sample_cos = row_cosines(cand_c.reshape(n, -1), ref_c.reshape(n, -1))
    argmax: float | None = None
    against = ref if truth is None else np.asarray(truth, dtype=np.float64)
    if ref.ndim >= 2 and ref.shape[-1] > 1 and ref.size:
        argmax = float(np.mean(np.argmax(cand, axis=-1) == np.argmax(against, axis=-1)))
    return {
        "cosine": cosine_similarity(cand_c, ref_c),
        "min_sample_cosine": float(np.min(sample_cos)) if sample_cos.size else 1.0,
        "argmax_agreement": argmax,
        "nan_candidate": int(np.count_nonzero(np.isnan(cand))),
        "inf_candidate": int(np.count_nonzero(np.isinf(cand))),
        "nan_reference": int(np.count_nonzero(np.isnan(ref))),
        "inf_reference": int(np.count_nonzero(np.isinf(ref))),
        "classifier": ref.ndim == 2 and ref.shape[-1] > 1,
    }


def _eps(array: np.ndarray) -> float:
    """Machine epsilon of a floating array's dtype (float32's for anything else)."""
    dtype = np.asarray(array).dtype
    return float(np.finfo(dtype if dtype.kind == "f" else np.float32).eps)
