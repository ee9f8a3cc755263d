"""Benchmark a model side by side: PyTorch eager (unfolded, folded) and onnxruntime (CPU, CUDA).

Candidates (each one a *runner*: ``prepare(batch) -> call``):

* ``torch_eager`` — PyTorch eager on the model as loaded (the baseline every ratio is against);
* ``torch_eager_folded`` — PyTorch eager on ``fold_model(...)``'s module;
* ``ort_torch_export`` — onnxruntime CPU on torch's own default export of the *unfolded* model
  (``torch.onnx.export(model, (x,), dynamo=True)`` with a dynamic batch, default options) in a
  session with onnxruntime's default ``SessionOptions``: the obvious alternative to bnexport;
* ``ort_bnexport`` — onnxruntime CPU on bnexport's folded export, with bnexport's default session
  options (`bnexport.ort.SessionConfig`);
* ``ort_bnexport_cuda`` — the same file on onnxruntime's CUDA provider, only when
  `bnexport.ort.probe_cuda` proves it runs (otherwise listed as unavailable, with the reason).

Method. Per batch size, every runner is warmed up, then timed ``repeats`` times. One *repeat* times
each runner once, in an order from a balanced Latin square (Williams design), so machine drift and
the after-effects of the previous runner (caches) hit all runners alike. Before each timing the
bench idles ``cooldown_s``: onnxruntime's and OpenMP's worker threads spin for tens of milliseconds
after a call and would otherwise slow down whichever runner comes next. One timing runs the call
``n`` times back to back (``n`` chosen during warm-up so it lasts at least
``min_time_s``) and records seconds per call. Ratios are *paired*: ``t_baseline[r] / t_runner[r]``
within the same repeat ``r``, summarised by their median (and 10th/90th percentiles).

Work and peak. ``count_flops`` counts ``FLOPs = 2 × multiply-accumulates`` of every Conv,
ConvTranspose and Linear call in one batch-1 forward (elementwise ops are not counted). Achieved
``GFLOP/s = FLOPs/image × images/s``; the machine's fp32 peak is measured in the same run as the
best rate of an ``n × n`` float32 matrix product (``2n³`` FLOPs) in PyTorch, same thread count.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from bnexport import __version__
from bnexport.errors import BnexportError, raise_if_interrupted

if TYPE_CHECKING:
    import numpy as np
    import torch

    from bnexport.source import ModelSource

DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 64, 256)
DEFAULT_WARMUP_S = 0.2  # per runner and batch size, before any timing
DEFAULT_REPEATS = 31
DEFAULT_MIN_TIME_S = 0.02  # one timing lasts at least this long (many calls at batch 1)
# Idle time before each timing: onnxruntime's intra-op workers keep spinning for 20-50 ms after a
# run (measured here), stealing a core from whatever is timed next; 50 ms lets them park.
DEFAULT_COOLDOWN_S = 0.05
DEFAULT_PEAK_N = 1024  # the peak probe multiplies two n×n float32 matrices
DEFAULT_PEAK_REPEATS = 5
DEFAULT_SEED = 0
LATENCY_BATCH = 1  # the batch size reported as latency; the others as throughput
# A candidate "matches" when max|out - baseline out| <= OUTPUT_MATCH_RTOL * max|baseline out|:
# loose on purpose (fp32 folding and kernel order differ by ~1e-6); it catches a wrong --onnx file.
OUTPUT_MATCH_RTOL = 1e-3

BASELINE = "torch_eager"
REFERENCE_EXPORT = "ort_torch_export"
BNEXPORT_CPU = "ort_bnexport"
BNEXPORT_CUDA = "ort_bnexport_cuda"
TUNED_PREFIX = "ort_tuned:"  # + the tuned file's name (bnexport tune's output)

LABELS: dict[str, str] = {
    "torch_eager": "PyTorch eager, unfolded",
    "torch_eager_folded": "PyTorch eager, folded",
    "ort_torch_export": "onnxruntime CPU, torch default export (ORT defaults)",
    "ort_bnexport": "onnxruntime CPU, bnexport folded export (bnexport defaults)",
    "ort_bnexport_cuda": "onnxruntime CUDA, bnexport folded export",
}


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how long. ``threads=None`` leaves every backend at its own default;
    a number sets PyTorch's intra-op threads and every onnxruntime session's intra-op threads."""

    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    warmup_s: float = DEFAULT_WARMUP_S
    repeats: int = DEFAULT_REPEATS
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
                all(int(b) >= 1 for b in self.batch_sizes),
                f"batch sizes must be >= 1, got {list(self.batch_sizes)}",
            ),
            (
                len(set(self.batch_sizes)) == len(self.batch_sizes),
                f"batch sizes must be distinct, got {list(self.batch_sizes)}",
            ),
            (self.repeats >= 1, f"repeats must be >= 1, got {self.repeats}"),
            (self.warmup_s >= 0, f"warmup must be >= 0 s, got {self.warmup_s}"),
            (self.min_time_s > 0, f"min time per timing must be > 0 s, got {self.min_time_s}"),
            (self.cooldown_s >= 0, f"cooldown must be >= 0 s, got {self.cooldown_s}"),
            (
                self.threads is None or self.threads >= 1,
                f"threads must be >= 1, got {self.threads}",
            ),
            (self.peak_n >= 16, f"peak matrix size must be >= 16, got {self.peak_n}"),
            (self.peak_repeats >= 1, f"peak repeats must be >= 1, got {self.peak_repeats}"),
        ]
        for ok, message in checks:
            if not ok:
                raise BnexportError(f"bench: {message}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["batch_sizes"] = list(self.batch_sizes)
        return d


@dataclass(frozen=True)
class BenchEvent:
    """Progress: ``stage`` is "setup", "peak" or "measure"; ``done`` of ``total`` steps."""

    stage: str
    done: int
    total: int
    message: str


ProgressCallback = Callable[[BenchEvent], None]


class Runner(Protocol):
    """One candidate: ``prepare`` binds a float32 batch and returns the call to time."""

    name: str

    def prepare(self, batch: np.ndarray) -> Callable[[], Any]: ...


class TorchRunner:
    """PyTorch eager, ``inference_mode``, on CPU."""

    def __init__(self, name: str, module: torch.nn.Module) -> None:
        self.name = name
        self.module = module

    def prepare(self, batch: np.ndarray) -> Callable[[], Any]:
        import torch

        x = torch.from_numpy(batch)
        module = self.module

        def call() -> Any:
            with torch.inference_mode():
                return module(x)

        return call


class OrtRunner:
    """An onnxruntime ``InferenceSession``, called the way users call it: ``session.run``."""

    def __init__(self, name: str, session: Any) -> None:
        self.name = name
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def prepare(self, batch: np.ndarray) -> Callable[[], Any]:
        feed = {self.input_name: batch}
        run = self.session.run

        def call() -> Any:
            return run(None, feed)

        return call


@dataclass(frozen=True)
class LayerFlops:
    """FLOPs (2 × MACs) of one Conv/ConvTranspose/Linear call for one input item."""

    name: str
    kind: str
    flops: int


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per image: the sum over ``layers``."""

    per_image: int
    layers: tuple[LayerFlops, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"per_image": self.per_image, "layers": [asdict(layer) for layer in self.layers]}


@dataclass(frozen=True)
class PeakResult:
    """The machine's measured fp32 matrix-product rate (GFLOP/s): best and median of repeats."""

    gflops: float
    median_gflops: float
    n: int
    threads: int
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
class Ratio:
    """Paired ratio ``t_reference[r] / t_candidate[r]`` over repeats: > 1 means faster."""

    median: float
    p10: float
    p90: float

    def to_dict(self) -> dict[str, float]:
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


# --------------------------------------------------------------------------------------------
# Work and peak


def count_flops(model: torch.nn.Module, input_shape: Sequence[int]) -> FlopCount:
    """FLOPs per image of ``model`` (2 × MACs of Conv/ConvTranspose/Linear), from one forward.

    Conv: ``2·|out|·(C_in/groups)·∏k``; ConvTranspose: ``2·|in|·(C_out/groups)·∏k``;
    Linear: ``2·|in|·out_features`` (``|t|`` = elements of a batch-1 tensor). Layers called twice
    count twice; functional calls (``F.conv2d``) are not seen.
    """
    import torch
    from torch import nn

    layers: list[LayerFlops] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        x = inputs[0]
        if isinstance(module, nn.modules.conv._ConvNd):
            k = math.prod(module.kernel_size)
            if module.transposed:
                flops = 2 * x.numel() * (module.out_channels // module.groups) * k
            else:
                flops = 2 * output.numel() * (module.in_channels // module.groups) * k
        else:  # nn.Linear
            flops = 2 * x.numel() * module.out_features
        layers.append(LayerFlops(names.get(module, "?"), type(module).__name__, int(flops)))

    kinds = (nn.modules.conv._ConvNd, nn.Linear)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.inference_mode():
            model(torch.zeros((1, *input_shape), dtype=torch.float32))
    finally:
        for h in handles:
            h.remove()
    return FlopCount(sum(layer.flops for layer in layers), tuple(layers))


def measure_peak(
    n: int = DEFAULT_PEAK_N,
    repeats: int = DEFAULT_PEAK_REPEATS,
    min_time_s: float = DEFAULT_MIN_TIME_S,
) -> PeakResult:
    """fp32 GFLOP/s of ``torch.mm`` on two ``n × n`` matrices (``2n³`` FLOPs), best of repeats."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn((n, n), generator=gen)
    b = torch.randn((n, n), generator=gen)
    out = torch.empty((n, n))

    def call() -> None:
        torch.mm(a, b, out=out)

    with _no_gc():
        calls = _calibrate(call, min_time_s, min_time_s)
        rates = [2 * n**3 / _time(call, calls) / 1e9 for _ in range(repeats)]
    return PeakResult(
        gflops=max(rates),
        median_gflops=statistics.median(rates),
        n=n,
        threads=torch.get_num_threads(),
        method=f"torch.mm float32 {n}x{n} @ {n}x{n}, best of {repeats}",
    )


# --------------------------------------------------------------------------------------------
# Timing


def interleaved_orders(k: int, repeats: int) -> list[list[int]]:
    """Run orders for ``repeats`` rounds of ``k`` runners: a balanced Latin square (Williams).

    Over each full cycle (``k`` rounds for even ``k``, ``2k`` for odd) every runner takes every
    position equally often and directly follows every other runner equally often.
    """
    if k <= 0:
        return [[] for _ in range(repeats)]
    base = [0]
    lo, hi = 1, k - 1
    for i in range(1, k):
        if i % 2:
            base.append(lo)
            lo += 1
        else:
            base.append(hi)
            hi -= 1
    rows = [[(v + r) % k for v in base] for r in range(k)]
    if k % 2:
        rows += [row[::-1] for row in rows]
    return [rows[r % len(rows)] for r in range(repeats)]


def _time(call: Callable[[], Any], calls: int) -> float:
    """Seconds per call over ``calls`` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - t0) / calls


def _calibrate(call: Callable[[], Any], warmup_s: float, min_time_s: float) -> int:
    """Warm ``call`` up for ``warmup_s`` (at least 2 calls); return calls per ``min_time_s``."""
    call()
    calls, t0 = 0, time.perf_counter()
    while True:
        call()
        calls += 1
        elapsed = time.perf_counter() - t0
        if calls >= 2 and elapsed >= warmup_s:
            break
    per_call = max(elapsed / calls, 1e-9)
    return max(1, math.ceil(min_time_s / per_call))


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), ``q`` in [0, 100]."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def paired_ratio(reference: Sequence[float], candidate: Sequence[float]) -> Ratio:
    """Median and 10th/90th percentiles of ``reference[r] / candidate[r]``."""
    ratios = [r / c for r, c in zip(reference, candidate, strict=True)]
    return Ratio(statistics.median(ratios), _percentile(ratios, 10), _percentile(ratios, 90))


def measure_interleaved(
    runners: Sequence[Runner],
    batches: Mapping[int, np.ndarray],
    config: BenchConfig,
    progress: ProgressCallback | None = None,
) -> dict[tuple[str, int], tuple[list[float], int]]:
    """Time every runner on every batch, interleaved; ``{(name, batch): (seconds/call, calls)}``.

    Per batch size: warm-up and calibration of each runner, then ``config.repeats`` rounds, each
    timing every runner once in the order `interleaved_orders` gives, after ``config.cooldown_s``
    of idle time (so the previous runner's spinning threads have parked).
    """
    results: dict[tuple[str, int], tuple[list[float], int]] = {}
    total = len(batches) * config.repeats
    done = 0
    orders = interleaved_orders(len(runners), config.repeats)
    with _no_gc():
        for size, batch in batches.items():
            calls_ = [r.prepare(batch) for r in runners]
            counts = [_calibrate(c, config.warmup_s, config.min_time_s) for c in calls_]
            times: list[list[float]] = [[] for _ in runners]
            for order in orders:
                for i in order:
                    if config.cooldown_s:
                        time.sleep(config.cooldown_s)
                    times[i].append(_time(calls_[i], counts[i]))
                done += 1
                if progress is not None:
                    progress(BenchEvent("measure", done, total, f"batch {size}"))
            for i, r in enumerate(runners):
                results[(r.name, size)] = (times[i], counts[i])
    return results


# --------------------------------------------------------------------------------------------
# The run


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
    progress: ProgressCallback | None = None,
    tuned_paths: Sequence[str | os.PathLike[str]] = (),
) -> BenchReport:
    """Measure ``source.model`` as PyTorch eager (unfolded, folded) and on onnxruntime.

    ``onnx_path``: use this file as bnexport's export instead of folding and exporting here.
    ``tuned_paths``: files from ``bnexport tune``, each one more candidate opened the way a
    deployer opts in (``ORT_LOAD_CONFIG_FROM_MODEL=1``, onnxruntime's defaults plus the file's
    ``ort_config``; ``config.threads`` does not apply to them).
    Never prints; progress goes to ``progress``. Raises `BnexportError` for bad input.
    """
    import numpy as np
    import torch

    from bnexport.fold import fold_model

    check_benchable(source)
    config = config or BenchConfig()
    started = time.perf_counter()
    load_before = _loadavg()
    old_threads = torch.get_num_threads()
    steps = 6
    step = 0

    def setup(message: str) -> None:
        nonlocal step
        step += 1
        if progress is not None:
            progress(BenchEvent("setup", step, steps, message))

    model = source.model.eval()
    input_shape = tuple(source.input_shape)
    try:
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        setup("counting FLOPs")
        flops = count_flops(model, input_shape)
        setup("folding")
        folded = fold_model(model, (source.example_input,)).module.eval()

        with tempfile.TemporaryDirectory(prefix="bnexport-bench-") as tmp:
            runners: list[Runner] = [TorchRunner(BASELINE, model)]
            infos = [CandidateInfo(BASELINE, LABELS[BASELINE], True)]
            runners.append(TorchRunner("torch_eager_folded", folded))
            infos.append(CandidateInfo("torch_eager_folded", LABELS["torch_eager_folded"], True))

            setup("torch default export")
            ref_path = Path(tmp) / "torch_default.onnx"
            info, runner = _torch_export_candidate(model, source.example_input, ref_path, config)
            infos.append(info)
            if runner is not None:
                runners.append(runner)

            setup("bnexport export")
            if onnx_path is None:
                bn_path = Path(tmp) / "bnexport.onnx"
                _bnexport_export(folded, source.example_input, bn_path)
            else:
                bn_path = Path(onnx_path)
            info, runner = _ort_candidate(BNEXPORT_CPU, bn_path, _bnexport_config(config, "cpu"))
            if onnx_path is None:  # a temporary file: gone after the run
                info = replace(info, model_path=None)
            infos.append(info)
            if runner is not None:
                runners.append(runner)
            for info, runner in _tuned_candidates(tuned_paths):
                infos.append(info)
                runners.append(runner)

            setup("probing CUDA")
            if config.include_cuda:
                info, runner = _cuda_candidate(bn_path, config)
                if onnx_path is None:
                    info = replace(info, model_path=None)
                infos.append(info)
                if runner is not None:
                    runners.append(runner)
            else:
                infos.append(
                    CandidateInfo(BNEXPORT_CUDA, LABELS[BNEXPORT_CUDA], False, "not requested")
                )

            setup("measuring fp32 peak")
            time.sleep(config.cooldown_s)  # let spinning worker threads settle first
            peak = measure_peak(config.peak_n, config.peak_repeats, config.min_time_s)

            rng = np.random.default_rng(config.seed)
            batches = {
                int(b): rng.standard_normal((int(b), *input_shape), dtype=np.float32)
                for b in config.batch_sizes
            }
            infos = _with_output_errors(infos, runners, batches[int(config.batch_sizes[0])])
            raw = measure_interleaved(runners, batches, config, progress)
            # Peak again after the timings: one noisy probe must not inflate "of peak".
            time.sleep(config.cooldown_s)
            peak = max(
                peak,
                measure_peak(config.peak_n, config.peak_repeats, config.min_time_s),
                key=lambda p: p.gflops,
            )
    finally:
        torch.set_num_threads(old_threads)

    measurements, comparisons = _summarise(raw, flops.per_image, peak.gflops, config)
    environment = collect_environment(config)
    environment["load_average_before"] = load_before
    environment["load_average_after"] = _loadavg()
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
        environment=environment,
        seconds=time.perf_counter() - started,
    )


