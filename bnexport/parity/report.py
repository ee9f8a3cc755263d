"""The parity report: one result per runner and batch size, rendered as a dict (JSON), JUnit XML,
Markdown and a table of one row per runner (its worst batch size; :func:`summary_rows`).
``passed`` is True only when every gating runner passed and at least one ran."""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnexport.noise import NoiseTolerance
from bnexport.parity.compare import OutputComparison, finite_or_str
from bnexport.parity.tolerance import Tolerance

REPORT_FORMAT = "bnexport.parity/2"
NOISE_NOTE = (
    "error: max|a−t| / max|t| per sample against the float64 truth t; floor: PyTorch fp32's own "
    "error (two batch sizes; raised where its long sums in another order err more); "
    "error/floor, at the worst sample, must stay within the limit; fixed atol: the smallest "
    "passing --tolerance fixed --atol at rtol 0, against fp32 (it can read below the error); "
    "argmax: agreement with the truth's top class"
)
FIXED_NOTE = (
    "An element passes when |a − r| <= atol·max(1, max|ref|) + rtol·|r| against PyTorch fp32 "
    "(max|ref| per sample); error: worst sample's max|a − r| / max|r|."
)


@dataclass
class RunnerResult:
    """One candidate runner at one batch size, compared with the reference."""

    runner: str
    kind: str
    gating: bool
    batch_size: int
    batches: int
    samples: int
    seconds: float
    tolerance: Tolerance | NoiseTolerance
    outputs: list[OutputComparison] = field(default_factory=list)
    ground_truth_max_abs_err: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # the runner crashed: a failure with this message

    @property
    def passed(self) -> bool:
        return self.error is None and all(o.passed for o in self.outputs)

    @property
    def status(self) -> str:
        """``PASS``, ``FAIL``, or for a non-gating runner ``pass (info)`` / ``FAIL (info)``."""
        word = "PASS" if self.passed else "FAIL"
        return word if self.gating else f"{word.lower() if self.passed else word} (info)"

    def worst_output(self) -> OutputComparison | None:
        """The output closest to (or furthest past) its limit."""
        if not self.outputs:
            return None
        return max(self.outputs, key=lambda o: (not o.passed, o.margin))

    @property
    def margin(self) -> float:
        """Error / limit of the worst output (above 1 fails); inf when the runner crashed."""
        if self.error:
            return math.inf
        worst = self.worst_output()
        return worst.margin if worst else 0.0

    def failure_message(self) -> str:
        """One paragraph: what failed, by how much, where, and what tolerance would have passed."""
        return "; ".join(self.failure_messages())

    def failure_messages(self) -> list[str]:
        """One sentence per failing output (or the crash): what failed, by how much, where, and
        what tolerance would have passed."""
        if self.error:
            return [f"{self.runner} (batch {self.batch_size}) failed to run: {self.error}"]
        parts = []
        for o in self.outputs:
            if o.passed:
                continue
            if isinstance(o.tolerance, NoiseTolerance):
                parts.append(_noise_failure(self, o))
                continue
            text = (
                f"{self.runner} batch {self.batch_size}: output {o.name!r} has {o.violations} of "
                f"{o.elements} elements outside {o.tolerance}; max abs err {o.max_abs_err:.3g} "
                f"(rel {o.rel_err:.3g}), cosine {o.cosine:.6f}"
            )
            if o.argmax_agreement is not None:
                text += f", argmax agreement {o.argmax_agreement:.2%}"
            if o.nan_candidate or o.inf_candidate:
                text += f", {o.nan_candidate} NaN / {o.inf_candidate} Inf in the candidate"
            text += (
                f"; would pass with --atol {fmt(o.min_atol_scale)} (at rtol {o.tolerance.rtol:g})"
                f" or --rtol {fmt(o.min_rtol)} (at atol {o.tolerance.atol_scale:g})"
            )
            if o.worst:
                text += f"; worst: {o.worst.describe()}"
            parts.append(text)
        return parts

    def to_dict(self) -> dict[str, Any]:
        return {
            "runner": self.runner,
            "kind": self.kind,
            "gating": self.gating,
            "batch_size": self.batch_size,
            "batches": self.batches,
            "samples": self.samples,
            "seconds": self.seconds,
            "passed": self.passed,
            "tolerance": self.tolerance.to_dict(),
            "max_abs_err": finite_or_str(max((o.max_abs_err for o in self.outputs), default=0.0)),
            "outputs": [o.to_dict() for o in self.outputs],
            "ground_truth_max_abs_err": {
                k: finite_or_str(v) for k, v in self.ground_truth_max_abs_err.items()
            },
            "error": self.error,
        }


