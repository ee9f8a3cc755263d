"""What machine a run happened on: the CPU's model name and vector flags, the CPUs this process
may use, the load, library versions.

One reading of ``/proc/cpuinfo`` for parity reports and benchmarks. Heavy libraries are imported
inside `versions`, so importing this module costs nothing.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

#: CPU flags worth recording next to a timing: the vector units onnxruntime and torch dispatch on.
CPU_FLAGS: tuple[str, ...] = (
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "amx_tile",
)
CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_field(name: str) -> str | None:
    """The value of the first ``name : value`` line of /proc/cpuinfo; None without one."""
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.lower().startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags(wanted: tuple[str, ...] = CPU_FLAGS) -> list[str]:
    """The flags of `wanted` this CPU has, in `wanted`'s order ([] without /proc/cpuinfo)."""
    have = set((_cpuinfo_field("flags") or "").split())
    return [f for f in wanted if f in have]


def cpus_available() -> int:
    """CPUs this process may run on (its affinity mask; the logical CPU count off Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, to two decimals; None where the OS has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict[str, str]:
    """bnexport's and its numerical libraries' versions, and Python's."""
    import numpy as np
    import onnx
    import onnxruntime
    import torch

    from bnexport import __version__

    return {
        "bnexport": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
