"""The fold report on a screen: table rows (a row per BatchNorm, or per group of alike ones) and
the text lines under the table (why each was left, notes, the self-check, the localization), as
plain strings; the CLI wraps the lines and sets the table's width.

Cells never need a module path broken: a path has a line of its own in its cell (the CLI sizes
the columns to the longest word), and long explanations are lines under the table, not cells.
Chains are grouped by their shape: ``×view(param stages.0.blocks.0.ls2.gamma[48])`` and the same
step of the next block read ``×view(param …ls2.gamma)``.
"""

from __future__ import annotations

import re
from typing import Any

from bnexport.fold.report import REASONS, ChainEntry, FoldEntry, FoldReport, verification_line

#: Up to this many BatchNorms, the table has a row for each; beyond, alike ones are grouped.
FULL_REPORT_ROWS = 12
#: The table's columns.
REPORT_COLUMNS = ("BatchNorm", "result", "chain", "max |ΔW|/|W|")
#: At most this many lines describe the localization on the screen.
LOCALIZATION_LINES = 10
#: Notes that are the same kind of thing on every entry of a group (summarized once).
_PARAM_NOTE = "learnable parameter "

_OPERAND = re.compile(r"\b(param|buffer) ((?:[\w]+\.)*)([\w]+)(\[[\d, ]*\])?")


def chain_pattern(chain: str) -> str:
    """``chain`` with its operands' module paths and shapes dropped (``param …ls2.gamma``):
    what alike chains of different blocks have in common."""

    def short(m: re.Match[str]) -> str:
        parents = m.group(2).rstrip(".").split(".") if m.group(2) else []
        tail = f"…{parents[-1]}." if parents else ""
        return f"{m.group(1)} {tail}{m.group(3)}"

    return _OPERAND.sub(short, chain)


def title(report: FoldReport) -> str:
    n = len(report.entries)
    text = (
        f"Fold report: {len(report.folded)} folded, {len(report.left)} left "
        f"(of {n} BatchNorm{'' if n == 1 else 's'})"
    )
    return text + ("; --report-json lists each" if n > FULL_REPORT_ROWS else "")


def _change(e: FoldEntry) -> str:
    return "-" if e.max_rel_weight_change is None else f"{e.max_rel_weight_change:.3g}"


def _result(e: FoldEntry) -> str:
    if e.status != "folded":
        return f"left: {e.reason_code}"
    text = f"into {e.into}\n({e.layer_type}, {e.direction})"
    return text + (f"\nas {e.new_module}" if e.new_module else "")


def _entry_row(e: FoldEntry) -> list[str]:
    return [f"{e.bn}\n({e.bn_type})", _result(e), e.chain or "-", _change(e)]


def _entry_lines(e: FoldEntry, skip_param_notes: bool = False) -> list[str]:
    """Under the table: why ``e`` was left, where its chain stops, its notes."""
    lines = [f"left {e.bn}: {e.reason}"] if e.status == "left" and e.reason else []
    if e.chain_stop:
        lines.append(f"{e.bn}: chain stops: {e.chain_stop}")
    if e.subnormals_flushed:
        lines.append(f"{e.bn}: {e.subnormals_flushed} subnormals flushed to 0")
    notes = [n for n in e.notes if not (skip_param_notes and n.startswith(_PARAM_NOTE))]
    return lines + [f"{e.bn}: {n}" for n in notes]


def _own_row(e: FoldEntry) -> bool:
    """An entry that keeps its own row in a grouped report (something of its own to say)."""
    return bool(e.chain_stop or e.subnormals_flushed or e.new_module) or any(
        not n.startswith(_PARAM_NOTE) for n in e.notes
    )


def _members(entries: list[FoldEntry]) -> str:
    """``14 × BatchNorm2d`` and the first and last paths, a line each."""
    first, last = entries[0].bn, entries[-1].bn
    return f"{len(entries)} × {entries[0].bn_type}\n{first} …\n{last}"


