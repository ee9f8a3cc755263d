"""The check's report as one self-contained HTML page (``bnexport check --html FILE``): nothing is
fetched when it is viewed — the plots are inline SVG drawn by matplotlib, the style is inline.

Sections: the verdict; per output, how each runner's error compares with its budget and how
``|a − r|`` is distributed; the per-layer error/budget profile along the network's depth with the
first failing layer marked (when the check localized); the worst samples; the fold summary; the
machine and versions. matplotlib is the ``report`` extra (``pip install 'bnexport[report]'``).
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from bnexport.errors import ParityInputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from bnexport.parity.report import ParityReport

PASS_COLOR = "#2a7d3f"
FAIL_COLOR = "#c0392b"
LIMIT_COLOR = "#555555"
FIG_WIDTH_IN = 9.0
#: A fold with more BatchNorms than this is listed folded away (click to open).
FOLD_ROWS_OPEN = 24
STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto;
       max-width: 1000px; color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.verdict { font-size: 1.3em; font-weight: bold; padding: .4em .8em; border-radius: 6px;
           display: inline-block; color: white; }
.pass { background: #2a7d3f; } .fail { background: #c0392b; }
table { border-collapse: collapse; margin: .6em 0; font-size: .9em; }
td, th { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.bad td { background: #fdecea; } tr.first td { background: #f9c9c3; font-weight: bold; }
code { background: #f3f3f3; padding: 0 .2em; border-radius: 3px; }
.muted { color: #666; } figure { margin: .5em 0; } svg { max-width: 100%; height: auto; }
"""


def html_report(report: ParityReport) -> str:
    """The whole page for ``report`` (a `ParityReport`, with its localization when one ran)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ParityInputError(
            "--html draws its plots with matplotlib, which is not installed: "
            "pip install 'bnexport[report]' (or matplotlib)"
        ) from None
    body = [
        _verdict(report),
        _outputs(report),
        _layers(report),
        _worst(report),
        _fold(report),
        _machine(report),
    ]
    title = f"bnexport check: {'PASS' if report.passed else 'FAIL'}"
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body></html>\n"
    )


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    x = float(x)
    return "inf" if math.isinf(x) else ("nan" if math.isnan(x) else f"{x:.{digits}g}")


def _table(
    head: Sequence[str],
    rows: Iterable[Sequence[Any]],
    classes: Sequence[str] = (),
    numeric: Sequence[int] = (),
) -> str:
    """A table; cells that are numbers, or in the ``numeric`` columns, right-aligned, unwrapped."""
    cells = "".join(f"<th>{_e(h)}</th>" for h in head)
    out = [f"<table><tr>{cells}</tr>"]
    for i, row in enumerate(rows):
        cls = f" class='{classes[i]}'" if i < len(classes) and classes[i] else ""
        tds = "".join(
            f"<td class='num'>{_e(c)}</td>"
            if isinstance(c, int | float) or k in numeric
            else f"<td>{_e(c)}</td>"
            for k, c in enumerate(row)
        )
        out.append(f"<tr{cls}>{tds}</tr>")
    out.append("</table>")
    return "".join(out)


def _svg(fig: Figure) -> str:
    """``fig`` as inline SVG (text kept as text, ids fixed so a page is reproducible)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "bnexport"}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return "<figure>" + text[text.index("<svg") :] + "</figure>"


def _figure(height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(FIG_WIDTH_IN, height), dpi=100, layout="constrained")


def _verdict(report: ParityReport) -> str:
    word, cls = ("PASS", "pass") if report.passed else ("FAIL", "fail")
    model = report.model
    lines = [
        "<h1>bnexport check</h1>",
        f"<p><span class='verdict {cls}'>{word}</span></p>",
        f"<p>Model <code>{_e(model.get('path', '?'))}</code> (sha256 "
        f"<code>{_e(str(model.get('sha256', ''))[:12])}</code>) against "
        f"<code>{_e(report.reference.get('name', '?'))}</code>: {report.inputs.get('samples', 0)}"
        f" samples, batch sizes {_e(', '.join(map(str, report.batch_sizes)))}, "
        f"{report.seconds:.1f} s.</p>",
    ]
    if not report.passed:
        failing = ", ".join(report.failing_runners) or "no gating runner ran"
        lines.append(f"<p>Failing runners: <b>{_e(failing)}</b>.</p>")
    loc = report.layers
    first = loc.first_failing if loc is not None else None
    if first is not None:
        lines.append(
            f"<p>First failing layer: <b>{_e(first.layer.key)}</b> ({_e(first.layer.kind)}), "
            f"{_fmt(first.comparison.noise_ratio)}× its noise floor on {_e(loc.runner)}.</p>"
        )
    lines += [f"<p class='muted'>note: {_e(n)}</p>" for n in report.notes]
    return "\n".join(lines)


