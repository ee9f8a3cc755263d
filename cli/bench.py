"""`bnexport bench`: PyTorch eager vs onnxruntime, side by side, interleaved, with ratios."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bnexport.cli.errors import EXIT_MISMATCH, handle_errors
from bnexport.cli.fold import CheckpointArg
from bnexport.cli.options import (
    CooldownOpt,
    InputShapeOpt,
    MinTimeOpt,
    ModelOpt,
    TemperatureOpt,
    WarmupOpt,
    load_model_source,
)
from bnexport.cli.progress import StageProgress
from bnexport.cli.render import console, duration, load_averages, table
from bnexport.defaults import (
    DEFAULT_BENCH_BATCH_SIZES,
    DEFAULT_BENCH_REPEATS,
    DEFAULT_COOLDOWN_S,
    DEFAULT_MIN_TIME_S,
    DEFAULT_WARMUP_S,
)


@handle_errors
def bench_cli(
    checkpoint: CheckpointArg = None,
    model: ModelOpt = None,
    input_shape: InputShapeOpt = None,
    temperature: TemperatureOpt = None,
    onnx: Annotated[
        Path | None,
        typer.Option(
            "--onnx",
            help="Bench this ONNX file as bnexport's export (default: fold "
            "and export the model here).",
        ),
    ] = None,
    json_path: Annotated[
        Path | None,
        typer.Option("--json", help="Write every figure, versions, threads and CPU model here."),
    ] = None,
    repeats: Annotated[
        int, typer.Option("--repeats", min=1, help="Timed rounds per batch size.")
    ] = DEFAULT_BENCH_REPEATS,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="Threads for PyTorch and every onnxruntime session (default: each backend's "
            "own default).",
        ),
    ] = None,
    batch_sizes: Annotated[
        str,
        typer.Option("--batch-sizes", help="Comma-separated batch sizes (1 is the latency one)."),
    ] = ",".join(map(str, DEFAULT_BENCH_BATCH_SIZES)),
    min_time: MinTimeOpt = DEFAULT_MIN_TIME_S,
    warmup: WarmupOpt = DEFAULT_WARMUP_S,
    cooldown: CooldownOpt = DEFAULT_COOLDOWN_S,
    cuda: Annotated[
        bool,
        typer.Option("--cuda/--no-cuda", help="Include onnxruntime CUDA when it really runs."),
    ] = True,
    tuned: Annotated[
        list[Path] | None,
        typer.Option(
            "--tuned",
            help="A file from `bnexport tune`, benched as a deployer opts in "
            "(ORT_LOAD_CONFIG_FROM_MODEL=1: its own ort_config, not --threads). Repeatable.",
            show_default=False,
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show onnxruntime's own log lines.")
    ] = False,
) -> None:
    """Benchmark PyTorch eager (unfolded, folded) and onnxruntime (torch's export, bnexport's).

    Exit 0: measured; 1: a candidate computes something else than the PyTorch model (named;
    its timings compare different models); 2: bad input. The files, the paths and every bound
    are checked before any timing.
    """
    from bnexport.errors import BnexportError
    from bnexport.files import check_output_paths, write_json
    from bnexport.ort import show_log

    show_log(verbose)
    check_output_paths({"--json": json_path}, [checkpoint, onnx, *(tuned or ())])
    from bnexport.bench import BenchConfig, check_benchable, run_bench

    try:
        sizes = tuple(int(s) for s in batch_sizes.replace(" ", "").split(",") if s)
    except ValueError:
        raise BnexportError(
            f"--batch-sizes {batch_sizes!r} is not a comma-separated list of integers (e.g. 1,64)"
        ) from None
    config = BenchConfig(
        batch_sizes=sizes,
        warmup_s=warmup,
        repeats=repeats,
        min_time_s=min_time,
        cooldown_s=cooldown,
        threads=threads,
        include_cuda=cuda,
    )
    source = load_model_source(checkpoint, model, input_shape, temperature)
    check_benchable(source)
    with StageProgress() as progress:
        report = run_bench(
            source, config, onnx_path=onnx, progress=progress, tuned_paths=tuned or ()
        )
    if json_path is not None:
        write_json(json_path, report.to_dict())
    _render(report, json_path)
    if any(info.matches is False for info in report.candidates):
        raise typer.Exit(EXIT_MISMATCH)


def _render(report: Any, json_path: Path | None) -> None:
    from rich.markup import escape

    from bnexport.bench import LABELS
    from bnexport.bench.candidates import OUTPUT_MATCH_RTOL

    labels = {**LABELS, **{c.name: c.label for c in report.candidates}}
    out = console()
    _print_setting(out, report)
    out.print(_measurements_table(report, labels))
    if report.comparisons:
        out.print(_comparisons_table(report, labels))
    for info in report.candidates:
        if not info.available:
            out.print(f"not run: {info.label}: {escape(info.reason)}")
        elif info.matches is False:
            out.print(
                f"MISMATCH: {escape(info.label)} computes something else than the PyTorch model "
                f"(max |difference| {info.max_abs_diff:.3g}, more than {OUTPUT_MATCH_RTOL:g} × "
                "its largest output); its timings compare different models (wrong --onnx "
                "file?)",
                highlight=False,
            )
    if json_path is not None:
        out.print(f"wrote {escape(str(json_path))}")


def _print_setting(out: Any, report: Any) -> None:
    """The model's work, the peak, the machine and the load: what the figures are relative to."""
    from rich.markup import escape

    env = report.environment
    threads = env["threads"]
    out.print(
        f"{escape(report.model)}: {report.flops.per_image / 1e6:.3f} MFLOP/image; "
        f"fp32 peak {report.peak.gflops:.0f} GFLOP/s ({report.peak.method}, "
        f"{report.peak.threads} threads)"
    )
    out.print(
        f"{env['cpu_model']}, {env['cpus_available']} CPUs; torch {env['versions']['torch']} "
        f"({threads['torch_intra_op']} threads), onnxruntime {env['versions']['onnxruntime']}; "
        f"load average {load_averages(env)}; {env['date']}"
    )