def report_rows(report: FoldReport) -> tuple[list[list[str]], list[str]]:
    """The table rows and the lines under the table (left reasons, notes of entries)."""
    if len(report.entries) <= FULL_REPORT_ROWS:
        rows = [_entry_row(e) for e in report.entries]
        return rows, [line for e in report.entries for line in _entry_lines(e)]
    rows, lines = [], []
    groups: dict[tuple[Any, ...], list[FoldEntry]] = {}
    for e in report.entries:
        if _own_row(e):
            rows.append(_entry_row(e))
            lines += _entry_lines(e, skip_param_notes=True)
            continue
        key = (e.status, e.bn_type, e.layer_type, e.direction, e.reason_code)
        groups.setdefault((*key, chain_pattern(e.chain)), []).append(e)
    for (status, _, layer_type, direction, code, chain), members in groups.items():
        if len(members) == 1:
            rows.append(_entry_row(members[0]))
            lines += _entry_lines(members[0], skip_param_notes=True)
            continue
        change = max(e.max_rel_weight_change or 0.0 for e in members)
        result = f"into {layer_type}\n({direction})" if status == "folded" else f"left: {code}"
        rows.append([_members(members), result, chain, f"≤ {change:.3g}" if change else "-"])
        if status == "left":
            meaning = f" ({REASONS[code]})" if code in REASONS else ""
            lines.append(
                f"left: {code} × {len(members)}{meaning}; e.g. {members[0].bn}: {members[0].reason}"
            )
    return rows, lines + _param_lines(report)


def _param_lines(report: FoldReport) -> list[str]:
    """One line for the learnable parameters folded as constants across a grouped report."""
    params = [
        n.removeprefix(_PARAM_NOTE).split(" ")[0]
        for e in report.entries
        if not _own_row(e)
        for n in e.notes
        if n.startswith(_PARAM_NOTE)
    ]
    if not params:
        return []
    return [
        f"{len(params)} learnable parameter{'s' if len(params) > 1 else ''} folded as constants "
        f"(their values now), e.g. {params[0]}"
    ]


def chain_lines(chains: list[ChainEntry]) -> list[str]:
    """Scale/shift chains folded (or left) after a layer without a BatchNorm, grouped by layer
    type, status and chain shape: a line per group with its first member's reason, and the
    learnable parameters folded as constants."""
    groups: dict[tuple[str, str, str], list[ChainEntry]] = {}
    for c in chains:
        groups.setdefault((c.status, c.layer_type, chain_pattern(c.chain)), []).append(c)
    lines = []
    for (status, layer_type, chain), members in groups.items():
        first = members[0]
        where, text = first.layer, first.chain
        if len(members) > 1:
            where, text = f"{len(members)} layers, {first.layer} … {members[-1].layer}", chain
        line = f"Scale/shift chain {text} after {where} ({layer_type}): {status}"
        if first.reason:
            line += f": {first.reason}"
        if first.chain_stop:
            line += f"; chain stops: {first.chain_stop}"
        params = [n for c in members for n in c.notes if n.startswith(_PARAM_NOTE)]
        others = [n for c in members for n in c.notes if not n.startswith(_PARAM_NOTE)]
        if params:
            line += f"; {len(params)} learnable parameter(s) folded as constants (their values now)"
        lines += [line, *others]
    return lines


def footer_lines(report: FoldReport) -> list[str]:
    """The self-check, the localization and the report's notes."""
    lines = chain_lines(report.chains)
    if report.verification:
        lines.append(verification_line(report.verification))
    if report.localization:
        lines += localization_lines(report.localization)
    return lines + [f"note: {n}" for n in report.notes]


def localization_lines(loc: dict[str, Any]) -> list[str]:
    """At most `LOCALIZATION_LINES` lines: the verdict, then the steps around the first failing
    one (or the closest to its limit when none fails)."""
    steps = loc["steps"]
    if not steps:
        return ["localization: no fold step to compare"]
    failing = next((k for k, s in enumerate(steps) if not s["passed"]), None)
    if failing is None:
        worst = max(range(len(steps)), key=lambda k: steps[k]["error"] / steps[k]["limit"])
        head = (
            f"localization: {len(steps)} fold step{'s' if len(steps) > 1 else ''} compared with "
            "the unfolded model in float64, in execution order; none diverges (closest: "
            f"{_step(steps[worst])})"
        )
        return [head]
    s = steps[failing]
    lines = [
        f"localization: the first fold step whose float64 output diverges is {s['bn']} folded "
        f"into {s['into']} (step {failing + 1} of {len(steps)}): {_step(s)}"
    ]
    shown = steps[max(0, failing - 2) : failing + 3]
    for k, step in enumerate(shown, start=max(0, failing - 2)):
        mark = "FAIL" if not step["passed"] else "ok"
        lines.append(f"  {k + 1:>3}. {mark:<4} {step['bn']} → {step['into']}: {_step(step)}")
    return lines[:LOCALIZATION_LINES]


def _step(s: dict[str, Any]) -> str:
    ratio = s["error"] / s["floor"] if s["floor"] else 0.0
    limit = s["limit"] / s["floor"] if s["floor"] else 0.0
    return (
        f"error {s['error']:.2g} = {ratio:.2g}× its float64 floor {s['floor']:.2g} "
        f"(limit {limit:g}×)"
    )