def _outputs(report: ParityReport) -> str:
    """Per output: each runner's error against its limit, and the distribution of |a − r|."""
    names = list(dict.fromkeys(o.name for r in report.results for o in r.outputs))
    if not names:
        return ""
    parts = [
        "<h2>Outputs: error against budget</h2>",
        f"<p class='muted'>{_e(report.rule_note)}</p>",
    ]
    for name in names:
        rows = [(r, o) for r in report.worst_per_runner() for o in r.outputs if o.name == name]
        parts.append(f"<h3>{_e(name)}</h3>")
        parts.append(_svg(_output_figure(name, rows)))
    return "\n".join(parts)


def _output_figure(name: str, rows: Sequence[tuple[Any, Any]]) -> Figure:
    fig = _figure(3.0)
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.2])
    labels = [f"{r.runner} (b{r.batch_size})" for r, _ in rows]
    ratios = [o.error / o.limit if o.error is not None and o.limit else o.margin for _, o in rows]
    colors = [PASS_COLOR if o.passed else FAIL_COLOR for _, o in rows]
    shown = [max(v, 1e-3) for v in ratios]
    bars = left.barh(labels, shown, color=colors)
    left.bar_label(bars, [f"{_fmt(v, 2)}×" for v in ratios], padding=3, fontsize=8)
    left.axvline(1.0, color=LIMIT_COLOR, linestyle="--", label="budget")
    left.set_xscale("log")
    left.set_xlim(min([*shown, 1.0]) / 3, max([*shown, 1.0]) * 30)
    left.set_xlabel("error / budget (≤ 1 passes)")
    left.invert_yaxis()
    left.legend(loc="lower right", fontsize=8)
    left.set_title(f"{name}: each runner's worst batch", fontsize=10)
    worst_r, worst_o = max(rows, key=lambda ro: ro[1].margin)
    hist = {k: v for k, v in worst_o.histogram.items() if k not in ("0", "non-finite")}
    right.bar(
        range(len(hist)),
        list(hist.values()),
        color=FAIL_COLOR if not worst_o.passed else PASS_COLOR,
    )
    right.set_xticks(
        range(len(hist)), [k.replace("..", "–") for k in hist], rotation=60, fontsize=7
    )
    right.set_yscale("symlog", linthresh=1)
    right.set_ylabel("elements")
    right.set_title(f"|a − r| of {worst_r.runner} (b{worst_r.batch_size})", fontsize=10)
    if worst_o.limit and worst_o.ref_max_abs:
        budget = worst_o.limit * worst_o.ref_max_abs
        pos = _decade_position(budget, list(hist))
        if pos is not None:
            right.axvline(pos, color=LIMIT_COLOR, linestyle="--", label="budget at max|ref|")
            right.legend(fontsize=8)
    return fig


def _decade_position(value: float, bins: Sequence[str]) -> float | None:
    """Where ``value`` falls on the histogram's decade axis (bins ``<1e-9``, ``1e-9..1e-8``, …)."""
    if value <= 0:
        return None
    exponent = math.log10(value)
    for i, label in enumerate(bins):
        if ".." in label:
            lo = float(label.split("..")[0])
            if lo <= value < lo * 10:
                return i - 0.5 + (exponent - math.log10(lo))
    return None


def _layers(report: ParityReport) -> str:
    """The per-layer profile and table, when the check localized."""
    loc = report.layers
    if loc is None:
        return ""
    from bnexport.parity.layer_report import headline

    ordered = sorted(loc.results, key=lambda r: r.layer.order)
    parts = ["<h2>Layers</h2>", f"<p>{_e(headline(loc))}.</p>"]
    if ordered:
        parts.append(_svg(_profile(ordered, loc.first_failing)))
    first = loc.first_failing
    last = loc.last_agreeing
    if first is not None:
        chain = f"; fold chain {first.layer.chain}" if first.layer.chain else ""
        parts.append(
            f"<p>First failing layer: <b>{_e(first.layer.key)}</b> "
            f"({_e(first.layer.kind)}){_e(chain)}, "
            f"computed by <code>{_e(', '.join(first.layer.nodes) or first.layer.value)}</code>."
            + (f" Last agreeing: <b>{_e(last.layer.key)}</b>." if last else "")
            + "</p>"
        )
    else:
        parts.append("<p>No layer exceeds its budget.</p>")
    parts.append(_layer_table(ordered, first))
    unmapped = loc.layer_map.unmapped
    if unmapped:
        parts.append(
            f"<details><summary>{len(unmapped)} module calls without a value of their own"
            "</summary>" + _table(["module call", "why"], unmapped.items()) + "</details>"
        )
    parts += [f"<p class='muted'>note: {_e(n)}</p>" for n in loc.notes]
    return "\n".join(parts)


#: The columns of the layer table.
LAYER_COLUMNS = (
    "layer",
    "type",
    "error",
    "floor",
    "error/floor",
    "limit",
    "verdict",
    "ONNX nodes",
    "fold chain",
)


