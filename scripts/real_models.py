"""Baseline: what bnexport and torch do with the real models of ``tests/real/zoo.py``.

For every zoo model (or the ``--models`` subset), measured, nothing hard-coded:

* the BatchNorm-like modules (``_BatchNorm`` subclasses and frozen, buffer-only BNs);
* ``bnexport.fold.fold_model(model, inputs)``: best-of-``--repeat`` time, and its report
  (folded / left of how many, the left ones' reason codes);
* ``torch.fx.experimental.optimization.fuse(model)``: best-of-``--repeat`` time, or why it fails;
* one float64 forward of ``deepcopy(model).double()`` (best of ``--repeat``), and the fold-time
  target (``2 × fuse + 2 × float64 forward + 0.1 s``); the three calls alternate
  within each of the ``--repeat`` rounds, so load drift during the run hits them alike;
* ONNX ``BatchNormalization/Mul/Div/Add/Sub`` counts of ``torch.onnx.export(model, inputs,
  dynamo=True)`` (default options, unfolded model) against bnexport's ``export_onnx`` of the folded
  module (as ``bnexport onnx`` runs it: ``fuse_batchnorm=True``).

A failure is recorded in its table cell and the next measurement goes on. The exporters' console
noise is captured (``bnexport.export.quiet_exporter``). Timings depend on the machine's load: the
load average is printed with the table.

Usage::

    .venv/bin/python scripts/real_models.py [--models torchvision/resnet18 timm/resnet18d] [--list]

prints a markdown table (and versions) on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.fx.experimental.optimization as fx_optimization
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from real.tv_compat import ensure_torchvision_ops  # noqa: E402  (the zoo lives with its tests)
from real.zoo import REAL_MODELS, batchnorm_modules  # noqa: E402

from bnexport.export import export_onnx, quiet_exporter  # noqa: E402
from bnexport.fold import fold_model  # noqa: E402

#: ONNX node types counted in both exports (a BN and its scale/shift chain, when left in a graph).
ONNX_OPS = ("BatchNormalization", "Mul", "Div", "Add", "Sub")
DEFAULT_REPEAT = 5
_CELL_CHARS = 80  # longest error text put in a table cell

Inputs = tuple[torch.Tensor, ...]


@dataclass
class Row:
    """One model's measurements; a string field holds ``fails: …`` where the step failed."""

    name: str
    batchnorms: int | str = "–"
    fold_s: float | str = "–"
    folded: str = "–"
    left_reasons: str = "–"
    fuse_s: float | str = "–"
    forward64_s: float | str = "–"
    torch_ops: str = "–"
    bnexport_ops: str = "–"

    @property
    def target_s(self) -> float | None:
        """The fold-time target: 2 × fuse + 2 × float64 forward + 0.1 s."""
        if isinstance(self.fuse_s, float) and isinstance(self.forward64_s, float):
            return 2 * self.fuse_s + 2 * self.forward64_s + 0.1
        return None


