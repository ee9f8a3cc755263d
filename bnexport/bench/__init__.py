"""Benchmark a model side by side: PyTorch eager (unfolded, folded) and onnxruntime (CPU, CUDA).

The work lives in named modules; this package re-exports what other code uses:

* `bnexport.bench.config` — `BenchConfig`, the candidates' names and labels;
* `bnexport.bench.candidates` — each candidate set up as its users would (torch's default export
  in a default onnxruntime session, bnexport's export, CUDA, tuned files), outputs checked;
* `bnexport.bench.flops` — FLOPs per image and the measured fp32 peak;
* `bnexport.bench.report` — the results (`BenchReport`) and their summary;
* `bnexport.bench.run` — `run_bench`, the whole run.

The timing itself (interleaved rounds, paired ratios, the environment) is `bnexport.timing`,
shared with `bnexport.tune`, and it times `bnexport.runners`' runners (``prepare(feed) ->
call``, the feed keyed by input name); progress events are `bnexport.progress.ProgressEvent`.
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
)
from bnexport.bench.flops import FlopCount, LayerFlops, PeakResult, count_flops, measure_peak
from bnexport.bench.report import BenchReport, CandidateInfo, Comparison, Measurement
from bnexport.bench.run import check_benchable, run_bench

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
    "BenchReport",
    "CandidateInfo",
    "Comparison",
    "FlopCount",
    "LayerFlops",
    "Measurement",
    "PeakResult",
    "check_benchable",
    "count_flops",
    "measure_peak",
    "run_bench",
    "tuned_name",
]