def _layer_table(ordered: Sequence[Any], first: Any) -> str:
    """One row per layer compared, the first failing one highlighted."""
    rows, classes = [], []
    for r in ordered:
        c = r.comparison
        rows.append(
            [
                r.layer.key,
                r.layer.kind,
                _fmt(c.error),
                _fmt(c.floor),
                _fmt(c.noise_ratio),
                _fmt(c.limit / c.floor if c.limit and c.floor else None),
                "pass" if r.passed else "FAIL",
                ", ".join(r.layer.nodes[:3]),
                r.layer.chain or "",
            ]
        )
        classes.append("first" if r is first else ("" if r.passed else "bad"))
    return _table(LAYER_COLUMNS, rows, classes, numeric=(2, 3, 4, 5))


def _profile(ordered: Sequence[Any], first: Any) -> Figure:
    """error / floor of each compared layer along the depth, the limit, the first failure."""
    fig = _figure(3.6)
    ax = fig.subplots()
    xs = [r.layer.order for r in ordered]
    ys = [max(r.comparison.noise_ratio or r.comparison.margin, 1e-3) for r in ordered]
    ax.plot(xs, ys, color="#999999", linewidth=0.8, zorder=1)
    ok = [i for i, r in enumerate(ordered) if r.passed]
    bad = [i for i, r in enumerate(ordered) if not r.passed]
    for idx, color, label in ((ok, PASS_COLOR, "agrees"), (bad, FAIL_COLOR, "exceeds its budget")):
        if idx:
            ax.scatter(
                [xs[i] for i in idx], [ys[i] for i in idx], c=color, s=18, zorder=2, label=label
            )
    limits = [
        r.comparison.limit / r.comparison.floor
        for r in ordered
        if r.comparison.limit and r.comparison.floor
    ]
    if limits:
        ax.axhline(max(limits), color=LIMIT_COLOR, linestyle="--", label=f"limit {max(limits):g}×")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("module call, in execution order")
    ax.set_ylabel("error / noise floor")
    if first is not None:
        y = max(first.comparison.noise_ratio or first.comparison.margin, 1e-3)
        ax.annotate(
            f"first failing: {first.layer.key}",
            (first.layer.order, y),
            xytext=(-30 if first.layer.order > xs[-1] * 0.7 else 30, -45),
            textcoords="offset points",
            ha="right" if first.layer.order > xs[-1] * 0.7 else "left",
            va="top",
            fontsize=9,
            color=FAIL_COLOR,
            arrowprops={"arrowstyle": "->", "color": FAIL_COLOR},
            bbox={"boxstyle": "round", "fc": "white", "ec": FAIL_COLOR},
        )
        ax.scatter([first.layer.order], [y], s=120, facecolors="none", edgecolors=FAIL_COLOR)
    ax.set_title("per-layer error along the depth", fontsize=10)
    return fig


def _worst(report: ParityReport) -> str:
    """Each runner's worst element (its worst batch size), failures first."""
    rows, classes = [], []
    results = sorted(report.worst_per_runner(), key=lambda r: (r.passed, -r.margin))
    for r in results:
        for o in r.outputs:
            w = o.worst
            if w is None:
                continue
            where = f"{w.input_set}[{w.set_index}]" if w.input_set else str(w.sample)
            rows.append(
                [
                    r.runner,
                    r.batch_size,
                    o.name,
                    where,
                    ",".join(map(str, w.index)),
                    _fmt(w.candidate, 7),
                    _fmt(w.reference, 7),
                    _fmt(w.abs_err),
                    _fmt(w.allowed),
                ]
            )
            classes.append("" if o.passed else "bad")
    if not rows:
        return ""
    head = [
        "runner",
        "batch",
        "output",
        "sample",
        "index",
        "candidate",
        "reference",
        "|error|",
        "allowed",
    ]
    return "<h2>Worst samples</h2>" + _table(head, rows, classes, numeric=(5, 6, 7, 8))


def _fold(report: ParityReport) -> str:
    fold = report.fold
    if not fold:
        return ""
    rows = [
        [
            e["bn"],
            e["bn_type"],
            e["status"],
            e.get("into") or "",
            e.get("chain") or "",
            e.get("reason") or "",
        ]
        for e in fold.get("entries", [])
    ]
    head = (
        f"{fold.get('folded', 0)} of {fold.get('batchnorms', 0)} BatchNorms folded, "
        f"{fold.get('left', 0)} left"
    )
    table = _table(["BatchNorm", "type", "status", "into", "chain", "why left"], rows)
    if len(rows) > FOLD_ROWS_OPEN:
        table = f"<details><summary>every BatchNorm ({len(rows)})</summary>{table}</details>"
    return f"<h2>Fold</h2><p>{_e(head)}.</p>" + table


def _machine(report: ParityReport) -> str:
    rows = [[k, v] for k, v in {**report.device, **report.versions}.items()]
    return "<h2>Machine and versions</h2>" + _table(["what", "value"], rows)
