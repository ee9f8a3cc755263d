"""`run_bench`: one bench run, from a model source to a `BenchReport`, in named steps."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from bnexport.bench.candidates import (
    bnexport_export,
    bnexport_session_config,
    cuda_candidate,
    ort_candidate,
    torch_export_candidate,
    tuned_candidates,
    with_output_errors,
)
from bnexport.bench.config import (
    BASELINE,
    BNEXPORT_CPU,
    BNEXPORT_CUDA,
    FOLDED_EAGER,
    LABELS,
    BenchConfig,
)
from bnexport.bench.files import check_bench_files, check_feed_memory
from bnexport.bench.flops import PeakResult, count_flops, measure_peak
from bnexport.bench.report import BenchReport, CandidateInfo, summarise
from bnexport.errors import BnexportError
from bnexport.machine import load_average
from bnexport.progress import Progress, ProgressEvent
from bnexport.runners import OnnxRuntimeRunner, Runner, TorchRunner, torch_threads
from bnexport.timing import RawTimes, collect_environment, measure_interleaved

if TYPE_CHECKING:
    import numpy as np
    import torch

    from bnexport.source import ModelSource


def check_benchable(source: ModelSource) -> None:
    """`BnexportError` unless the model takes one float32 input (what the bench feeds)."""
    specs = tuple(source.input_specs)
    if len(specs) != 1 or specs[0].dtype != "float32":
        given = ", ".join(
            f"{n} {s.describe()}" for n, s in zip(source.input_names, specs, strict=True)
        )
        raise BnexportError(
            f"bnexport bench measures models with one float32 input; {source.name} takes "
            f"{given}: bench a single-input wrapper of it"
        )


def run_bench(
    source: ModelSource,
    config: BenchConfig | None = None,
    onnx_path: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    tuned_paths: Sequence[str | os.PathLike[str]] = (),
) -> BenchReport:
    """Measure ``source.model`` as PyTorch eager (unfolded, folded) and on onnxruntime.

    ``onnx_path``: use this file as bnexport's export instead of folding and exporting here.
    ``tuned_paths``: files from ``bnexport tune``, each one more candidate opened the way a
    deployer opts in (``ORT_LOAD_CONFIG_FROM_MODEL=1``, onnxruntime's defaults plus the file's
    ``ort_config``; ``config.threads`` does not apply to them).
    Never prints; progress goes to ``progress``. Raises `BnexportError` for bad input, before
    any work: the files (`check_bench_files`), memory for the input batches.
    """
    from bnexport.fold import fold_model

    check_benchable(source)
    config = config or BenchConfig()
    check_bench_files(onnx_path, tuned_paths, source, config.batch_sizes)
    check_feed_memory(source, config.batch_sizes)
    started = time.perf_counter()
    load_before = load_average()
    setup = _SetupSteps(progress, total=6)
    model = source.model.eval()
    input_shape = tuple(source.input_shape)
    with torch_threads(config.threads):
        setup("counting FLOPs")
        flops = count_flops(model, input_shape)
        setup("folding")
        folded = fold_model(model, (source.example_input,)).module.eval()
        with tempfile.TemporaryDirectory(prefix="bnexport-bench-") as tmp:
            infos, runners = _candidates(
                source, model, folded, Path(tmp), config, onnx_path, tuned_paths, setup
            )
            setup("measuring fp32 peak")
            feeds = _random_feeds(source.input_names[0], input_shape, config)
            infos, raw, peak = _measure(infos, runners, feeds, config, progress)
    measurements, comparisons = summarise(raw, flops.per_image, peak.gflops, config)
    return BenchReport(
        model=source.name,
        sha256=source.sha256,
        input_shape=input_shape,
        config=config,
        flops=flops,
        peak=peak,
        candidates=tuple(infos),
        measurements=tuple(measurements),
        comparisons=tuple(comparisons),
        environment=collect_environment(config.threads, load_before),
        seconds=time.perf_counter() - started,
    )


class _SetupSteps:
    """Reports the numbered steps of the "setup" stage to ``progress``."""

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = total
        self.done = 0

    def __call__(self, message: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(ProgressEvent("setup", self.done, self.total, message))


def _candidates(
    source: ModelSource,
    model: torch.nn.Module,
    folded: torch.nn.Module,
    tmp: Path,
    config: BenchConfig,
    onnx_path: str | os.PathLike[str] | None,
    tuned_paths: Sequence[str | os.PathLike[str]],
    setup: _SetupSteps,
) -> tuple[list[CandidateInfo], list[Runner]]:
    """Every candidate, in report order, and the runners of those that run (exports in ``tmp``)."""
    infos = [CandidateInfo(name, LABELS[name], True) for name in (BASELINE, FOLDED_EAGER)]
    names = source.input_names
    runners: list[Runner] = [
        TorchRunner(model, names, name=BASELINE),
        TorchRunner(folded, names, name=FOLDED_EAGER),
    ]

    def add(info: CandidateInfo, runner: OnnxRuntimeRunner | None) -> None:
        if onnx_path is None and info.name in (BNEXPORT_CPU, BNEXPORT_CUDA):
            info = replace(info, model_path=None)  # a temporary file: gone after the run
        infos.append(info)
        if runner is not None:
            runners.append(runner)

    setup("torch default export")
    add(
        *torch_export_candidate(
            model, source.example_input, tmp / "torch_default.onnx", config, names
        )
    )
    setup("bnexport export")
    if onnx_path is None:
        bn_path = tmp / "bnexport.onnx"
        bnexport_export(folded, source.example_input, bn_path)
    else:
        bn_path = Path(onnx_path)
    add(*ort_candidate(BNEXPORT_CPU, bn_path, bnexport_session_config(config, "cpu"), names))
    for info, runner in tuned_candidates(tuned_paths, names):
        add(info, runner)
    setup("probing CUDA")
    if config.include_cuda:
        add(*cuda_candidate(bn_path, config, names))
    else:
        add(CandidateInfo(BNEXPORT_CUDA, LABELS[BNEXPORT_CUDA], False, "not requested"), None)
    return infos, runners


def _measure(
    infos: list[CandidateInfo],
    runners: Sequence[Runner],
    feeds: dict[int, dict[str, np.ndarray]],
    config: BenchConfig,
    progress: Progress | None,
) -> tuple[list[CandidateInfo], RawTimes, PeakResult]:
    """The fp32 peak, each candidate's output error, the interleaved timings on ``feeds`` (one
    per batch size), the peak again (the better of the two probes: one noisy probe must not
    inflate "of peak")."""
    peak = _peak(config)
    infos = with_output_errors(infos, runners, feeds[int(config.batch_sizes[0])])
    raw = measure_interleaved(runners, feeds, config.timing, progress)
    peak = max(peak, _peak(config), key=lambda p: p.gflops)
    return infos, raw, peak


def _peak(config: BenchConfig) -> PeakResult:
    time.sleep(config.cooldown_s)  # let spinning worker threads settle first
    return measure_peak(config.peak_n, config.peak_repeats, config.min_time_s)


def _random_feeds(
    input_name: str, input_shape: tuple[int, ...], config: BenchConfig
) -> dict[int, dict[str, np.ndarray]]:
    """One standard-normal float32 batch per batch size, from ``config.seed``, as a feed
    (``{input_name: batch}``)."""
    import numpy as np

    rng = np.random.default_rng(config.seed)
    return {
        int(b): {input_name: rng.standard_normal((int(b), *input_shape), dtype=np.float32)}
        for b in config.batch_sizes
    }