def _summarise(
    raw: Mapping[tuple[str, int], tuple[list[float], int]],
    flops_per_image: int,
    peak_gflops: float,
    config: BenchConfig,
) -> tuple[list[Measurement], list[Comparison]]:
    measurements: list[Measurement] = []
    comparisons: list[Comparison] = []
    for (name, size), (times, calls) in raw.items():
        median = statistics.median(times)
        ips = size / median
        gflops = flops_per_image * ips / 1e9 if flops_per_image else None
        measurements.append(
            Measurement(
                candidate=name,
                batch_size=size,
                times_s=tuple(times),
                calls_per_timing=calls,
                median_s=median,
                p90_s=_percentile(times, 90),
                images_per_s=ips,
                gflops=gflops,
                peak_fraction=gflops / peak_gflops if gflops is not None and peak_gflops else None,
                speedup=paired_ratio(raw[(BASELINE, size)][0], times),
            )
        )
    for size in config.batch_sizes:
        tuned = sorted({n for n, _ in raw if n.startswith(TUNED_PREFIX)})
        for name in (BNEXPORT_CPU, BNEXPORT_CUDA, *tuned):
            if (name, size) in raw and (REFERENCE_EXPORT, size) in raw:
                ratio = paired_ratio(raw[(REFERENCE_EXPORT, size)][0], raw[(name, size)][0])
                comparisons.append(Comparison(name, REFERENCE_EXPORT, size, ratio))
    return measurements, comparisons


