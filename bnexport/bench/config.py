"""What a bench run measures and how long (`BenchConfig`), and the candidates' names."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bnexport import limits
from bnexport.defaults import (
    DEFAULT_BENCH_BATCH_SIZES,
    DEFAULT_BENCH_REPEATS,
    DEFAULT_COOLDOWN_S,
    DEFAULT_MIN_TIME_S,
    DEFAULT_PEAK_N,
    DEFAULT_PEAK_REPEATS,
    DEFAULT_SEED,
    DEFAULT_WARMUP_S,
)
from bnexport.errors import BnexportError
from bnexport.timing import TimingConfig

LATENCY_BATCH = 1  # the batch size reported as latency; the others as throughput

BASELINE = "torch_eager"
FOLDED_EAGER = "torch_eager_folded"
REFERENCE_EXPORT = "ort_torch_export"
BNEXPORT_CPU = "ort_bnexport"
BNEXPORT_CUDA = "ort_bnexport_cuda"
TUNED_PREFIX = "ort_tuned:"  # + the tuned file's name (bnexport tune's output)

LABELS: dict[str, str] = {
    BASELINE: "PyTorch eager, unfolded",
    FOLDED_EAGER: "PyTorch eager, folded",
    REFERENCE_EXPORT: "onnxruntime CPU, torch default export (ORT defaults)",
    BNEXPORT_CPU: "onnxruntime CPU, bnexport folded export (bnexport defaults)",
    BNEXPORT_CUDA: "onnxruntime CUDA, bnexport folded export",
}


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how long. ``threads=None`` leaves every backend at its own default;
    a number sets PyTorch's intra-op threads and every onnxruntime session's intra-op threads."""

    batch_sizes: tuple[int, ...] = DEFAULT_BENCH_BATCH_SIZES
    warmup_s: float = DEFAULT_WARMUP_S
    repeats: int = DEFAULT_BENCH_REPEATS
    min_time_s: float = DEFAULT_MIN_TIME_S
    cooldown_s: float = DEFAULT_COOLDOWN_S
    threads: int | None = None
    include_cuda: bool = True
    peak_n: int = DEFAULT_PEAK_N
    peak_repeats: int = DEFAULT_PEAK_REPEATS
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        checks = [
            (len(self.batch_sizes) > 0, "give at least one batch size"),
            (
                len(set(self.batch_sizes)) == len(self.batch_sizes),
                f"batch sizes must be distinct, got {list(self.batch_sizes)}",
            ),
            (self.peak_n >= 16, f"peak matrix size must be >= 16, got {self.peak_n}"),
            (self.peak_repeats >= 1, f"peak repeats must be >= 1, got {self.peak_repeats}"),
        ]
        for ok, message in checks:
            if not ok:
                raise BnexportError(f"bench: {message}")
        for b in self.batch_sizes:
            limits.check_count(int(b), "--batch-sizes", maximum=limits.MAX_DIM)
        limits.check_count(self.repeats, "--repeats", maximum=limits.MAX_REPEATS)
        limits.check_seconds(self.warmup_s, "--warmup")
        limits.check_seconds(self.min_time_s, "--min-time", positive=True)
        limits.check_seconds(self.cooldown_s, "--cooldown")
        limits.check_threads(self.threads, "--threads")
        limits.check_seed(self.seed)

    @property
    def timing(self) -> TimingConfig:
        """The timing core's part of this config."""
        return TimingConfig(self.repeats, self.warmup_s, self.min_time_s, self.cooldown_s)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batch_sizes"] = list(self.batch_sizes)
        return d
