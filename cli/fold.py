"""`bnexport fold`: fold BatchNorm (and temperature) into the layers, save a `torch.export` program.

Thin glue: load the model (`bnexport.source`), fold it (`bnexport.fold`), save the program and check
it against the unfolded model (`bnexport.export`), then render the results and pick the exit code.
The fold report table and the model loading are shared with `bnexport onnx`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from bnexport.cli.errors import EXIT_MISMATCH, EXIT_OK, handle_errors
from bnexport.cli.options import (
    InputShapeOpt,
    KeepFailedOpt,
    ModelOpt,
    TemperatureOpt,
    load_model_source,
)
from bnexport.cli.render import console, print_lines, table, wrap
from bnexport.defaults import REPORT_WIDTH

# Options shared with `bnexport onnx` (same names, same meaning).
CheckpointArg = Annotated[
    Path | None,
    typer.Argument(
        help="Checkpoint: a bnexport .pt, a seed state dict, or your model's state_dict "
        "(optional with --model).",
        show_default=False,
    ),
]
ReportJsonOpt = Annotated[
    Path | None,
    typer.Option(
        "--report-json",
        help="Also write the whole report (source, fold, file, parity) as JSON to this path.",
        show_default=False,
    ),
]
StrictOpt = Annotated[
    bool,
    typer.Option("--strict", help="Exit 1 and write nothing if any BatchNorm is left unfolded."),
]
NoVerifyOpt = Annotated[
    bool,
    typer.Option(
        "--no-verify",
        help="Skip the fold's float64 self-check (folded vs unfolded must agree to float64 "
        "rounding); for models that are random in eval mode. Reported in the output.",
    ),
]
LocalizeOpt = Annotated[
    bool,
    typer.Option(
        "--localize",
        help="Compare every fold step with the unfolded model in float64 and name the first "
        "whose output diverges (done anyway when the self-check fails).",
    ),
]


@handle_errors
def fold_cli(
    checkpoint: CheckpointArg = None,
    output: Annotated[
        Path,
        typer.Option("-o", "--output", help="Where to write the .pt2 program.", show_default=False),
    ] = ...,  # type: ignore[assignment]
    model: ModelOpt = None,
    input_shape: InputShapeOpt = None,
    temperature: TemperatureOpt = None,
    report_json: ReportJsonOpt = None,
    strict: StrictOpt = False,
    no_verify: NoVerifyOpt = False,
    localize: LocalizeOpt = False,
    keep_failed: KeepFailedOpt = False,
) -> None:
    """Fold BatchNorm and temperature into the layers; save a torch.export program (.pt2).

    The program is self-contained: torch.export.load reads it where bnexport is not installed.

    Prints the fold report and the saved program's parity with the unfolded model.

    Exit 0: parity holds; 1: mismatch (nothing left at -o; --keep-failed keeps the program as
    NAME.failed.pt2), or a BatchNorm left with --strict (nothing written); 2: bad input.
    """
    from bnexport.files import check_output_paths, discard, failed_path, write_json

    failed = failed_path(output) if keep_failed else None
    outputs = {"-o": output, "--report-json": report_json, "--keep-failed": failed}
    check_output_paths(outputs, [checkpoint])
    from bnexport.export import save_program
    from bnexport.parity.program import check_program

    out = console()
    with stage("Loading the model"):
        source = load_model_source(checkpoint, model, input_shape, temperature)
    try:
        folded = fold_and_report(out, source, no_verify, strict, localize=localize)
    except typer.Exit:  # --strict: a BatchNorm left, exit 1: nothing at -o
        discard(output)
        raise

    with removed_on_error(output):
        with stage("Saving the torch.export program"):
            program = save_program(folded.module, source.example_inputs, output)
        with stage("Checking the saved program"):
            check = check_program(
                output,
                source.model,
                input_shape=[s.shape for s in source.input_specs],
                input_dtypes=[s.dtype for s in source.input_specs],
                output_names=source.output_names,
                normalize=source.normalize,
            )
        if report_json is not None:
            write_json(
                report_json,
                {
                    "command": "fold",
                    "source": source_summary(source),
                    "fold": folded.report.to_dict(),
                    "program": program.to_dict(),
                    "parity": check.to_dict(),
                },
            )
    wrote = (
        f"Wrote {program.path} ({program.size_bytes / 1e6:.2f} MB, sha256 {program.sha256[:16]}…, "
        f"{program.num_nodes} aten ops, dynamic batch); load it with "
        "torch.export.load(path).module()"
    )
    print_lines(out, wrap(wrote, _width(out)))
    render_program_check(out, check)
    if not check.passed:
        settle_failed_file(out, output, keep_failed)
    raise typer.Exit(EXIT_OK if check.passed else EXIT_MISMATCH)


def _width(out: Console) -> int:
    return min(out.width, REPORT_WIDTH)


def fold_and_report(
    out: Console, source: Any, no_verify: bool, strict: bool, *, localize: bool = False
) -> Any:
    """Fold the source's model and print the source and the fold report; exit 1 under --strict
    when a BatchNorm is left (for `fold` and `onnx`)."""
    from bnexport.fold import fold_model

    with stage("Folding BatchNorm"):
        folded = fold_model(
            source.model, source.example_inputs, verify=not no_verify, localize=localize
        )
    render_source(out, source)
    render_fold_report(out, folded.report)
    if strict and refuse_unfolded(out, folded.report):
        raise typer.Exit(EXIT_MISMATCH)
    return folded


def source_summary(source: Any) -> dict[str, Any]:
    """The model source as JSON-ready data (for --report-json)."""
    return {
        "name": source.name,
        "sha256": source.sha256,
        "is_net": source.is_net,
        "inputs": [
            {"name": n, "shape": list(s.shape), "dtype": s.dtype}
            for n, s in zip(source.input_names, source.input_specs, strict=True)
        ],
        "temperature": source.temperature,
        "normalize": source.normalize.to_dict() if source.normalize is not None else None,
        "notes": list(getattr(source, "notes", [])),
    }


def render_source(out: Console, source: Any) -> None:
    """One line naming the model, then its notes (e.g. where a seed's temperature came from)."""
    inputs = ", ".join(
        f"{n} {s.describe()}" for n, s in zip(source.input_names, source.input_specs, strict=True)
    )
    parts = [f"Model: {source.name}", f"input{'s' if len(source.input_specs) > 1 else ''} {inputs}"]
    if source.temperature is not None:
        parts.append(f"temperature {source.temperature:g}")
    if source.sha256:
        parts.append(f"sha256 {source.sha256[:16]}…")
    width = _width(out)
    lines = wrap(", ".join(parts), width)
    lines += [w for note in getattr(source, "notes", []) for w in wrap(note, width, "  note: ")]
    print_lines(out, lines)


def render_fold_report(out: Console, report: Any) -> None:
    """The fold report (`bnexport.fold.tables`) at most `REPORT_WIDTH` columns wide: a row per
    BatchNorm (alike ones grouped when there are many), module paths never broken; then why each
    was left, the scale/shift chains without a BatchNorm, the self-check, the localization and
    the notes, wrapped."""
    from bnexport.fold.tables import REPORT_COLUMNS, footer_lines, report_rows, title

    width = _width(out)
    rows, lines = report_rows(report)
    if rows:
        cells = [[escape(c) for c in row] for row in rows]
        grid = table(None, REPORT_COLUMNS, cells, whole_words=True)
        print_lines(out, wrap(title(report), width))
        out.print(grid, width=width)
    else:
        print_lines(out, wrap(f"{title(report)}: nothing to fold", width))
    lines += footer_lines(report)
    print_lines(out, [w for line in lines for w in wrap(line, width, "  ", "    ")])


def refuse_unfolded(out: Console, report: Any) -> bool:
    """--strict: True (after saying so) when any BatchNorm is left."""
    if not report.left:
        return False
    names = ", ".join(e.bn for e in report.left)
    text = (
        f"--strict: {len(report.left)} BatchNorm layer(s) left unfolded ({names}); no file written"
    )
    print_lines(out, wrap(text, _width(out)))
    return True


def render_program_check(out: Console, check: Any) -> None:
    """The saved program vs the unfolded model: one row per output, and the verdict. Under the
    noise rule the error is against the float64 truth, as a multiple of PyTorch fp32's own."""
    rows = []
    for o in check.outputs:
        ratio = o.noise_ratio
        rows.append(
            [
                escape(o.name),
                str(check.samples),
                f"{o.rel_err if o.error is None else o.error:.2g}",
                "-" if ratio is None else f"{ratio:.2g}×",
                o.tolerance.short(),
                "-" if o.argmax_agreement is None else f"{o.argmax_agreement:.0%}",
                "PASS" if o.passed else "FAIL",
            ]
        )
    width = _width(out)
    out.print(
        table(
            "Saved program vs unfolded model (PyTorch, CPU)",
            ["output", "samples", "error", "error/floor", "limit", "argmax", "result"],
            rows,
        ),
        width=width,
    )
    sets = ", ".join(f"{s['name']} ({s['samples']})" for s in check.inputs.get("sets", []))
    lines = [f"Inputs: {sets}"]
    for o in check.outputs:
        if o.passed:
            continue
        worst = o.worst.describe() if o.worst else "-"
        if o.noise_ratio is not None and o.limit is not None:
            why = (
                f"error {o.error:.3g} of the output scale against float64 is "
                f"{o.noise_ratio:.3g}× PyTorch fp32's own error {o.floor:.3g} (limit "
                f"{o.tolerance.short()})"
            )
        else:
            why = (
                f"{o.violations} of {o.elements} elements outside {o.tolerance}; would pass with "
                f"atol {o.min_atol_scale:.3g} or rtol {o.min_rtol:.3g}"
            )
        lines.append(f"Mismatch in {o.name!r}: {why}; worst: {worst}")
    lines.append("Parity: PASS" if check.passed else "Parity: FAIL")
    print_lines(out, [w for line in lines for w in wrap(line, width)])


@contextlib.contextmanager
def stage(description: str) -> Iterator[None]:
    """A spinner on stderr while a slow step runs (nothing when stderr is not a terminal)."""
    err = Console(stderr=True)
    if not err.is_terminal:
        yield
        return
    with err.status(f"{description}…"):
        yield


def settle_failed_file(out: Console, output: Path, keep_failed: bool) -> None:
    """A file whose parity check failed is not left at -o: removed, or with --keep-failed moved
    to NAME.failed.SUFFIX (`bnexport.files.settle_failed`; the rule in docs/reference.md)."""
    from bnexport.files import settle_failed

    kept = settle_failed(output, keep_failed)
    where = f"kept as {kept} (--keep-failed)" if kept else "removed (--keep-failed keeps it)"
    out.print(f"Parity failed: {output} {where}", markup=False, highlight=False)


@contextlib.contextmanager
def removed_on_error(path: Path) -> Iterator[None]:
    """Delete `path` if the block fails after writing it: an error exit or Ctrl-C leaves no
    unverified output file behind. A file the block did not replace (same inode as before) stays:
    an export that fails before writing must not delete the user's earlier file."""
    before = _file_id(path)
    try:
        yield
    except BaseException as exc:
        ok_exit = isinstance(exc, typer.Exit) and exc.exit_code in (EXIT_OK, EXIT_MISMATCH)
        if not ok_exit and _file_id(path) not in (None, before):
            Path(path).unlink(missing_ok=True)
        raise


def _file_id(path: Path) -> tuple[int, int, int] | None:
    """(device, inode, mtime) of `path`, or None when it does not exist."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns
