"""The onnxruntime session-option sweep behind bnexport's session defaults (docs/performance.md).

Exports the shipped model twice, as `bnexport bench` does: torch's own default export of the
unfolded model (``torch.onnx.export(..., dynamo=True)``, dynamic batch) and bnexport's folded
export. Then times, interleaved and paired with bench's timing core, onnxruntime's defaults on
torch's file (the reference) against bnexport's file with bnexport's session defaults and with one
option changed per row. Prints a Markdown table of paired speedups (> 1: faster than the
reference; the median, and the batch-1 median latency), then the date, the machine, the load and
the command.

Usage::

    .venv/bin/python scripts/session_sweep.py [--repeats 21] [--batch-sizes 1,64,256]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def variants() -> list[tuple[str, Any]]:
    """(row label, `SessionConfig`): bnexport's defaults, then one option changed per row."""
    from bnexport.ort import SessionConfig

    d = SessionConfig()
    return [
        ("defaults", d),
        ("`intra_op_num_threads=1`", replace(d, intra_op_num_threads=1)),
        (
            "`session.disable_prepacking=1`",
            replace(d, session_config_entries={"session.disable_prepacking": "1"}),
        ),
        ('`graph_optimization_level="extended"`', replace(d, graph_optimization_level="extended")),
        ('`graph_optimization_level="basic"`', replace(d, graph_optimization_level="basic")),
        ("`allow_spinning=False`", replace(d, allow_spinning=False)),
        (
            "`session.force_spinning_stop=1`",
            replace(d, session_config_entries={"session.force_spinning_stop": "1"}),
        ),
        ("`enable_mem_arena=False`", replace(d, enable_mem_arena=False)),
        ('`execution_mode="parallel"`', replace(d, execution_mode="parallel")),
    ]


def export_both(folder: Path) -> tuple[Path, Path]:
    """torch's default export of the shipped model and bnexport's folded export, in ``folder``."""
    import torch

    from bnexport.checkpoint import load_checkpoint
    from bnexport.export import dynamic_batch_shapes, example_batches, export_onnx, quiet_exporter
    from bnexport.fold import fold_model

    model = load_checkpoint(ROOT / "models" / "net.pt").model
    inputs = example_batches(torch.randn(1, 1, 28, 28))
    torch_file, bn_file = folder / "torch_default.onnx", folder / "bn.onnx"
    with quiet_exporter():
        program = torch.onnx.export(
            model, inputs, dynamo=True, dynamic_shapes=dynamic_batch_shapes(inputs), verbose=False
        )
        assert program is not None
        program.save(str(torch_file))
    export_onnx(fold_model(model, inputs).module, inputs, bn_file, output_names=["logits"])
    return torch_file, bn_file


def sweep(repeats: int, sizes: tuple[int, ...]) -> str:
    """Time every variant against the reference; the Markdown table."""
    import numpy as np

    from bnexport.ort import ORT_DEFAULTS
    from bnexport.runners import OnnxRuntimeRunner
    from bnexport.timing import TimingConfig, measure_interleaved, paired_ratio

    with tempfile.TemporaryDirectory() as tmp:
        torch_file, bn_file = export_both(Path(tmp))
        runs = [("reference", torch_file, ORT_DEFAULTS)]
        runs += [(label, bn_file, config) for label, config in variants()]
        # each file names its input its own way: the feed calls it "input"
        runners = [OnnxRuntimeRunner(p, c, name=n, feed_names=["input"]) for n, p, c in runs]
        rng = np.random.default_rng(0)
        batches = {
            b: {"input": rng.standard_normal((b, 1, 28, 28), dtype=np.float32)} for b in sizes
        }
        raw = measure_interleaved(runners, batches, TimingConfig(repeats=repeats))
    lines = [
        "| option (rest at defaults) | " + " | ".join(f"batch {b}" for b in sizes) + " |",
        "| --- |" + " ---: |" * len(sizes),
    ]
    for runner in runners[1:]:
        cells = []
        for b in sizes:
            ratio = paired_ratio(raw[("reference", b)][0], raw[(runner.name, b)][0])
            latency = sorted(raw[(runner.name, b)][0])[len(raw[(runner.name, b)][0]) // 2]
            cells.append(f"{ratio.median:.3f} ({latency * 1e6:,.1f} µs)")
        lines.append(f"| {runner.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=21, help="interleaved rounds")
    parser.add_argument("--batch-sizes", default="1,64,256", help="comma-separated")
    args = parser.parse_args(argv)
    from bnexport.machine import cpu_model, load_average, versions

    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    before = load_average()
    print(sweep(args.repeats, sizes))
    print()
    print(
        f"measured {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC on {cpu_model()}, "
        f"{os.cpu_count()} CPUs, {platform.platform()}; load average {before} before, "
        f"{load_average()} after; command: python scripts/session_sweep.py --repeats "
        f"{args.repeats} --batch-sizes {args.batch_sizes}"
    )
    print(", ".join(f"{k} {v}" for k, v in versions().items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