def _failure(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return "fails: " + (text if len(text) <= _CELL_CHARS else text[: _CELL_CHARS - 1] + "…")


def best_times(calls: dict[str, Callable[[], Any]], repeat: int) -> dict[str, Any]:
    """Each call's fastest time of ``repeat`` rounds (seconds; a string ``fails: …`` where it
    raised) and ``result:<name>``, its last result. The calls alternate within each round, so
    a change of machine load during the run affects all of them alike."""
    best: dict[str, Any] = {name: float("inf") for name in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            if isinstance(best[name], str):
                continue
            start = time.perf_counter()
            try:
                best[f"result:{name}"] = fn()
            except Exception as exc:
                best[name] = _failure(exc)
                continue
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def op_counts(counts: Mapping[str, int]) -> str:
    """``BatchNormalization/Mul/Div/Add/Sub`` counts as ``a/b/c/d/e``."""
    return "/".join(str(counts.get(op, 0)) for op in ONNX_OPS)


def _double(inputs: Inputs) -> Inputs:
    return tuple(x.double() if x.is_floating_point() else x for x in inputs)


def forward64(model: nn.Module, inputs: Inputs) -> Callable[[], Any]:
    """One forward of ``deepcopy(model).double()`` (the copy made once, outside the timing)."""
    model64 = copy.deepcopy(model).double().eval()
    inputs64 = _double(inputs)

    def run() -> Any:
        with torch.no_grad():
            return model64(*inputs64)

    return run


def measure(name: str, repeat: int) -> Row:
    """Every measurement of the module docstring for zoo model ``name``."""
    row = Row(name)
    try:
        model, inputs = REAL_MODELS[name]()
    except Exception as exc:
        row.batchnorms = _failure(exc)
        return row
    row.batchnorms = sum(1 for _ in batchnorm_modules(model))

    with quiet_exporter():
        times = best_times(
            {
                "fold": lambda: fold_model(model, inputs),
                "fuse": lambda: fx_optimization.fuse(model),
                "forward64": forward64(model, inputs),
            },
            repeat,
        )
    row.fold_s, row.fuse_s, row.forward64_s = times["fold"], times["fuse"], times["forward64"]
    folded: nn.Module | None = None
    if "result:fold" in times and not isinstance(row.fold_s, str):
        result = times["result:fold"]
        folded = result.module
        report = result.report
        row.folded = f"{len(report.folded)}/{len(report.left)} of {len(report.entries)}"
        reasons = Counter(e.reason_code or "?" for e in report.left)
        row.left_reasons = ", ".join(f"{code} ×{n}" for code, n in reasons.most_common()) or "–"

    try:
        with quiet_exporter():
            program = torch.onnx.export(model, inputs, dynamo=True)
        row.torch_ops = op_counts(Counter(n.op_type for n in program.model_proto.graph.node))
    except Exception as exc:
        row.torch_ops = _failure(exc)

    if folded is not None:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                with quiet_exporter():
                    exported = export_onnx(
                        folded, inputs, Path(tmp) / "m.onnx", fuse_batchnorm=True
                    )
                row.bnexport_ops = op_counts(exported.op_counts)
            except Exception as exc:
                row.bnexport_ops = _failure(exc)
    return row


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|")


def render(rows: Sequence[Row]) -> str:
    """The markdown table."""
    ops = "/".join("BN" if op == "BatchNormalization" else op for op in ONNX_OPS)
    header = [
        "model",
        "BNs",
        "folded/left of",
        "left (reason ×n)",
        "fold s",
        "fx fuse s",
        "fp64 fwd s",
        "target s",
        "fold ≤ target",
        f"torch ONNX {ops}",
        f"bnexport ONNX {ops}",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        target, within = r.target_s, "–"
        if target is not None and isinstance(r.fold_s, float):
            within = "yes" if r.fold_s <= target else "no"
        cells = [
            r.name,
            r.batchnorms,
            r.folded,
            r.left_reasons,
            r.fold_s,
            r.fuse_s,
            r.forward64_s,
            target if target is not None else "–",
            within,
            r.torch_ops,
            r.bnexport_ops,
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> str:
    """Versions, threads and load: what the timings depend on."""
    packages = ("bnexport", "torch", "torchvision", "timm", "onnx", "onnxscript")
    versions = ", ".join(f"{p} {_version(p)}" for p in packages)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{versions}; Python {platform.python_version()}; {torch.get_num_threads()} torch "
        f"threads on {os.cpu_count()} CPUs; load average {load}\n{ensure_torchvision_ops()}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", choices=list(REAL_MODELS), metavar="NAME", default=None
    )
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT, help="timing repeats")
    parser.add_argument("--list", action="store_true", help="list the zoo's model names")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(REAL_MODELS))
        return 0
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    rows = []
    for name in args.models or list(REAL_MODELS):
        start = time.perf_counter()
        rows.append(measure(name, args.repeat))
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    print(environment())
    print()
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