@dataclass
class ParityReport:
    """Everything a check found, and everything needed to reproduce it."""

    passed: bool
    model: dict[str, Any]
    reference: dict[str, Any]
    runners: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    results: list[RunnerResult]
    inputs: dict[str, Any]
    batch_sizes: list[int]
    tolerances: dict[str, Tolerance]
    versions: dict[str, str]
    device: dict[str, Any]
    cuda_probe: dict[str, Any] | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    tolerance_mode: str = "noise"
    noise_tolerance: NoiseTolerance = field(default_factory=NoiseTolerance)
    layers: Any = None  # a `bnexport.parity.localize.Localization`, when localization ran
    fold: dict[str, Any] | None = None  # the fold report's dict, for the HTML report only

    @property
    def rule_note(self) -> str:
        return NOISE_NOTE if self.tolerance_mode == "noise" else FIXED_NOTE

    def noise_floors(self) -> dict[str, float]:
        """Per output, the noise floor F the check measured (fp32 vs the float64 truth; before
        summation order raised it on some samples)."""
        floors: dict[str, float] = {}
        for r in self.results:
            for o in r.outputs:
                floor = o.floor if o.base_floor is None else o.base_floor
                if floor is not None and o.dtype == "float32":
                    floors.setdefault(o.name, floor)
        return floors

    def worst_per_runner(self) -> list[RunnerResult]:
        """One result per runner, in order: its worst batch size (a failure first)."""
        by_runner: dict[str, RunnerResult] = {}
        for r in self.results:
            seen = by_runner.get(r.runner)
            if seen is None or (not r.passed, r.margin) > (not seen.passed, seen.margin):
                by_runner[r.runner] = r
        return list(by_runner.values())

    @property
    def failures(self) -> list[RunnerResult]:
        """Gating results that failed."""
        return [r for r in self.results if r.gating and not r.passed]

    @property
    def failing_runners(self) -> list[str]:
        return list(dict.fromkeys(r.runner for r in self.failures))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "passed": self.passed,
            "failing_runners": self.failing_runners,
            "model": self.model,
            "reference": self.reference,
            "runners": self.runners,
            "skipped": self.skipped,
            "batch_sizes": self.batch_sizes,
            "tolerance_mode": self.tolerance_mode,
            "noise_tolerance": self.noise_tolerance.to_dict(),
            "noise_floors": self.noise_floors(),
            "tolerances": {k: v.to_dict() for k, v in self.tolerances.items()},
            "inputs": self.inputs,
            "results": [r.to_dict() for r in self.results],
            "versions": self.versions,
            "device": self.device,
            "cuda_probe": self.cuda_probe,
            "seconds": self.seconds,
            "notes": self.notes,
            **({"layers": self.layers.to_dict()} if self.layers is not None else {}),
        }

    def to_junit_xml(self) -> str:
        """JUnit XML: one ``testcase`` per runner and batch size; skipped runners as skipped."""
        cases = len(self.results) + len(self.skipped)
        suite = ET.Element(
            "testsuite",
            name="bnexport.parity",
            tests=str(cases),
            failures=str(len(self.failures)),
            errors="0",
            skipped=str(len(self.skipped)),
            time=f"{self.seconds:.3f}",
        )
        props = ET.SubElement(suite, "properties")
        for key, value in {
            "model": self.model.get("path", ""),
            "model_sha256": self.model.get("sha256", ""),
            "reference": self.reference.get("name", ""),
            **{f"version.{k}": v for k, v in self.versions.items()},
        }.items():
            ET.SubElement(props, "property", name=key, value=str(value))
        for r in self.results:
            _junit_result(suite, r)
        for s in self.skipped:
            case = ET.SubElement(
                suite,
                "testcase",
                classname=f"bnexport.parity.{s['runner']}",
                name=s["runner"],
                time="0",
            )
            ET.SubElement(case, "skipped", message=s["reason"])
        failures = len(self.failures)
        if self.layers is not None and self.layers.requested:  # --localize: a case per layer
            from bnexport.parity.layer_report import add_junit_cases

            added, failed = add_junit_cases(suite, self.layers)
            cases, failures = cases + added, failures + failed
            suite.set("tests", str(cases))
            suite.set("failures", str(failures))
        root = ET.Element(
            "testsuites",
            name="bnexport check",
            tests=str(cases),
            failures=str(failures),
            time=f"{self.seconds:.3f}",
        )
        root.append(suite)
        ET.indent(root)
        return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"

    def to_markdown(self) -> str:
        """A summary for a CI job page: verdict, the table, failures, skipped runners, versions."""
        from bnexport.parity.tables import VERBOSE_COLUMNS, result_rows

        verdict = "✅ PASS" if self.passed else "❌ FAIL"
        sha = str(self.model.get("sha256", ""))
        sets = ", ".join(f"{s['name']} {s['samples']}" for s in self.inputs.get("sets", []))
        lines = [
            f"## bnexport check: {verdict}",
            "",
            f"Model `{self.model.get('path', '?')}` (sha256 `{sha[:12]}`)"
            f" against `{self.reference.get('name', '?')}`; {self.inputs.get('samples', 0)} samples"
            f" ({sets}),"
            f" batch sizes {', '.join(map(str, self.batch_sizes))}; {self.seconds:.2f} s.",
            "",
            "| " + " | ".join(VERBOSE_COLUMNS) + " |",
            "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in self.results:
            for row in result_rows(r, verbose=True):
                lines.append("| " + " | ".join(_md(c) for c in row) + " |")
        lines += ["", self.rule_note]
        if self.failures:
            lines += ["", "### Failures", ""]
            lines += [f"- {r.failure_message()}" for r in self.failures]
        if self.skipped:
            lines += ["", "### Skipped runners", ""]
            lines += [f"- `{s['runner']}`: {s['reason']}" for s in self.skipped]
        if self.notes or self.inputs.get("notes"):
            lines += ["", "### Notes", ""]
            lines += [f"- {n}" for n in [*self.notes, *self.inputs.get("notes", [])]]
        if self.layers is not None:
            from bnexport.parity.layer_report import markdown_lines

            lines += ["", *markdown_lines(self.layers)]
        lines += [
            "",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()),
            "",
        ]
        return "\n".join(lines)

    def write_json(self, path: str | os.PathLike[str]) -> None:
        from bnexport.files import write_json

        write_json(path, self.to_dict())

    def write_junit(self, path: str | os.PathLike[str]) -> None:
        _write_text(path, self.to_junit_xml())

    def write_markdown(self, path: str | os.PathLike[str]) -> None:
        _write_text(path, self.to_markdown())

    def write_reports(
        self,
        *,
        json_path: str | os.PathLike[str] | None = None,
        junit_path: str | os.PathLike[str] | None = None,
        markdown_path: str | os.PathLike[str] | None = None,
        html_path: str | os.PathLike[str] | None = None,
    ) -> None:
        """Write the asked-for JSON / JUnit / Markdown / HTML files all or nothing
        (`write_files`)."""
        from bnexport.files import json_text, write_files

        writers: dict[str | os.PathLike[str], Callable[[Path], object]] = {}
        if json_path is not None:
            writers[json_path] = lambda tmp: tmp.write_text(
                json_text(self.to_dict()), encoding="utf-8"
            )
        if junit_path is not None:
            writers[junit_path] = lambda tmp: tmp.write_text(self.to_junit_xml(), encoding="utf-8")
        if markdown_path is not None:
            writers[markdown_path] = lambda tmp: tmp.write_text(
                self.to_markdown(), encoding="utf-8"
            )
        if html_path is not None:
            from bnexport.parity.html import html_report

            writers[html_path] = lambda tmp: tmp.write_text(html_report(self), encoding="utf-8")
        if writers:
            write_files(writers)


