"""What a bench run found: the candidates, per-batch measurements, paired comparisons."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from bnexport.bench.config import (
    BASELINE,
    BNEXPORT_CPU,
    BNEXPORT_CUDA,
    REFERENCE_EXPORT,
    TUNED_PREFIX,
    BenchConfig,
)
from bnexport.timing import Ratio, RawTimes, paired_ratio, percentile

if TYPE_CHECKING:
    from bnexport.bench.flops import FlopCount, PeakResult


@dataclass(frozen=True)
class CandidateInfo:
    """One candidate: what it is, whether it ran (and why not), its setup and its outputs' error."""

    name: str
    label: str
    available: bool
    reason: str = ""
    session_options: dict[str, Any] | None = None
    model_path: str | None = None
    op_counts: dict[str, int] | None = None
    init_s: float | None = None
    max_abs_diff: float | None = None  # vs the baseline's output on the first timed batch
    matches: bool | None = None  # max_abs_diff <= OUTPUT_MATCH_RTOL * max|baseline output|

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Measurement:
    """One candidate at one batch size. ``times_s``: seconds per call, one per repeat."""

    candidate: str
    batch_size: int
    times_s: tuple[float, ...]
    calls_per_timing: int
    median_s: float
    p90_s: float
    images_per_s: float
    gflops: float | None
    peak_fraction: float | None
    speedup: Ratio  # vs the baseline (PyTorch eager, unfolded)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["times_s"] = list(self.times_s)
        d["speedup"] = self.speedup.to_dict()
        return d


@dataclass(frozen=True)
class Comparison:
    """``candidate`` vs ``reference`` at one batch size (paired ratio; > 1: candidate faster)."""

    candidate: str
    reference: str
    batch_size: int
    ratio: Ratio

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio.to_dict()}


@dataclass(frozen=True)
class BenchReport:
    """Everything one bench run measured, with the machine and versions it ran on."""

    model: str
    sha256: str | None
    input_shape: tuple[int, ...]
    config: BenchConfig
    flops: FlopCount
    peak: PeakResult
    candidates: tuple[CandidateInfo, ...]
    measurements: tuple[Measurement, ...]
    comparisons: tuple[Comparison, ...]
    environment: dict[str, Any]
    seconds: float

    def measurement(self, candidate: str, batch_size: int) -> Measurement:
        """The measurement of ``candidate`` at ``batch_size`` (KeyError if it did not run)."""
        for m in self.measurements:
            if m.candidate == candidate and m.batch_size == batch_size:
                return m
        raise KeyError((candidate, batch_size))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "sha256": self.sha256,
            "input_shape": list(self.input_shape),
            "config": self.config.to_dict(),
            "baseline": BASELINE,
            "flops": self.flops.to_dict(),
            "peak": self.peak.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "measurements": [m.to_dict() for m in self.measurements],
            "comparisons": [c.to_dict() for c in self.comparisons],
            "environment": self.environment,
            "seconds": self.seconds,
        }


def summarise(
    raw: RawTimes, flops_per_image: int, peak_gflops: float, config: BenchConfig
) -> tuple[list[Measurement], list[Comparison]]:
    """The raw times as per-candidate figures (speedup vs the baseline) and the comparisons of
    bnexport's (and tuned) files against torch's default export, per batch size."""
    measurements = [
        _measurement(name, size, times, calls, raw, flops_per_image, peak_gflops)
        for (name, size), (times, calls) in raw.items()
    ]
    comparisons: list[Comparison] = []
    tuned = sorted({n for n, _ in raw if n.startswith(TUNED_PREFIX)})
    for size in config.batch_sizes:
        for name in (BNEXPORT_CPU, BNEXPORT_CUDA, *tuned):
            if (name, size) in raw and (REFERENCE_EXPORT, size) in raw:
                ratio = paired_ratio(raw[(REFERENCE_EXPORT, size)][0], raw[(name, size)][0])
                comparisons.append(Comparison(name, REFERENCE_EXPORT, size, ratio))
    return measurements, comparisons


def _measurement(
    name: str,
    size: int,
    times: list[float],
    calls: int,
    raw: RawTimes,
    flops_per_image: int,
    peak_gflops: float,
) -> Measurement:
    median = statistics.median(times)
    ips = size / median
    gflops = flops_per_image * ips / 1e9 if flops_per_image else None
    return Measurement(
        candidate=name,
        batch_size=size,
        times_s=tuple(times),
        calls_per_timing=calls,
        median_s=median,
        p90_s=percentile(times, 90),
        images_per_s=ips,
        gflops=gflops,
        peak_fraction=gflops / peak_gflops if gflops is not None and peak_gflops else None,
        speedup=paired_ratio(raw[(BASELINE, size)][0], times),
    )
