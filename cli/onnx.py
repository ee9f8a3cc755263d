"""`bnexport onnx`: fold (by default), export one self-contained ONNX file, check its parity.

Thin glue over `bnexport.source`, `bnexport.fold`, `bnexport.export` and `bnexport.parity`; the fold
report table and the model options are `bnexport fold`'s, the parity table is `bnexport check`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from bnexport.cli.check import check_check_memory
from bnexport.cli.errors import EXIT_MISMATCH, EXIT_OK, handle_errors
from bnexport.cli.fold import (
    CheckpointArg,
    NoVerifyOpt,
    ReportJsonOpt,
    StrictOpt,
    fold_and_report,
    removed_on_error,
    render_source,
    settle_failed_file,
    source_summary,
    stage,
)
from bnexport.cli.options import (
    DEFAULT_OPT_LEVELS,
    DEFAULT_PROVIDERS,
    DEFAULT_TOLERANCE,
    AtolOpt,
    BatchSizesOpt,
    InputShapeOpt,
    KeepFailedOpt,
    ModelOpt,
    NoiseFactorOpt,
    OptLevelsOpt,
    ProvidersOpt,
    RtolOpt,
    SamplesOpt,
    TemperatureOpt,
    ToleranceOpt,
    VerboseOpt,
    load_model_source,
    split_ints,
    split_names,
    split_values,
    tolerance_config,
)
from bnexport.cli.parity_report import render_report
from bnexport.cli.progress import parity_progress
from bnexport.cli.render import console, print_lines, table, wrap
from bnexport.defaults import DEFAULT_OPSET, OPSET_MAX, OPSET_MIN, REPORT_WIDTH, opset_problem


def _valid_opset(opset: int) -> int:
    """``--opset`` within the measured range (`bnexport.defaults`), else a usage error (exit 2)."""
    problem = opset_problem(opset)
    if problem is not None:
        raise typer.BadParameter(problem, param_hint="--opset")
    return opset


@handle_errors
def onnx_cli(
    checkpoint: CheckpointArg = None,
    output: Annotated[
        Path,
        typer.Option("-o", "--output", help="Where to write the .onnx file.", show_default=False),
    ] = ...,  # type: ignore[assignment]
    no_fold: Annotated[
        bool,
        typer.Option("--no-fold", help="Export the model as it is (BatchNorm and all)."),
    ] = False,
    opset: Annotated[
        int,
        typer.Option(
            "--opset",
            help=f"ONNX opset (default-domain) to export to: {OPSET_MIN} to {OPSET_MAX}, the "
            "range measured to export (docs/reference.md, Opsets).",
            callback=_valid_opset,
        ),
    ] = DEFAULT_OPSET,
    no_check: Annotated[
        bool,
        typer.Option("--no-check", help="Skip the parity check on onnxruntime."),
    ] = False,
    providers: ProvidersOpt = DEFAULT_PROVIDERS,
    model: ModelOpt = None,
    input_shape: InputShapeOpt = None,
    temperature: TemperatureOpt = None,
    output_names: Annotated[
        str | None,
        typer.Option(
            "--output-names",
            help="ONNX output names, comma-separated, in output order (default: logits for the "
            "seed Net; a dict's keys; output for one tensor; output_0, output_1, … otherwise).",
            show_default=False,
        ),
    ] = None,
    report_json: ReportJsonOpt = None,
    strict: StrictOpt = False,
    no_verify: NoVerifyOpt = False,
    tolerance: ToleranceOpt = DEFAULT_TOLERANCE,
    noise_factor: NoiseFactorOpt = None,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    samples: SamplesOpt = None,
    batch_sizes: BatchSizesOpt = None,
    opt_levels: OptLevelsOpt = DEFAULT_OPT_LEVELS,
    verbose: VerboseOpt = False,
    keep_failed: KeepFailedOpt = False,
) -> None:
    """Fold BatchNorm and temperature, export one self-contained ONNX file, check its parity.

    The seed Net's file takes `input` and gives `logits`; a --model's inputs are its forward's
    parameter names. Every input and output has a dynamic first dimension named batch.

    It passes onnx.checker's full check, records its provenance in metadata_props, and is
    reproducible: the same model gives the same bytes.

    Then (unless --no-check) it runs `bnexport check` against the unfolded model.

    Exit 0: parity holds; 1: mismatch (nothing left at -o; --keep-failed keeps the file as
    NAME.failed.onnx), or with --strict a BatchNormalization left in the file's graph (--strict
    judges the file: a BatchNorm the fold left and the exporter fused passes); 2: bad input.
    """
    from bnexport.errors import BnexportError
    from bnexport.files import check_output_paths, failed_path
    from bnexport.ort import show_log

    show_log(verbose)
    failed = failed_path(output) if keep_failed else None
    outputs = {"-o": output, "--report-json": report_json, "--keep-failed": failed}
    check_output_paths(outputs, [checkpoint])
    if no_fold and strict:
        raise BnexportError("--strict needs folding; drop --no-fold or --strict")
    out_names = split_names(output_names, "--output-names")
    config = None
    if not no_check:
        config = _parity_config(
            providers,
            opt_levels,
            batch_sizes,
            samples,
            tolerance,
            noise_factor,
            rtol,
            atol,
            folded=not no_fold,  # no folded runner for --no-fold
        )

    out = console()
    with stage("Loading the model"):
        source = load_model_source(checkpoint, model, input_shape, temperature)
    if config is not None:
        check_check_memory(source, config)
    folded = None
    if no_fold:
        render_source(out, source)
        out.print("Not folded (--no-fold): the model is exported as it is.")
    else:
        folded = fold_and_report(out, source, no_verify, strict=False)  # --strict: the file
    with removed_on_error(output):
        with stage("Exporting to ONNX"):
            exported = _export(source, folded, output, out_names, opset)
        render_export(out, exported)
        if strict:
            _strict(out, folded.report, exported, output)
        parity = None if config is None else _check(source, folded, output, config)
        if report_json is not None:
            _write_report(report_json, source, folded, exported, parity)
    if parity is None:
        out.print("Parity check skipped (--no-check).")
        raise typer.Exit(EXIT_OK)
    render_report(parity, verbose=verbose)  # `bnexport check`'s rendering: the same table
    if not parity.passed:
        settle_failed_file(out, output, keep_failed)
    raise typer.Exit(EXIT_OK if parity.passed else EXIT_MISMATCH)


def _strict(out: Console, report: Any, exported: Any, output: Path) -> None:
    """--strict judges the file's graph: exit 1 (the file removed) when it keeps a
    BatchNormalization; say so when the exporter fused BatchNorms the fold left."""
    kept = exported.op_counts.get("BatchNormalization", 0)
    left = [e.bn for e in report.left]
    names = ", ".join(left[:3]) + (f", … ({len(left)} in all)" if len(left) > 3 else "")
    if kept:
        output.unlink(missing_ok=True)
        out.print(
            f"--strict judges the file's graph: it keeps {kept} BatchNormalization node(s) (the "
            f"fold left {names or 'none'}); no file written",
            markup=False,
            emoji=False,
            highlight=False,
        )
        raise typer.Exit(EXIT_MISMATCH)
    if left:
        out.print(
            f"--strict judges the file's graph, which has no BatchNormalization: the exporter "
            f"fused the BatchNorm(s) the fold left ({names})",
            markup=False,
            emoji=False,
            highlight=False,
        )


def _parity_config(
    providers: str,
    opt_levels: str,
    batch_sizes: str | None,
    samples: int | None,
    tolerance: str,
    noise_factor: float | None,
    rtol: list[str] | None,
    atol: list[str] | None,
    *,
    folded: bool,
) -> Any:
    """The parity step's `CheckConfig`; CUDA asked for and not running fails here, before any
    work."""
    from bnexport.parity import CheckConfig, resolve_providers

    config = CheckConfig(
        providers=split_values(providers, "--providers"),
        opt_levels=split_values(opt_levels, "--opt-levels"),
        batch_sizes=split_ints(batch_sizes, "--batch-sizes"),
        samples=samples,
        **tolerance_config(tolerance, noise_factor, rtol, atol),
        folded=folded,
    )
    resolve_providers(config)
    return config


def _export(
    source: Any, folded: Any, output: Path, out_names: tuple[str, ...] | None, opset: int
) -> Any:
    """Export the folded module (or, with --no-fold, the model as it is) with its metadata."""
    from bnexport.export import build_metadata, export_onnx

    return export_onnx(
        folded.module if folded is not None else source.model,
        source.example_inputs,
        output,
        input_names=source.input_names,
        output_names=out_names or source.output_names,
        opset=opset,
        metadata=build_metadata(source, folded.report if folded is not None else None),
        fuse_batchnorm=folded is not None,
    )


def _check(source: Any, folded: Any, output: Path, config: Any) -> Any:
    """`bnexport check`'s parity run of the written file against the unfolded model."""
    from bnexport.parity import check_parity

    with parity_progress() as progress:
        return check_parity(
            output,
            source.model,
            config,
            normalize=source.normalize,
            input_shape=[s.shape for s in source.input_specs],
            folded=folded.module if folded is not None else None,
            reference_name=source.name,
            progress=progress,
        )


