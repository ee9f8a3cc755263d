"""Resource bounds every command checks before any work: finite durations, sane thread counts,
seeds that fit 64 bits, and memory a request needs against the memory the machine has.

A request past a bound is refused up front with a `BnexportError` naming the option, the value,
the bound and the fix, instead of hanging (``--warmup inf``), crashing (``--threads 100000``) or
asking the allocator for hundreds of GiB halfway through a run.
"""

from __future__ import annotations

import math
from pathlib import Path

from bnexport.errors import BnexportError
from bnexport.machine import cpus_available

#: The longest any one duration option (warm-up, minimum timing, cooldown, timeout) may be.
MAX_SECONDS = 3600.0
#: The longest a whole time budget (``tune --budget``) may be.
MAX_BUDGET_S = 24 * 3600.0
#: Threads per available CPU a thread option may ask for (oversubscribing a little is a
#: legitimate experiment; thousands of threads hang or crash the backends).
THREADS_PER_CPU = 4
#: The fewest threads the cap allows, whatever the CPU count.
MIN_THREAD_CAP = 8
#: Seeds (torch, numpy) are unsigned 64-bit integers.
MAX_SEED = 2**64 - 1
#: The largest size of one dimension, batch included, and of a sample count.
MAX_DIM = 2**31 - 1
#: The most timed rounds (repeats) a timing option may ask for.
MAX_REPEATS = 10_000
#: The temperatures a ``--temperature`` option may give: it scales the logits (the shipped model's
#: is 1.5); zero, negative or astronomically large ones are typos, and 1e40 overflows float32.
MIN_TEMPERATURE = 1e-6
MAX_TEMPERATURE = 1e6
#: Share of the available memory a request may plan to use (the rest: the libraries, the model,
#: the work a request needs beyond what is estimated).
MEMORY_SHARE = 0.8
MEMINFO = Path("/proc/meminfo")
CGROUP_MEMORY = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current"))

GIB = 1024**3


def check_seconds(
    value: float, flag: str, *, positive: bool = False, maximum: float = MAX_SECONDS
) -> float:
    """``value`` if it is a finite number of seconds in ``[0, maximum]`` (``> 0`` when
    ``positive``); else `BnexportError` naming ``flag``."""
    low = "> 0" if positive else ">= 0"
    if not math.isfinite(value) or value > maximum or value < 0 or (positive and value == 0):
        raise BnexportError(
            f"{_shown(flag, f'{value:g}')}: give a finite number of seconds {low} and at most "
            f"{maximum:g} ({maximum / 3600:g} h)"
        )
    return value


def check_temperature(value: float, flag: str = "--temperature") -> float:
    """``value`` if it is a finite temperature from `MIN_TEMPERATURE` to `MAX_TEMPERATURE`;
    else `BnexportError` naming ``flag``."""
    if not (math.isfinite(value) and MIN_TEMPERATURE <= value <= MAX_TEMPERATURE):
        raise BnexportError(
            f"{_shown(flag, f'{value:g}')}: give a temperature > 0, from {MIN_TEMPERATURE:g} to "
            f"{MAX_TEMPERATURE:g} (the shipped model's is 1.5)"
        )
    return value


def thread_cap() -> int:
    """The most threads a thread option may ask for here (`THREADS_PER_CPU` per available CPU)."""
    return max(MIN_THREAD_CAP, THREADS_PER_CPU * cpus_available())


def check_threads(value: int | None, flag: str, *, allow_zero: bool = False) -> int | None:
    """``value`` (None: the backend's default) if it is ``>= 1`` (``>= 0`` with ``allow_zero``:
    0 lets the backend choose) and at most `thread_cap`; else `BnexportError`."""
    if value is None:
        return None
    low = 0 if allow_zero else 1
    cap = thread_cap()
    if not low <= value <= cap:
        raise BnexportError(
            f"{_shown(flag, value)}: give {low} to {cap} threads ({THREADS_PER_CPU} per available "
            f"CPU; this machine has {cpus_available()})"
        )
    return value


def check_seed(value: int, flag: str = "--seed") -> int:
    """``value`` if it is a valid seed, 0 to 2**64 - 1; else `BnexportError`."""
    if not 0 <= value <= MAX_SEED:
        raise BnexportError(f"{_shown(flag, value)}: give a seed from 0 to 2**64 - 1 ({MAX_SEED})")
    return value


def check_count(value: int, flag: str, *, minimum: int = 1, maximum: int = MAX_DIM) -> int:
    """``value`` if ``minimum <= value <= maximum``; else `BnexportError` naming ``flag``."""
    if not minimum <= value <= maximum:
        raise BnexportError(
            f"{_shown(flag, value)}: give a whole number from {minimum} to {maximum}"
        )
    return value


def available_memory() -> int | None:
    """Bytes of memory this process can still get: /proc/meminfo's MemAvailable, lowered to what
    a cgroup (container) limit leaves; None where neither can be read."""
    found: list[int] = []
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit, usage = (p.read_text().strip() for p in CGROUP_MEMORY)
        if limit != "max":
            found.append(max(0, int(limit) - int(usage)))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_memory(needed: float, what: str, fix: str) -> None:
    """Refuse (`BnexportError`) a request that needs ``needed`` bytes when more than
    `MEMORY_SHARE` of the available memory: ``what`` says what needs it, ``fix`` what to change."""
    available = available_memory()
    if available is None or needed <= MEMORY_SHARE * available:
        return
    raise BnexportError(
        f"{what} needs at least {format_bytes(needed)} of memory, but this machine has "
        f"{format_bytes(available)} available; {fix}"
    )


def format_bytes(n: float) -> str:
    """``n`` bytes as ``1.5 GiB`` / ``12 MiB`` / ``3.2e+04 GiB``."""
    if n >= GIB:
        gib = n / GIB
        return f"{gib:.3g} GiB" if gib < 1e5 else f"{gib:.2e} GiB"
    return f"{n / 1024**2:.3g} MiB"


def _shown(flag: str, value: object) -> str:
    """``--flag value``, or ``--fix key=value`` for a flag that ends in ``=``."""
    return f"{flag}{value}" if flag.endswith("=") else f"{flag} {value}"