def limit_text(tol: Tolerance | NoiseTolerance, kind: str) -> str:
    if isinstance(tol, NoiseTolerance):
        from bnexport.noise import KIND_PRECISION

        return f"{tol.factor * KIND_PRECISION.get(kind, 1.0):g}×"
    return tol.short()


def percent(x: float) -> str:
    return "100%" if x == 1.0 else f"{x:.1%}"


def _noise_failure(r: RunnerResult, o: OutputComparison) -> str:
    """A noise-rule failure: the error, the floor, the limit, what it means, and where."""
    limit = limit_text(o.tolerance, r.kind)
    text = (
        f"{r.runner} batch {r.batch_size}: output {o.name!r} errs {fmt(o.error or 0.0)} of its "
        f"scale against the float64 truth, {fmt(o.noise_ratio or 0.0)}× the noise floor "
        f"{fmt(o.floor or 0.0)} (fp32's own rounding); the limit is {limit}, so this is not "
        "rounding: the model computes something else"
    )
    if o.nan_candidate or o.inf_candidate:
        text += f"; {o.nan_candidate} NaN / {o.inf_candidate} Inf in its output"
    if o.argmax_agreement is not None and o.classifier:
        text += f"; argmax agrees on {percent(o.argmax_agreement)}"
    text += f"; would pass --tolerance fixed --rtol 0 --atol {fmt(o.min_atol_scale)}"
    if o.worst:
        text += f"; worst: {o.worst.describe()}"
    return text


