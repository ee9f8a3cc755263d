"""What a figure needs to be reproduced: versions, CPU, thread counts, load and the date."""

from __future__ import annotations

import datetime as _dt
import os
import platform
from collections.abc import Sequence
from typing import Any

from bnexport.bench.config import BenchConfig
from bnexport.machine import cpu_flags, cpu_model, cpus_available, load_average, versions


def collect_environment(
    config: BenchConfig | None = None, load_before: Sequence[float] | None = None
) -> dict[str, Any]:
    """Versions, CPU, thread counts, the date, and the load average before (``load_before``, as
    `bnexport.machine.load_average` read it when the run started) and now."""
    import onnxruntime as ort
    import torch

    from bnexport.ort import SessionConfig

    threads = config.threads if config is not None else None
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
            "ort_bnexport_intra_op": threads or SessionConfig().intra_op_num_threads,
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
