"""`bnexport check`: prove an ONNX model computes what its PyTorch model computes.

Thin glue: options → `CheckConfig` → `bnexport.parity.check_parity` → a table, optional JSON /
JUnit / Markdown files, and the exit code (0 pass, 1 mismatch, 2 bad input or CUDA unavailable).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from bnexport.cli._common import (
    EXIT_MISMATCH,
    EXIT_OK,
    InputShapeOpt,
    ModelOpt,
    TemperatureOpt,
    console,
    handle_errors,
    load_model_source,
    table,
)

DEFAULT_PROVIDERS = "auto"
DEFAULT_OPT_LEVELS = "disabled,all"
DEFAULT_BATCH_SIZES = "1,7,64"
DEFAULT_RANDOM = 64


@handle_errors
def check_cli(
    model: Annotated[Path, typer.Argument(help="The ONNX model to check.", show_default=False)],
    checkpoint: Annotated[
        Path | None,
        typer.Argument(
            help="Weights for --model (a state_dict); same as --against.", show_default=False
        ),
    ] = None,
    against: Annotated[
        Path | None,
        typer.Option(
            "--against",
            help="The checkpoint the ONNX model was exported from (bnexport or seed layout).",
            show_default=False,
        ),
    ] = None,
    model_spec: ModelOpt = None,
    input_shape: InputShapeOpt = None,
    temperature: TemperatureOpt = None,
    providers: Annotated[
        str,
        typer.Option(
            "--providers",
            help="cpu, cuda, cpu,cuda or auto (CPU, plus CUDA when a probe proves it runs). "
            "CUDA asked for and not running is exit 2, never a CPU pass.",
        ),
    ] = DEFAULT_PROVIDERS,
    opt_levels: Annotated[
        str,
        typer.Option(
            "--opt-levels",
            help="onnxruntime CPU graph optimization levels: disabled, basic, extended, all.",
        ),
    ] = DEFAULT_OPT_LEVELS,
    batch_sizes: Annotated[
        str, typer.Option("--batch-sizes", help="Batch sizes.")
    ] = DEFAULT_BATCH_SIZES,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Also feed the IDX test images in DIR.", show_default=False),
    ] = None,
    data_limit: Annotated[
        int | None,
        typer.Option(
            "--data-limit",
            min=1,
            help="Feed only the first N images of --data.",
            show_default=False,
        ),
    ] = None,
    inputs: Annotated[
        Path | None,
        typer.Option(
            "--inputs",
            help="Feed exactly these inputs (.npz from --save-inputs, or an array per ONNX input).",
            show_default=False,
        ),
    ] = None,
    save_inputs: Annotated[
        Path | None,
        typer.Option(
            "--save-inputs",
            help="Save what is fed (.npz) to rerun it with --inputs.",
            show_default=False,
        ),
    ] = None,
    bundled: Annotated[
        bool,
        typer.Option("--bundled/--no-bundled", help="Feed the 1000 bundled Fashion-MNIST images."),
    ] = True,
    random_count: Annotated[
        int, typer.Option("--random", min=0, help="Seeded standard-normal samples to feed.")
    ] = DEFAULT_RANDOM,
    edge_cases: Annotated[
        bool,
        typer.Option("--edge-cases/--no-edge-cases", help="Feed zeros, constant images and ±1e4."),
    ] = True,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random inputs.")] = 0,
    rtol: Annotated[
        list[str] | None,
        typer.Option(
            "--rtol",
            help="Relative tolerance, for every runner kind or KIND=VALUE (kinds: cpu, torch, "
            "cuda, cuda-tf32). Repeatable.",
            show_default=False,
        ),
    ] = None,
    atol: Annotated[
        list[str] | None,
        typer.Option(
            "--atol",
            help="Absolute tolerance per unit of output scale: atol = VALUE·max(1, max|ref|). "
            "VALUE or KIND=VALUE, repeatable.",
            show_default=False,
        ),
    ] = None,
    tf32_gate: Annotated[
        bool, typer.Option("--tf32-gate", help="Let the CUDA-with-TF32 runner fail the check too.")
    ] = False,
    ground_truth: Annotated[
        bool,
        typer.Option("--fp64/--no-fp64", help="Run the float64 PyTorch ground truth (reported)."),
    ] = True,
    folded: Annotated[
        bool, typer.Option("--folded/--no-folded", help="Also check the BN-folded PyTorch model.")
    ] = True,
    json_path: Annotated[
        Path | None,
        typer.Option("--json", help="Write the whole report as JSON.", show_default=False),
    ] = None,
    junit_path: Annotated[
        Path | None,
        typer.Option(
            "--junit", help="Write JUnit XML (one test per runner and batch).", show_default=False
        ),
    ] = None,
    markdown_path: Annotated[
        Path | None,
        typer.Option(
            "--markdown", help="Write a Markdown summary (for a CI job page).", show_default=False
        ),
    ] = None,
) -> None:
    """Compare MODEL.onnx with its PyTorch model on onnxruntime (CPU, and CUDA when it runs)."""
    from bnexport.errors import ParityInputError
    from bnexport.parity import CheckConfig, InputConfig, check_parity
    from bnexport.parity.tolerance import parse_tolerance_overrides

    if against is not None and checkpoint is not None:
        raise ParityInputError("give the checkpoint once: either CHECKPOINT or --against")
    weights = against if against is not None else checkpoint
    if weights is None and model_spec is None:
        raise ParityInputError(
            "nothing to compare with: give --against CHECKPOINT or --model package.module:factory"
        )
    if inputs is not None and data is not None:
        raise ParityInputError("--inputs replaces every generated input; drop --data")

    config = CheckConfig(
        providers=_split(providers, "--providers"),
        opt_levels=_split(opt_levels, "--opt-levels"),
        batch_sizes=_ints(batch_sizes, "--batch-sizes"),
        inputs=InputConfig(
            bundled=bundled,
            data_dir=data,
            data_limit=data_limit,
            inputs_file=inputs,
            random_count=random_count,
            seed=seed,
            edge_cases=edge_cases,
        ),
        save_inputs=save_inputs,
        tolerances=parse_tolerance_overrides(rtol or (), atol or ()),
        tf32_gate=tf32_gate,
        ground_truth=ground_truth,
        folded=folded,
    )
    source = load_model_source(weights, model_spec, input_shape, temperature)
    with parity_progress() as progress:
        report = check_parity(
            model,
            source.model,
            config,
            normalize=source.normalize,
            input_shape=[s.shape for s in source.input_specs],
            reference_name=source.name,
            progress=progress,
            rebuild=source.rebuild,
        )

    if json_path is not None:
        report.write_json(json_path)
    if junit_path is not None:
        report.write_junit(junit_path)
    if markdown_path is not None:
        report.write_markdown(markdown_path)
    render_report(report)
    raise typer.Exit(EXIT_OK if report.passed else EXIT_MISMATCH)


def _split(text: str, flag: str) -> tuple[str, ...]:
    from bnexport.errors import ParityInputError

    items = tuple(p.strip().lower() for p in text.split(",") if p.strip())
    if not items:
        raise ParityInputError(f"{flag} needs at least one value")
    return items


def _ints(text: str, flag: str) -> tuple[int, ...]:
    from bnexport.errors import ParityInputError

    try:
        return tuple(int(p) for p in _split(text, flag))
    except ValueError:
        raise ParityInputError(f"{flag} {text!r} must be comma-separated integers") from None


def render_report(report: Any) -> None:
    """Print a `ParityReport`: the table, the tolerance rule, skipped runners, notes, verdict."""
    from rich.markup import escape

    from bnexport.parity.report import TABLE_COLUMNS, TOLERANCE_NOTE, result_rows

    out = console()
    rows = [[escape(c) for c in row] for r in report.results for row in result_rows(r)]
    title = (
        f"bnexport check {report.model['path']} against {report.reference['name']}: "
        f"{report.inputs['samples']} samples, batch sizes "
        f"{','.join(map(str, report.batch_sizes))}"
    )
    out.print(table(escape(title), TABLE_COLUMNS, rows))
    lines = [TOLERANCE_NOTE]
    lines += [f"skipped {s['runner']}: {s['reason']}" for s in report.skipped]
    lines += [f"note: {n}" for n in [*report.notes, *report.inputs.get("notes", [])]]
    if report.passed:
        lines.append(f"PASS: every gating runner is within tolerance ({report.seconds:.2f} s)")
    else:
        lines.append(f"FAIL: {', '.join(report.failing_runners) or 'no gating runner ran'}")
        lines += [f"  {r.failure_message()}" for r in report.failures]
    for line in lines:
        out.print(line, markup=False, highlight=False)


@contextlib.contextmanager
def parity_progress() -> Iterator[Callable[[str, int, int], None] | None]:
    """A rich progress bar on stderr for the parity check (none when stderr is not a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    err = Console(stderr=True)
    if not err.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("Checking parity: {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("starting", total=None)

        def update(stage_name: str, done: int, total: int) -> None:
            bar.update(task, description=stage_name, completed=done, total=total)

        yield update