def _junit_result(suite: ET.Element, r: RunnerResult) -> None:
    """One runner at one batch size as a JUnit ``testcase``: a failure when it gates and fails,
    its summary line as output otherwise."""
    case = ET.SubElement(
        suite,
        "testcase",
        classname=f"bnexport.parity.{r.runner}",
        name=f"{r.runner}[batch={r.batch_size}]",
        time=f"{r.seconds:.4f}",
    )
    summary = _result_line(r)
    if r.gating and not r.passed:
        fail = ET.SubElement(case, "failure", message=r.failure_message(), type="ParityMismatch")
        fail.text = summary
        return
    note = "" if r.gating or r.passed else f"\nnot gating; would fail: {r.failure_message()}"
    ET.SubElement(case, "system-out").text = summary + note


def _result_line(r: RunnerResult) -> str:
    if r.error:
        return f"error: {r.error}"
    return "; ".join(
        f"{o.name}: max abs err {o.max_abs_err:.3g}, rel {o.rel_err:.3g}, "
        f"cosine {_fmt_cos(o.cosine)}, needs atol {fmt(o.min_atol_scale)} / "
        f"rtol {fmt(o.min_rtol)}"
        for o in r.outputs
    )


def fmt(x: float, digits: int = 3) -> str:
    return "inf" if math.isinf(x) else ("nan" if math.isnan(x) else f"{x:.{digits}g}")


def _fmt_cos(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.7f}"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _write_text(path: str | os.PathLike[str], text: str) -> None:
    from bnexport.files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
