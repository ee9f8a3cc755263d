"""`bnexport tune`: measure the onnxruntime settings a file should carry, write them into a copy."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bnexport.cli.errors import EXIT_MISMATCH, handle_errors
from bnexport.cli.options import CooldownOpt, KeepFailedOpt, MinTimeOpt, WarmupOpt
from bnexport.cli.render import console, duration, load_averages, table
from bnexport.defaults import (
    DEFAULT_CONFIRM_REPEATS,
    DEFAULT_COOLDOWN_S,
    DEFAULT_FINALISTS,
    DEFAULT_MIN_TIME_S,
    DEFAULT_SCREEN_REPEATS,
    DEFAULT_TUNE_BATCH_SIZE,
    DEFAULT_TUNE_BUDGET_S,
    DEFAULT_WARMUP_S,
)

if TYPE_CHECKING:
    from bnexport.progress import ProgressEvent


@handle_errors
def tune_cli(
    model: Annotated[
        Path, typer.Argument(help="The ONNX file to tune (any ONNX model).", show_default=False)
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Where to write the tuned copy.", show_default=False),
    ],
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="The batch size to tune for.")
    ] = DEFAULT_TUNE_BATCH_SIZE,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="Most intra-op threads the deployment may use (default: every available CPU).",
        ),
    ] = None,
    providers: Annotated[
        str,
        typer.Option(
            "--providers",
            help="cpu, or cuda (when it really runs; the provider itself is not carried: the "
            "deployer chooses it).",
        ),
    ] = "cpu",
    fix: Annotated[
        list[str] | None,
        typer.Option(
            "--fix",
            metavar="KEY=VALUE",
            help="Keep a carried setting fixed during the search (intra_op_num_threads, "
            "inter_op_num_threads, execution_mode, graph_optimization_level, or a session config "
            "entry such as session.disable_prepacking=1). Repeatable. A setting the file cannot "
            "carry is refused, with how to set it by hand.",
            show_default=False,
        ),
    ] = None,
    budget: Annotated[
        float,
        typer.Option(
            "--budget",
            min=0.1,
            help="Seconds of timing (screen + confirm); repeats shrink to fit, down to a minimum.",
        ),
    ] = DEFAULT_TUNE_BUDGET_S,
    screen_repeats: Annotated[
        int, typer.Option("--screen-repeats", min=1, help="Most rounds of the screening stage.")
    ] = DEFAULT_SCREEN_REPEATS,
    repeats: Annotated[
        int,
        typer.Option("--repeats", min=3, help="Most rounds of the confirming stage (the figures)."),
    ] = DEFAULT_CONFIRM_REPEATS,
    finalists: Annotated[
        int, typer.Option("--finalists", min=1, help="Settings confirmed after screening.")
    ] = DEFAULT_FINALISTS,
    min_time: MinTimeOpt = DEFAULT_MIN_TIME_S,
    warmup: WarmupOpt = DEFAULT_WARMUP_S,
    cooldown: CooldownOpt = DEFAULT_COOLDOWN_S,
    json_path: Annotated[
        Path | None,
        typer.Option("--json", help="Write every timing ratio, the decision and the record here."),
    ] = None,
    keep_failed: KeepFailedOpt = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show onnxruntime's own log lines.")
    ] = False,
) -> None:
    """Find the fastest onnxruntime settings for a batch size and carry them in the file.

    Searches what onnxruntime reads from a model's ort_config (intra-op threads, graph
    optimization level, execution mode), each with prepacking on and off, with bench's
    interleaved, paired timing, writes the fastest into a copy's ort_config (prepacking into
    bnexport_session_config; graph untouched) with a bnexport_tune record of the measurement,
    after checking the copy's outputs against the input. Deployers opt in with
    ORT_LOAD_CONFIG_FROM_MODEL=1; bnexport serve applies everything the file carries.

    Exit 0: written; 1: the tuned outputs differ (nothing left at -o; --keep-failed keeps the
    file as NAME.failed.onnx); 2: bad input. The file, the output paths and every bound are
    checked before any timing; -o and --json are written all or nothing.
    """
    from bnexport.errors import BnexportError
    from bnexport.ort import show_log
    from bnexport.tune import TuneConfig, tune_model

    show_log(verbose)
    if providers not in ("cpu", "cuda"):
        raise BnexportError(f"--providers {providers!r}: choose cpu or cuda (one provider)")
    config = TuneConfig(
        batch_size=batch_size,
        max_threads=threads,
        provider=providers,
        fixed=_parse_fix(fix or []),
        budget_s=budget,
        screen_repeats=screen_repeats,
        confirm_repeats=repeats,
        finalists=finalists,
        min_time_s=min_time,
        warmup_s=warmup,
        cooldown_s=cooldown,
    )
    report = tune_model(
        model,
        output,
        config,
        progress=_StageLines(),
        json_path=json_path,
        keep_failed=keep_failed,
    )
    _render(report, json_path)
    if not report.passed:
        raise typer.Exit(EXIT_MISMATCH)


def _parse_fix(values: list[str]) -> dict[str, str]:
    from bnexport.errors import BnexportError

    fixed: dict[str, str] = {}
    for raw in values:
        key, sep, value = raw.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise BnexportError(f"--fix {raw!r}: use KEY=VALUE, e.g. --fix intra_op_num_threads=1")
        fixed[key.strip()] = value.strip()
    return fixed


class _StageLines:
    """One line on stderr per stage (load, screen, confirm, parity, write)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage in self.seen:
            return
        self.seen.add(event.stage)
        typer.echo(f"tune: {event.stage}: {event.message}", err=True)