def _with_output_errors(
    infos: list[CandidateInfo], runners: Sequence[Runner], batch: np.ndarray
) -> list[CandidateInfo]:
    """Record each runner's max |output − baseline output| on ``batch``: a wrong model is no win."""
    import numpy as np

    outputs = {r.name: _as_numpy(r.prepare(batch)()) for r in runners}
    ref = outputs[BASELINE]
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    result = []
    for info in infos:
        if info.name in outputs:
            out = outputs[info.name]
            if out.shape != ref.shape:
                diff = math.inf
            else:
                diff = float(np.max(np.abs(out - ref))) if ref.size else 0.0
            info = replace(info, max_abs_diff=diff, matches=diff <= OUTPUT_MATCH_RTOL * scale)
        result.append(info)
    return result


def _as_numpy(output: Any) -> np.ndarray:
    import numpy as np

    if isinstance(output, (list, tuple)):
        output = output[0]
    if hasattr(output, "detach"):
        output = output.detach().cpu().numpy()
    return np.asarray(output, dtype=np.float64)


def _bnexport_config(config: BenchConfig, provider: str) -> Any:
    from bnexport.ort import SessionConfig

    session_config = SessionConfig(provider=provider)  # type: ignore[arg-type]
    if config.threads is not None:
        session_config = replace(session_config, intra_op_num_threads=config.threads)
    return session_config


