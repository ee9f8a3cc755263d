"""Interleaved, cooled-down, paired timing: what `bnexport bench` and `bnexport tune` measure with.

Per batch size, every runner is warmed up, then timed ``repeats`` times. One *repeat* times each
runner once, in an order from a balanced Latin square (Williams design), so machine drift and the
after-effects of the previous runner (caches) hit all runners alike. Before each timing the bench
idles ``cooldown_s``: onnxruntime's and OpenMP's worker threads spin for tens of milliseconds after
a call and would otherwise slow down whichever runner comes next. One timing runs the call ``n``
times back to back (``n`` chosen during warm-up so it lasts at least ``min_time_s``) and records
seconds per call. Ratios are *paired*: ``t_baseline[r] / t_runner[r]`` within the same repeat
``r``, summarised by their median (and 10th/90th percentiles).
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from bnexport.bench.config import BenchConfig, BenchEvent, ProgressCallback

if TYPE_CHECKING:
    import numpy as np

    from bnexport.bench.runners import Runner

#: ``{(runner name, batch size): (seconds per call, one per repeat; calls per timing)}``
RawTimes = dict[tuple[str, int], tuple[list[float], int]]


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
    runners: Sequence[Runner],
    batches: Mapping[int, np.ndarray],
    config: BenchConfig,
    progress: ProgressCallback | None = None,
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
                    progress(BenchEvent("measure", done, total, f"batch {size}"))
            for i, r in enumerate(runners):
                results[(r.name, size)] = (times[i], counts[i])
    return results