def _write_report(path: Path, source: Any, folded: Any, exported: Any, parity: Any) -> None:
    from bnexport.files import write_json

    write_json(
        path,
        {
            "command": "onnx",
            "source": source_summary(source),
            "fold": folded.report.to_dict() if folded is not None else None,
            "export": exported.to_dict(),
            "parity": parity.to_dict() if parity is not None else None,
        },
    )


def render_export(out: Console, exported: Any) -> None:
    """Where the file went, its graph's op counts, and the recorded metadata (at most 100 columns,
    user text as typed)."""
    width = min(out.width, REPORT_WIDTH)
    lines = wrap(
        f"Wrote {exported.path} ({exported.size_bytes / 1e6:.2f} MB, opset {exported.opset}, "
        f"sha256 {exported.sha256[:16]}…): {', '.join(exported.input_names)} [batch, …] → "
        f"{', '.join(exported.output_names)} [batch, …]; one file, onnx.checker full check "
        "passed",
        width,
    )
    n = exported.bn_fused_by_onnxscript
    if n:
        lines.append(
            f"onnxscript fused {n} BatchNormalization node{'' if n == 1 else 's'} bnexport's fold "
            "left"
        )
    print_lines(out, lines)
    out.print(
        table(
            f"ONNX graph: {exported.num_nodes} nodes",
            ["op", "count"],
            [[escape(op), n] for op, n in exported.op_counts.items()],
        )
    )
    meta = ", ".join(f"{k}={_short(v)}" for k, v in exported.metadata.items())
    print_lines(out, wrap(f"metadata_props: {meta}", width))


def _short(value: str) -> str:
    """A metadata value for the terminal: lists as their length, long hashes cut to 12 hex digits
    (`--report-json` and the file itself hold them whole)."""
    if value.startswith(("[", "{")) and len(value) > 40:
        try:
            items = json.loads(value)
        except ValueError:
            return value
        if isinstance(items, dict):
            items = items.get("outputs", items)  # the module_outputs table: its rows
        return f"[{len(items)} item{'' if len(items) == 1 else 's'}]"
    if len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"
    return value