def _ort_candidate(name: str, path: Path, session_config: Any) -> tuple[CandidateInfo, Any]:
    from bnexport.ort import make_session

    t0 = time.perf_counter()
    session = make_session(path, session_config)
    init_s = time.perf_counter() - t0
    info = CandidateInfo(
        name,
        LABELS[name],
        True,
        session_options=session_config.to_dict(),
        model_path=str(path),
        op_counts=_op_counts(path),
        init_s=init_s,
    )
    return info, OrtRunner(name, session)


def tuned_name(path: str | os.PathLike[str]) -> str:
    """The candidate name of a tuned file: ``ort_tuned:<file name>``."""
    return f"{TUNED_PREFIX}{Path(path).name}"


def _tuned_candidates(
    paths: Sequence[str | os.PathLike[str]],
) -> list[tuple[CandidateInfo, OrtRunner]]:
    """One candidate per tuned file, opened with its own ``ort_config`` (as a deployer does)."""
    from bnexport.ort_config import model_settings, open_with_model_config

    out = []
    names = [tuned_name(p) for p in paths]
    if len(set(names)) != len(names):
        raise BnexportError(f"tuned files need distinct file names, got {[str(p) for p in paths]}")
    for path, name in zip(paths, names, strict=True):
        if not Path(path).is_file():
            raise BnexportError(f"--tuned {path} not found; check the path")
        settings = model_settings(path)
        if settings is None:
            raise BnexportError(
                f"{path} carries no ort_config session options; tune it first "
                "(bnexport tune MODEL.onnx -o TUNED.onnx)"
            )
        t0 = time.perf_counter()
        session = open_with_model_config(path)
        init_s = time.perf_counter() - t0
        label = f"onnxruntime CPU, {Path(path).name} (its ort_config: {settings.label()})"
        info = CandidateInfo(
            name,
            label,
            True,
            session_options={
                "ort_config": settings.to_dict(),
                "opt_in": "ORT_LOAD_CONFIG_FROM_MODEL=1",
            },
            model_path=str(path),
            op_counts=_op_counts(Path(path)),
            init_s=init_s,
        )
        out.append((info, OrtRunner(name, session)))
    return out


