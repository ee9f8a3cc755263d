"""`bnexport.timing`: the interleaving design, the timed rounds, the cool-down and paired ratios."""

from __future__ import annotations

import itertools
import statistics
import time
from collections import Counter

import numpy as np
import pytest

from bnexport.errors import BnexportError
from bnexport.timing import TimingConfig, interleaved_orders, measure_interleaved, paired_ratio

# --------------------------------------------------------------------------------------------
# Interleaving and timing


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_interleaved_orders_are_balanced(k: int) -> None:
    cycle = 2 * k if k % 2 else k
    orders = interleaved_orders(k, 2 * cycle)
    assert all(sorted(order) == list(range(k)) for order in orders)
    assert orders[:cycle] == orders[cycle:]
    # every runner takes every position equally often
    positions = Counter((order.index(i), i) for order in orders[:cycle] for i in range(k))
    assert set(positions.values()) == {cycle // k}
    # ... and directly follows every other runner equally often (no fixed neighbour)
    pairs = Counter((a, b) for order in orders[:cycle] for a, b in itertools.pairwise(order))
    assert len(pairs) == k * (k - 1) and len(set(pairs.values())) == 1


class _Recorder:
    """A fake runner: each call appends its name to a shared log and sleeps `seconds`."""

    def __init__(
        self, name: str, log: list[str], seconds: float, stamps: list[float] | None = None
    ) -> None:
        self.name, self.log, self.seconds = name, log, seconds
        self.stamps = stamps if stamps is not None else []

    def prepare(self, batch: np.ndarray):  # type: ignore[no-untyped-def]
        def call() -> None:
            self.log.append(self.name)
            self.stamps.append(time.perf_counter())
            time.sleep(self.seconds)

        return call


def _blocks(log: list[str]) -> list[tuple[str, int]]:
    """Run-length encoding of the call log."""
    out: list[tuple[str, int]] = []
    for name in log:
        if out and out[-1][0] == name:
            out[-1] = (name, out[-1][1] + 1)
        else:
            out.append((name, 1))
    return out


def test_measure_interleaves_rounds_and_times_each_runner() -> None:
    log: list[str] = []
    runners = [
        _Recorder("fast", log, 0.001),
        _Recorder("slow", log, 0.01),
        _Recorder("mid", log, 0.003),
    ]
    config = TimingConfig(repeats=6, warmup_s=0.0, min_time_s=0.005, cooldown_s=0.0)
    batch = np.zeros((1, 1), np.float32)
    events: list[tuple[str, int, int]] = []
    raw = measure_interleaved(
        runners, {1: batch}, config, lambda e: events.append((e.stage, e.done, e.total))
    )

    # Warm-up/calibration first (each runner in turn), then 6 rounds of one timed block per runner,
    # each block the runner's calibrated number of back-to-back calls.
    counts = {r.name: raw[(r.name, 1)][1] for r in runners}
    orders = interleaved_orders(3, 6)
    assert len({tuple(order) for order in orders}) > 1  # the order really changes between rounds
    expected = [
        runners[i].name for order in orders for i in order for _ in range(counts[runners[i].name])
    ]
    assert log[-len(expected) :] == expected
    assert [name for name, _ in _blocks(log[: -len(expected)])] == ["fast", "slow", "mid"]
    assert counts["fast"] > counts["slow"] >= 1

    times = {name: raw[(name, 1)][0] for name in ("fast", "slow", "mid")}
    assert all(len(t) == 6 for t in times.values())
    assert min(times["slow"]) >= 0.01 and min(times["fast"]) >= 0.001  # sleep never undershoots
    assert statistics.median(times["slow"]) > 3 * statistics.median(times["fast"])
    assert events[-1] == ("measure", 6, 6)


def test_cooldown_idles_before_every_timing() -> None:
    """Spinning thread pools of the previous runner must park: an idle gap before each timing."""
    log: list[str] = []
    stamps: list[float] = []
    runners = [_Recorder(n, log, 0.0, stamps) for n in ("a", "b")]
    config = TimingConfig(repeats=3, warmup_s=0.0, min_time_s=1e-6, cooldown_s=0.02)
    raw = measure_interleaved(runners, {1: np.zeros((1, 1), np.float32)}, config)
    assert raw[("a", 1)][1] == raw[("b", 1)][1] == 1  # one call per timing
    timed = stamps[-6:]  # the 3 rounds x 2 runners
    gaps = [later - earlier for earlier, later in itertools.pairwise(timed)]
    assert min(gaps) >= 0.02


def test_paired_ratio_pairs_each_repeat() -> None:
    reference = [2.0, 4.0, 6.0, 8.0, 100.0]
    candidate = [1.0, 2.0, 3.0, 4.0, 50.0]  # always exactly 2x faster, despite the drift
    r = paired_ratio(reference, candidate)
    assert (r.median, r.p10, r.p90) == (2.0, 2.0, 2.0)
    r = paired_ratio([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 4.0, 0.5])
    assert r.median == pytest.approx(np.median([1.0, 0.5, 0.25, 2.0]))
    assert r.p10 == pytest.approx(np.percentile([1.0, 0.5, 0.25, 2.0], 10))


def test_a_bad_timing_config_is_rejected() -> None:
    with pytest.raises(BnexportError, match="repeats >= 1"):
        TimingConfig(repeats=0)
