"""Rendering a parity report on the terminal, shared by `bnexport check` and `bnexport onnx`:
at most 100 columns, user text printed as typed."""

from __future__ import annotations

from typing import Any

from bnexport.cli.render import console, print_lines, table, wrap
from bnexport.defaults import REPORT_WIDTH


def render_report(report: Any, *, verbose: bool = False) -> None:
    """Print a `ParityReport` at most `REPORT_WIDTH` columns wide: the header (what was compared,
    the noise floor, the limit), one row per runner (its worst batch size; every batch size and
    output with ``verbose``), the legend, skipped runners, notes, and the verdict with one line
    per failing output. User text (paths, factory names) is printed as typed."""
    from rich.markup import escape

    from bnexport.parity.tables import (
        failure_lines,
        header_lines,
        legend_lines,
        summary_table,
    )

    out = console()
    width = min(out.width, REPORT_WIDTH)
    columns, rows = summary_table(report, verbose=verbose)
    print_lines(
        out, [line for h in header_lines(report, verbose=verbose) for line in wrap(h, width)]
    )
    out.print(table(None, columns, [[escape(c) for c in row] for row in rows]), width=width)
    lines = legend_lines(report)
    skipped: dict[str, list[str]] = {}
    for s in report.skipped:
        skipped.setdefault(s["reason"], []).append(s["runner"])
    lines += [
        f"skipped {', '.join(names)}: {reason if verbose else reason.split(':')[0]}"
        for reason, names in skipped.items()
    ]
    lines += [f"note: {n}" for n in [*report.notes, *report.inputs.get("notes", [])]]
    wrapped = [w for line in lines for w in wrap(line, width)]
    if report.passed:
        wrapped.append(f"PASS: every gating runner is within tolerance ({report.seconds:.1f} s)")
    else:
        wrapped += wrap(
            f"FAIL: {', '.join(report.failing_runners) or 'no gating runner ran'}", width
        )
        wrapped += [w for line in failure_lines(report) for w in wrap(line, width, "  ", "    ")]
    if getattr(report, "layers", None) is not None:  # at most 10 lines, each within the width
        from bnexport.parity.layer_report import summary_lines

        wrapped += summary_lines(report.layers, width)
    print_lines(out, wrapped)
