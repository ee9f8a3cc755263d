"""`bnexport.limits`: the bounds every command checks before any work, and the memory reading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import bnexport.limits as limits
from bnexport.errors import BnexportError


@pytest.mark.parametrize("value", [math.inf, math.nan, -0.5, 3600.5, 1e9])
def test_a_duration_must_be_finite_and_at_most_an_hour(value: float) -> None:
    with pytest.raises(BnexportError, match=r"^--warmup .*: give a finite number of seconds"):
        limits.check_seconds(value, "--warmup")


def test_durations_inside_the_bounds_pass() -> None:
    assert limits.check_seconds(0.0, "--cooldown") == 0.0
    assert limits.check_seconds(3600.0, "--warmup") == 3600.0
    with pytest.raises(BnexportError, match="> 0"):
        limits.check_seconds(0.0, "--min-time", positive=True)
    assert limits.check_seconds(7200.0, "--budget", maximum=limits.MAX_BUDGET_S) == 7200.0


def test_the_thread_cap_follows_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "cpus_available", lambda: 16)
    assert limits.thread_cap() == 64
    assert limits.check_threads(64, "--threads") == 64
    with pytest.raises(BnexportError, match=r"--threads 65: give 1 to 64 threads"):
        limits.check_threads(65, "--threads")
    monkeypatch.setattr(limits, "cpus_available", lambda: 1)
    assert limits.thread_cap() == limits.MIN_THREAD_CAP  # a little oversubscription stays possible
    assert limits.check_threads(0, "--fix intra_op_num_threads=", allow_zero=True) == 0
    with pytest.raises(BnexportError, match=r"^--fix intra_op_num_threads=9: give 0 to 8"):
        limits.check_threads(9, "--fix intra_op_num_threads=", allow_zero=True)


def test_seeds_and_temperatures() -> None:
    assert limits.check_seed(2**64 - 1) == 2**64 - 1
    for bad in (-1, 2**64):
        with pytest.raises(BnexportError, match="give a seed from 0 to 2\\*\\*64 - 1"):
            limits.check_seed(bad)
    assert limits.check_temperature(1.5) == 1.5
    for bad in (0.0, -1.0, 1e40, math.nan, math.inf):
        with pytest.raises(BnexportError, match="give a temperature > 0"):
            limits.check_temperature(bad)


def test_available_memory_is_the_lower_of_meminfo_and_the_cgroup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 33554432 kB\nMemAvailable: 16777216 kB\n")  # 16 GiB available
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    monkeypatch.setattr(limits, "MEMINFO", meminfo)
    monkeypatch.setattr(limits, "CGROUP_MEMORY", (limit, usage))
    assert limits.available_memory() == 16 * limits.GIB  # no cgroup files
    limit.write_text("max\n")
    usage.write_text("1000\n")
    assert limits.available_memory() == 16 * limits.GIB  # no cgroup limit
    limit.write_text(str(6 * limits.GIB))
    usage.write_text(str(2 * limits.GIB))
    assert limits.available_memory() == 4 * limits.GIB  # the container's limit wins


def test_a_request_past_the_memory_is_refused_with_the_estimate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(limits, "available_memory", lambda: 10 * limits.GIB)
    limits.check_memory(8 * limits.GIB, "--samples 1", "give fewer")  # within MEMORY_SHARE
    with pytest.raises(BnexportError) as info:
        limits.check_memory(29.2 * limits.GIB, "--samples 10000000", "give fewer")
    assert str(info.value) == (
        "--samples 10000000 needs at least 29.2 GiB of memory, but this machine has 10 GiB "
        "available; give fewer"
    )
    monkeypatch.setattr(limits, "available_memory", lambda: None)  # unknown: never refused
    limits.check_memory(1e15, "--samples 1", "give fewer")
