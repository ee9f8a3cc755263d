"""Localization's fault set: faults injected into one layer of real models, and correct
exports (`tests/real/localize_faults.py` says which faults and how they are sized).

For each model (``--models``; default: the shipped Net, torchvision resnet18, mobilenet_v3_small,
efficientnet_b0, timm resnet18d and rexnet_100):

1. the correct folded export, localized over **every** layer (it counts the layers a correct
   export fails: false alarms), then the correct folded and unfolded exports as
   ``bnexport check --localize`` runs them;
2. every fault (conv channel, conv bias, activation node, BatchNorm eps; early, middle, late),
   each checked and localized as ``bnexport check --localize`` does.

Prints a Markdown table (one row per case: the module expected, the first failing layer reported,
hit or miss, the gate's verdict, sessions and seconds) and the summary on stdout; ``--json``
keeps every number; progress on stderr.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/localize_faults.py [--models net …]
        [--json localize_faults.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from real.localize_faults import MODELS, all_faults, prepare  # noqa: E402  (lives with its tests)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def clean_rows(prep: Any) -> list[dict[str, Any]]:
    """The correct exports: the folded file over every layer, then both files as check runs."""
    rows = []
    every = prep.check(prep.folded, strategy="all")
    for label, data, report in (
        ("folded, every layer", prep.folded, every),
        ("folded", prep.folded, prep.check(prep.folded)),
        ("unfolded", prep.unfolded, prep.check(prep.unfolded)),
    ):
        loc = report.layers
        failing = [r.layer.key for r in loc.results if not r.passed]
        worst = max(loc.results, key=lambda r: r.comparison.margin)
        rows.append(
            {
                "model": prep.name,
                "export": label,
                "gate_passed": report.passed,
                "layers_compared": len(loc.results),
                "failing_layers": failing,
                "worst_layer": worst.layer.key,
                "worst_ratio": worst.comparison.noise_ratio,
                "sessions": loc.sessions,
                "seconds": loc.seconds,
                "bytes": len(data),
            }
        )
        log(f"{prep.name} correct {label}: {len(failing)} failing of {len(loc.results)}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    cases: list[dict[str, Any]] = []
    correct: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            log(f"{name}: export")
            prep = prepare(name, Path(tmp))
            rows = clean_rows(prep)
            correct += rows
            for fault in all_faults(prep):
                fault.judge(prep.check(fault.data))
                r = fault.result
                log(f"{name} {fault.kind} {fault.position}: {r['reported']} hit={r['hit']}")
                cases.append(
                    {
                        "model": name,
                        "kind": fault.kind,
                        "position": fault.position,
                        "site": fault.site,
                        "detail": fault.detail,
                        "expected": sorted(fault.expected),
                        **r,
                    }
                )
    print_tables(cases, correct)
    if args.json:
        args.json.write_text(json.dumps({"cases": cases, "correct": correct}, indent=1) + "\n")
    return 0


def print_tables(cases: list[dict[str, Any]], correct: list[dict[str, Any]]) -> None:
    print(
        "| model | fault | where | expected | first failing layer | ratio | hit | gate | "
        "sessions | s |"
    )
    print("| --- | --- | --- | --- | --- | ---: | --- | --- | ---: | ---: |")
    for c in cases:
        ratio = "–" if c["ratio"] is None else f"{c['ratio']:.3g}"
        print(
            f"| {c['model']} | {c['kind']} | {c['position']} | {', '.join(c['expected'])} | "
            f"{c['reported']} | {ratio} | {'yes' if c['hit'] else '**no**'} | "
            f"{'FAIL' if c['gate_failed'] else 'pass'} | {c['sessions']} | {c['seconds']:.1f} |"
        )
    hits = sum(c["hit"] for c in cases)
    print(
        f"\n{hits} of {len(cases)} cases name the injected module or its fold chain "
        f"({100 * hits / max(len(cases), 1):.1f} %)\n"
    )
    print(
        "| model | correct export | gate | layers compared | failing | worst layer | worst "
        "ratio | sessions | s |"
    )
    print("| --- | --- | --- | ---: | --- | --- | ---: | ---: | ---: |")
    for c in correct:
        print(
            f"| {c['model']} | {c['export']} | {'pass' if c['gate_passed'] else 'FAIL'} | "
            f"{c['layers_compared']} | {', '.join(c['failing_layers']) or 'none'} | "
            f"{c['worst_layer']} | {c['worst_ratio']:.3g} | {c['sessions']} | "
            f"{c['seconds']:.1f} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
