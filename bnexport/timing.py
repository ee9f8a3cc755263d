"""The timing core: interleaved, cooled-down, paired timing that `bnexport bench` and `tune`
measure with, and the environment a figure needs to be reproduced.

Per batch size, every runner is warmed up, then timed ``repeats`` times. One *repeat* times each
runner once, in an order from a balanced Latin square (Williams design), so machine drift and the
after-effects of the previous runner (caches) hit all runners alike. Before each timing the bench
idles ``cooldown_s``: onnxruntime's and OpenMP's worker threads spin for tens of milliseconds after
a call and would otherwise slow down whichever runner comes next. One timing runs the call ``n``
times back to back (``n`` chosen during warm-up so it lasts at least ``min_time_s``) and records
seconds per call. Ratios are *paired*: ``t_baseline[r] / t_runner[r]`` within the same repeat
``r``, summarised by their median (and 10th/90th percentiles). `TimingConfig` holds the knobs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from bnexport.defaults import DEFAULT_COOLDOWN_S, DEFAULT_MIN_TIME_S, DEFAULT_WARMUP_S
from bnexport.errors import BnexportError
from bnexport.machine import cpu_flags, cpu_model, cpus_available, load_average, versions
from bnexport.progress import Progress, ProgressEvent

#: ``{(runner name, batch size): (seconds per call, one per repeat; calls per timing)}``
RawTimes = dict[tuple[str, int], tuple[list[float], int]]


class Timed(Protocol):
    """What the timing core times: ``prepare`` binds a batch and returns the call to time."""

    name: str

    def prepare(self, batch: Any) -> Callable[[], Any]: ...


@dataclass(frozen=True)
class TimingConfig:
    """How long to warm up, how long one timing lasts at least, the idle time before each timing,
    and how many interleaved rounds (repeats) to time."""

    repeats: int
    warmup_s: float = DEFAULT_WARMUP_S
    min_time_s: float = DEFAULT_MIN_TIME_S
    cooldown_s: float = DEFAULT_COOLDOWN_S

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup_s < 0 or self.min_time_s <= 0 or self.cooldown_s < 0:
            raise BnexportError(
                f"timing: repeats >= 1, warmup >= 0 s, min time > 0 s and cooldown >= 0 s, got "
                f"{self.repeats}, {self.warmup_s}, {self.min_time_s}, {self.cooldown_s}"
            )


@dataclass(frozen=True)
class Ratio:
    """Paired ratio ``t_reference[r] / t_candidate[r]`` over repeats: > 1 means faster."""

    median: float
    p10: float
    p90: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


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


def time_calls(call: Callable[[], Any], calls: int) -> float:
    """Seconds per call over ``calls`` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - t0) / calls


def calibrate(call: Callable[[], Any], warmup_s: float, min_time_s: float) -> int:
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
def no_gc() -> Iterator[None]:
    """Garbage collection done first, then off for the block (a collection is no kernel time)."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), ``q`` in [0, 100]."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def paired_ratio(reference: Sequence[float], candidate: Sequence[float]) -> Ratio:
    """Median and 10th/90th percentiles of ``reference[r] / candidate[r]``."""
    ratios = [r / c for r, c in zip(reference, candidate, strict=True)]
    return Ratio(statistics.median(ratios), percentile(ratios, 10), percentile(ratios, 90))


def measure_interleaved(
    runners: Sequence[Timed],
    batches: Mapping[int, Any],
    config: TimingConfig,
    progress: Progress | None = None,
) -> RawTimes:
    """Time every runner on every batch, interleaved; ``{(name, batch): (seconds/call, calls)}``.

    Per batch size: warm-up and calibration of each runner, then ``config.repeats`` rounds, each
    timing every runner once in the order `interleaved_orders` gives, after ``config.cooldown_s``
    of idle time (so the previous runner's spinning threads have parked).
    """
    results: RawTimes = {}
    total = len(batches) * config.repeats
    done = 0
    orders = interleaved_orders(len(runners), config.repeats)
    with no_gc():
        for size, batch in batches.items():
            calls_ = [r.prepare(batch) for r in runners]
            counts = [calibrate(c, config.warmup_s, config.min_time_s) for c in calls_]
            times: list[list[float]] = [[] for _ in runners]
            for order in orders:
                for i in order:
                    if config.cooldown_s:
                        time.sleep(config.cooldown_s)
                    times[i].append(time_calls(calls_[i], counts[i]))
                done += 1
                if progress is not None:
                    progress(ProgressEvent("measure", done, total, f"batch {size}"))
            for i, r in enumerate(runners):
                results[(r.name, size)] = (times[i], counts[i])
    return results


def collect_environment(
    threads: int | None = None, load_before: Sequence[float] | None = None
) -> dict[str, Any]:
    """What a figure needs to be reproduced: versions, CPU, thread counts (``threads``: the count
    asked for, None: each backend's default), the date, and the load average before
    (``load_before``, as `bnexport.machine.load_average` read it when the run started) and now."""
    import onnxruntime as ort
    import torch

    from bnexport.ort import DEFAULT_INTRA_OP_THREADS

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "cpus_available": cpus_available(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions(),
        "threads": {
            "requested": threads,
            "torch_intra_op": threads or torch.get_num_threads(),
            "torch_inter_op": torch.get_num_interop_threads(),
            "ort_bnexport_intra_op": threads or DEFAULT_INTRA_OP_THREADS,
            "ort_default_intra_op": threads or 0,
            "note": "0 = onnxruntime picks one thread per physical core",
        },
        "onnxruntime_providers": list(ort.get_available_providers()),
        "env": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
        },
        "load_average_before": None if load_before is None else list(load_before),
        "load_average_after": load_average(),
    }
