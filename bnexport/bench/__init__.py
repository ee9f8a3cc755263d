"""Benchmark a model side by side: PyTorch eager (unfolded, folded) and onnxruntime (CPU, CUDA).

The work lives in named modules; this package re-exports what other code uses:

* `bnexport.bench.config` — `BenchConfig`, the candidates' names and labels, progress events;
* `bnexport.bench.runners` — `TorchRunner`, `OrtRunner`: ``prepare(batch) -> call``;
* `bnexport.bench.candidates` — each candidate set up as its users would (torch's default export
  in a default onnxruntime session, bnexport's export, CUDA, tuned files), outputs checked;
* `bnexport.bench.timing` — interleaved orders, calibration, `measure_interleaved`, paired ratios;
* `bnexport.bench.flops` — FLOPs per image and the measured fp32 peak;
* `bnexport.bench.report` — the results (`BenchReport`) and their summary;
* `bnexport.bench.environment` — versions, CPU, threads and load (from `bnexport.machine`);
* `bnexport.bench.run` — `run_bench`, the whole run.
"""

from __future__ import annotations

from bnexport.bench.candidates import OUTPUT_MATCH_RTOL, tuned_name
from bnexport.bench.config import (
    BASELINE,
    BNEXPORT_CPU,
    BNEXPORT_CUDA,
    FOLDED_EAGER,
    LABELS,
    LATENCY_BATCH,
    REFERENCE_EXPORT,
    TUNED_PREFIX,
    BenchConfig,
    BenchEvent,
    ProgressCallback,
)
from bnexport.bench.environment import collect_environment
from bnexport.bench.flops import FlopCount, LayerFlops, PeakResult, count_flops, measure_peak
from bnexport.bench.report import BenchReport, CandidateInfo, Comparison, Measurement
from bnexport.bench.run import check_benchable, run_bench
from bnexport.bench.runners import OrtRunner, Runner, TorchRunner
from bnexport.bench.timing import Ratio, interleaved_orders, measure_interleaved, paired_ratio

__all__ = [
    "BASELINE",
    "BNEXPORT_CPU",
    "BNEXPORT_CUDA",
    "FOLDED_EAGER",
    "LABELS",
    "LATENCY_BATCH",
    "OUTPUT_MATCH_RTOL",
    "REFERENCE_EXPORT",
    "TUNED_PREFIX",
    "BenchConfig",
    "BenchEvent",
    "BenchReport",
    "CandidateInfo",
    "Comparison",
    "FlopCount",
    "LayerFlops",
    "Measurement",
    "OrtRunner",
    "PeakResult",
    "ProgressCallback",
    "Ratio",
    "Runner",
    "TorchRunner",
    "check_benchable",
    "collect_environment",
    "count_flops",
    "interleaved_orders",
    "measure_interleaved",
    "measure_peak",
    "paired_ratio",
    "run_bench",
    "tuned_name",
]
