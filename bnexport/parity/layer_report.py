"""A localization (`bnexport.parity.localize.Localization`) as text: the terminal's few lines, the
Markdown section (the first failing layer and its neighbours) and JUnit test cases (one per
layer compared)."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

from bnexport.defaults import REPORT_WIDTH

if TYPE_CHECKING:
    from bnexport.parity.layers import LayerResult
    from bnexport.parity.localize import Localization

#: The terminal shows at most this many lines of a localization (each within `REPORT_WIDTH`).
MAX_LINES = 10
MD_COLUMNS = ("layer", "type", "error", "floor", "error/floor", "limit", "verdict", "ONNX nodes")


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else ("nan" if math.isnan(x) else f"{x:.{digits}g}")


def _ratio(r: LayerResult) -> str:
    c = r.comparison
    ratio = c.noise_ratio
    if ratio is None:  # fixed tolerance: the worst element's err/allowed
        return f"{_fmt(c.margin)}× allowed"
    return f"{_fmt(ratio)}× its floor"


def _limit(r: LayerResult) -> str:
    c = r.comparison
    if c.limit is None or not c.floor:
        return str(c.tolerance)
    return f"{_fmt(c.limit / c.floor)}×"


def _name(r: LayerResult) -> str:
    return f"{r.layer.key} ({r.layer.kind})"


def _nodes(r: LayerResult, limit: int = 3) -> str:
    nodes = r.layer.nodes
    text = ", ".join(nodes[:limit]) + (f" (+{len(nodes) - limit})" if len(nodes) > limit else "")
    return f"{text} → {r.layer.value}" if text else r.layer.value


def headline(loc: Localization) -> str:
    """What was localized, how much was mapped, and the cost."""
    m = loc.layer_map
    mapped = sum(1 + len(x.aliases) for x in m.layers if x.module)
    how = " (bisected)" if loc.strategy == "bisect" else ""
    return (
        f"localize {loc.runner} b{loc.batch_size}: {mapped}/{m.calls} calls mapped; "
        f"{len(loc.results)} layers, {loc.sessions} session(s){how}, {loc.seconds:.1f} s"
    )


def summary_lines(loc: Localization, width: int = REPORT_WIDTH) -> list[str]:
    """At most `MAX_LINES` lines of at most ``width`` columns for the terminal."""
    lines = [headline(loc)]
    first, last = loc.first_failing, loc.last_agreeing
    if first is None:
        lines.append(f"  no layer exceeds its budget ({len(loc.results)} compared)")
    else:
        c = first.comparison
        lines.append(
            f"  first failing layer: {_name(first)}: {_ratio(first)} (limit {_limit(first)})"
        )
        detail = f"    error {_fmt(c.error if c.error is not None else c.rel_err)}"
        detail += f", floor {_fmt(c.floor)}" if c.floor else ""
        if first.layer.chain:
            detail += f"; fold chain {first.layer.chain}"
        lines.append(detail)
        lines.append(f"    ONNX: {_nodes(first)}")
        if last is not None:
            lines.append(f"  last agreeing: {_name(last)}, {_ratio(last)}")
        later = [r for r in loc.neighbours(2) if r.layer.order > first.layer.order]
        if later:
            lines.append(
                "  after it: " + ", ".join(f"{r.layer.key} {_ratio(r).split()[0]}" for r in later)
            )
    unmapped = len(loc.layer_map.unmapped)
    if unmapped:
        lines.append(
            f"  {unmapped} module call(s) have no value of their own in the graph (JSON: why)"
        )
    lines += [f"  note: {n}" for n in loc.notes]
    return [_clip(line, width) for line in lines[:MAX_LINES]]


def _clip(line: str, width: int) -> str:
    return line if len(line) <= width else line[: width - 1] + "…"


def markdown_lines(loc: Localization) -> list[str]:
    """A ``### Localization`` section: the first failing layer, its neighbours, the cost."""
    lines = ["### Localization", ""]
    first, last = loc.first_failing, loc.last_agreeing
    if first is None:
        lines.append(f"No layer exceeds its budget ({len(loc.results)} compared on {loc.runner}).")
    else:
        text = f"First failing layer: `{first.layer.key}` ({first.layer.kind}), {_ratio(first)}"
        text += f" (limit {_limit(first)}) on {loc.runner} batch {loc.batch_size}"
        if first.layer.chain:
            text += f"; fold chain {first.layer.chain}"
        text += f"; computed by `{_nodes(first)}`."
        if last is not None:
            text += f" Last agreeing: `{last.layer.key}` ({last.layer.kind})."
        lines.append(text)
    lines += [
        "",
        "| " + " | ".join(MD_COLUMNS) + " |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in loc.neighbours(2):
        c = r.comparison
        cells = [
            r.layer.key,
            r.layer.kind,
            _fmt(c.error if c.error is not None else c.rel_err),
            _fmt(c.floor),
            _fmt(c.noise_ratio),
            _limit(r),
            "pass" if r.passed else "**FAIL**",
            _nodes(r),
        ]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines += ["", headline(loc) + "."]
    return lines


def add_junit_cases(suite: ET.Element, loc: Localization) -> tuple[int, int]:
    """One ``testcase`` per layer compared (a failure where it exceeds its budget); returns how
    many cases and failures were added."""
    failures = 0
    ordered = sorted(loc.results, key=lambda r: r.layer.order)
    for r in ordered:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"bnexport.parity.layers.{loc.runner}",
            name=r.layer.key,
            time="0",
        )
        text = f"{_name(r)}: {_ratio(r)} (limit {_limit(r)}); ONNX {_nodes(r)}"
        if r.passed:
            ET.SubElement(case, "system-out").text = text
        else:
            failures += 1
            ET.SubElement(case, "failure", message=text, type="LayerMismatch").text = text
    return len(ordered), failures