def _render(report: Any, json_path: Path | None) -> None:
    from rich.markup import escape

    out = console()
    env = report.environment
    cfg = report.config
    out.print(
        f"{escape(report.model)}: batch {cfg.batch_size}, {cfg.provider}; {env['cpu_model']}, "
        f"{env['cpus_available']} CPUs, onnxruntime {env['versions']['onnxruntime']}; load "
        f"average {load_averages(env)}"
    )
    _print_timings(out, report)
    _print_outcome(out, report)
    if json_path is not None:
        out.print(f"wrote {escape(str(json_path))}")


def _print_timings(out: Any, report: Any) -> None:
    """The screen's and the confirm stage's tables (paired ratios vs onnxruntime's defaults)."""
    from rich.markup import escape

    rows = [[r.settings.label(), duration(r.median_s), _ratio(r.ratio)] for r in report.screen]
    out.print(
        table(
            escape(
                f"screen: {report.plan['screen_repeats']} rounds, in-process; × = paired speedup "
                "vs onnxruntime defaults [p10–p90]"
            ),
            ["setting", "median", "×"],
            rows,
        )
    )
    rows = [["control (defaults, carried)", "-", _ratio(report.control)]]
    rows += [[r.settings.label(), duration(r.median_s), _ratio(r.ratio)] for r in report.confirm]
    out.print(
        table(
            f"confirm: {report.plan['confirm_repeats']} rounds, each file opened with "
            "ORT_LOAD_CONFIG_FROM_MODEL=1 (with session config entries: by bnexport's session "
            "factory, as bnexport serve does; every written key read back from the session)",
            ["setting", "median", "×"],
            rows,
        )
    )


def _print_outcome(out: Any, report: Any) -> None:
    """The pick and why, what was rejected, the parity check, and what was written."""
    from rich.markup import escape

    d = report.decision
    verdict = "faster beyond noise" if d.faster else "defaults kept"
    out.print(f"picked: {escape(d.settings.label())} ({verdict}): {escape(d.reason)}")
    for line in report.rejected:
        out.print(f"rejected: {escape(line)}")
    for line in report.warnings:
        out.print(f"warning: {escape(line)}")
    p = report.parity
    if p is not None:
        status = "pass" if p.passed else "FAIL"
        out.print(
            f"parity {status}: output {p.output!r}, error {p.error:.3g} ≤ limit {p.limit:.3g} "
            f"(noise {p.noise:.3g}; {p.samples} samples; truth = {p.truth})"
        )
    if report.output is not None and not report.passed:
        out.print(
            f"nothing left at -o: the tuned outputs differ from the input model's; the failing "
            f"file is kept as {escape(report.output)} (--keep-failed)"
        )
    elif report.output is not None:
        entries = d.settings.entries
        carried = "ort_config + bnexport_session_config" if entries else "ort_config"
        out.print(
            f"wrote {escape(report.output)} ({carried} + bnexport_tune record; graph "
            "unchanged). Opt in: ORT_LOAD_CONFIG_FROM_MODEL=1"
        )
        for key, value in entries.items():
            out.print(
                f"{key}={value} is applied by bnexport serve and bnexport.ort.make_session("
                'file_settings="apply"); onnxruntime does not read it from the file: add '
                f'so.add_session_config_entry("{key}", "{value}") by hand'
            )
        if report.config.provider == "cuda":
            out.print(
                "the provider is not carried: create the session with "
                'providers=[("CUDAExecutionProvider", {"use_tf32": "0"})] by hand'
            )
    else:
        out.print("nothing left at -o: the tuned outputs differ from the input model's")


def _ratio(r: Any) -> str:
    return f"{r.median:.3f}× [{r.p10:.3f}–{r.p90:.3f}]"