def _comparisons_table(report: Any, labels: dict[str, str]) -> Any:
    """One row per candidate compared with another, one column per batch size: the paired ratio."""
    batches = sorted({c.batch_size for c in report.comparisons})
    cells: dict[tuple[str, str], dict[int, str]] = {}
    for c in report.comparisons:
        r = c.ratio
        key = (labels.get(c.candidate, c.candidate), labels.get(c.reference, c.reference))
        cells.setdefault(key, {})[c.batch_size] = f"{r.median:.3f}× [{r.p10:.2f}–{r.p90:.2f}]"
    rows = [
        [candidate, reference, *(by_batch.get(b, "-") for b in batches)]
        for (candidate, reference), by_batch in cells.items()
    ]
    title = "paired speedup, median [p10–p90]: candidate's throughput / reference's"
    return table(title, ["candidate", "vs", *(f"batch {b}" for b in batches)], rows)


def _measurements_table(report: Any, labels: dict[str, str]) -> Any:
    """One row per candidate and batch size: times, throughput, GFLOP/s, speedup vs eager."""
    from bnexport.bench import BASELINE, LATENCY_BATCH

    rows = []
    for m in report.measurements:
        s = m.speedup
        ratio = (
            "1.00× (baseline)"
            if m.candidate == BASELINE
            else (f"{s.median:.2f}× [{s.p10:.2f}–{s.p90:.2f}]")
        )
        rows.append(
            [
                labels.get(m.candidate, m.candidate),
                m.batch_size,
                duration(m.median_s),
                duration(m.p90_s),
                f"{m.images_per_s:,.0f}",
                "-" if m.gflops is None else f"{m.gflops:.1f}",
                "-" if m.peak_fraction is None else f"{m.peak_fraction:.1%}",
                ratio,
            ]
        )
    title = (
        f"median of {report.config.repeats} interleaved timings; batch {LATENCY_BATCH} = latency; "
        "× = paired speedup vs PyTorch eager unfolded [p10–p90]"
    )
    columns = ["candidate", "batch", "median", "p90", "images/s", "GFLOP/s", "of peak", "× eager"]
    return table(title, columns, rows)
