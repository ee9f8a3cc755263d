"""The parity report on a screen: the table (one row per runner, or per batch size and output),
the header, the legend and the failures, as text lines wrapped at `REPORT_WIDTH` by the CLI.

Every column is explained once (`legend_lines`); a column that would repeat one value on every
row (the limit) moves to the header.
"""

from __future__ import annotations

from pathlib import Path

from bnexport.parity.compare import OutputComparison
from bnexport.parity.report import (
    ParityReport,
    RunnerResult,
    fmt,
    limit_text,
    percent,
)

TABLE_COLUMNS = ("runner", "result", "error", "error/floor", "limit", "fixed atol", "argmax")
VERBOSE_COLUMNS = ("runner", "batch", "output", *TABLE_COLUMNS[1:], "worst element")
#: Why a check's own fold of the PyTorch model does not gate: the file is not that model's export.
FOLDED_INFO = (
    "torch-folded: bnexport's own fold of the model, reported, not gating: onnxruntime judges "
    "the file"
)


def result_rows(r: RunnerResult, *, verbose: bool = False) -> list[list[str]]:
    """Table rows for one result: ``TABLE_COLUMNS`` for its worst output (a crash: dashes), or
    with ``verbose`` one ``VERBOSE_COLUMNS`` row per output (batch, output name, worst element)."""
    if r.error:
        cells = [r.runner, r.status, "error", "-", limit_text(r.tolerance, r.kind), "-", "-"]
        if verbose:
            return [[r.runner, str(r.batch_size), "-", *cells[1:], r.error]]
        return [cells]
    outputs = r.outputs if verbose else [o for o in [r.worst_output()] if o is not None]
    rows = []
    for o in outputs:
        ratio = o.noise_ratio
        cells = [
            (o.passed and r.status) or ("FAIL" if r.gating else "FAIL (info)"),
            fmt(o.error if o.error is not None else o.rel_err, 2),
            "-" if ratio is None else f"{fmt(ratio, 2)}×",
            limit_text(o.tolerance, r.kind),
            fmt(o.min_atol_scale, 2),
            _argmax([o] if verbose else r.outputs),
        ]
        if verbose:
            worst = o.worst.describe() if o.worst else "-"
            rows.append([r.runner, str(r.batch_size), o.name, *cells, worst])
        else:
            rows.append([r.runner, *cells])
    return rows


def summary_rows(report: ParityReport) -> list[list[str]]:
    """``TABLE_COLUMNS`` rows: one per runner, its worst batch size and output."""
    return [row for r in report.worst_per_runner() for row in result_rows(r)]


def summary_table(
    report: ParityReport, *, verbose: bool = False
) -> tuple[list[str], list[list[str]]]:
    """The screen table's columns and rows: `summary_rows` (`result_rows` per batch size and
    output with ``verbose``), without the limit column when every row has the same limit (the
    header says it once)."""
    columns = list(VERBOSE_COLUMNS if verbose else TABLE_COLUMNS)
    if verbose:
        rows = [row for r in report.results for row in result_rows(r, verbose=True)]
    else:
        rows = summary_rows(report)
    at = columns.index("limit")
    if len({row[at] for row in rows}) <= 1:
        columns.pop(at)
        rows = [row[:at] + row[at + 1 :] for row in rows]
    return columns, rows


def header_lines(report: ParityReport, *, verbose: bool = False) -> list[str]:
    """What was compared, on how many samples and batch sizes, and against which floor and
    limit (one limit when every runner has the same)."""
    sets = ", ".join(f"{s['name']} {s['samples']}" for s in report.inputs.get("sets", []))
    title = (
        f"{Path(str(report.model.get('path', '?'))).name} vs {report.reference.get('name', '?')}: "
        f"{report.inputs.get('samples', 0)} samples"
        + (f" ({sets})" if verbose and sets else "")
        + f", batch {','.join(map(str, report.batch_sizes))}"
    )
    floors = report.noise_floors()
    limits = {limit_text(r.tolerance, r.kind) for r in report.results}
    parts = []
    if floors:
        parts.append("noise floor " + ", ".join(f"{n} {v:.2g}" for n, v in floors.items()))
    if len(limits) == 1:
        word = "the floor" if report.tolerance_mode == "noise" else "rtol/atol"
        parts.append(f"limit {limits.pop()} {word}")
    return [title + ("; " + "; ".join(parts) if parts else "")]


def legend_lines(report: ParityReport) -> list[str]:
    """The columns explained once, and why a runner does not gate."""
    lines = [report.rule_note]
    if any(r.runner == "torch-folded" and not r.gating for r in report.results):
        lines.append(FOLDED_INFO)
    return lines


def failure_lines(report: ParityReport) -> list[str]:
    """Under the table: each failing gating runner's worst batch size, one line per output."""
    return [
        line
        for r in report.worst_per_runner()
        if r.gating and not r.passed
        for line in r.failure_messages()
    ]


def _argmax(outputs: list[OutputComparison]) -> str:
    """The worst argmax agreement among the classifier outputs (``-`` when there is none), so
    the column reads the same whichever output was worst."""
    agreements = [
        o.argmax_agreement for o in outputs if o.classifier and o.argmax_agreement is not None
    ]
    return percent(min(agreements)) if agreements else "-"