def _cuda_candidate(path: Path, config: BenchConfig) -> tuple[CandidateInfo, Any]:
    from bnexport.ort import probe_cuda

    probe = probe_cuda()
    if not probe.available:
        return CandidateInfo(BNEXPORT_CUDA, LABELS[BNEXPORT_CUDA], False, probe.reason), None
    return _ort_candidate(BNEXPORT_CUDA, path, _bnexport_config(config, "cuda"))


def _torch_export_candidate(
    model: torch.nn.Module, example_input: torch.Tensor, path: Path, config: BenchConfig
) -> tuple[CandidateInfo, Any]:
    """torch's own default ONNX export of the unfolded model in a default onnxruntime session."""
    import onnxruntime as ort
    import torch

    from bnexport.export import quiet_exporter

    name = REFERENCE_EXPORT
    x = example_input.detach()
    if x.shape[0] < 2:  # a batch of 1 would be specialised to a constant
        x = x.expand(2, *x.shape[1:]).clone()
    try:
        with quiet_exporter():
            program = torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
            assert program is not None
            program.save(str(path))
    except Exception as exc:
        raise_if_interrupted(exc)
        reason = f"torch.onnx.export(dynamo=True) failed: {' '.join(str(exc).split())[:300]}"
        return CandidateInfo(name, LABELS[name], False, reason), None

    options = ort.SessionOptions()  # onnxruntime's defaults: that is the comparison
    options.log_severity_level = 3  # logging only: keeps ORT warnings off the console
    if config.threads is not None:
        options.intra_op_num_threads = config.threads
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    init_s = time.perf_counter() - t0
    described = {
        "defaults": "onnxruntime.SessionOptions()",
        "intra_op_num_threads": options.intra_op_num_threads,
        "graph_optimization_level": str(options.graph_optimization_level),
    }
    info = CandidateInfo(
        name,
        LABELS[name],
        True,
        session_options=described,
        model_path=None,  # a temporary file
        op_counts=_op_counts(path),
        init_s=init_s,
    )
    return info, OrtRunner(name, session)


def _bnexport_export(folded: torch.nn.Module, example_input: torch.Tensor, path: Path) -> None:
    from bnexport.export import export_onnx

    export_onnx(folded, example_input, path, fuse_batchnorm=True)


def _op_counts(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------------------------
# Environment


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    wanted = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def collect_environment(config: BenchConfig | None = None) -> dict[str, Any]:
    """Versions, CPU, thread counts and the date: what a figure needs to be reproduced."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from bnexport.ort import SessionConfig

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count()
    threads = config.threads if config is not None else None
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "cpus_available": affinity,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "bnexport": __version__,
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "onnx": onnx.__version__,
            "numpy": np.__version__,
        },
        "threads": {
            "requested": threads,
            "torch_intra_op": threads or torch.get_num_threads(),
            "torch_inter_op": torch.get_num_interop_threads(),
            "ort_bnexport_intra_op": threads or SessionConfig().intra_op_num_threads,
            "ort_default_intra_op": threads or 0,
            "note": "0 = onnxruntime picks one thread per physical core",
        },
        "onnxruntime_providers": list(ort.get_available_providers()),
        "env": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
        },
    }
