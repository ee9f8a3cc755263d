"""The `bnexport` Typer app: global options and command registration.

Each command lives in its own module and does three things: parse options into a typed config,
call one library function, render the result. Heavy imports (torch, onnx, onnxruntime) happen
inside command bodies so `bnexport --help` stays fast.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

from bnexport import __version__
from bnexport.cli import errors


class _Group(TyperGroup):
    """The root command: a usage error (bad option, value or command) is one line on stderr,
    ``bnexport: error: …; see '<command> -h'``, exit 2, instead of Typer's boxed panel."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        errors.State.interrupt_reported = False
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except typer.TyperException as exc:  # Click's errors (Typer vendors Click)
            if type(exc).__name__ != "NoArgsIsHelpError":  # else Typer printed the help already
                typer.echo(f"bnexport: error: {usage_error_line(exc)}", err=True)
            sys.exit(getattr(exc, "exit_code", errors.EXIT_ERROR))
        except typer.Abort as exc:  # Click turns Ctrl-C during parsing into Abort
            if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
                raise errors.interrupted() from None
            typer.echo("bnexport: aborted", err=True)
            sys.exit(1)
        if code == errors.EXIT_INTERRUPTED:  # Typer's silent 130 for a Ctrl-C while parsing
            errors.interrupted()
        sys.exit(code if isinstance(code, int) else 0)  # a command's Exit code, or success


def usage_error_line(exc: typer.TyperException) -> str:
    """Click's message on one line, with where to find the usage when it is a usage error."""
    format_message = getattr(exc, "format_message", None)
    message = " ".join((format_message() if format_message else str(exc)).split())
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return message
    return f"{message} (see '{ctx.command_path} -h')"


app = typer.Typer(
    name="bnexport",
    cls=_Group,
    help="Fold BatchNorm and temperature into PyTorch layers, export to ONNX, prove parity.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's help: paragraphs rewrapped, options wrapped at any width
    add_completion=True,  # --install-completion: choices complete in bash, zsh, fish, PowerShell
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bnexport {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", help="Show the traceback above an error (the exit code stays)."
    ),
) -> None:
    """Fold BatchNorm and temperature into PyTorch layers, export to ONNX, prove parity."""
    from bnexport.ort import show_log

    errors.State.debug = debug
    show_log(False)  # onnxruntime's own lines only with a command's --verbose, every invocation


def _register() -> None:
    """Each command module exposes one `<name>_cli` function: thin Typer glue over the library."""
    from bnexport.cli.bench import bench_cli
    from bnexport.cli.check import check_cli
    from bnexport.cli.fold import fold_cli
    from bnexport.cli.load import load_cli
    from bnexport.cli.onnx import onnx_cli
    from bnexport.cli.package import package_cli
    from bnexport.cli.serve import serve_cli
    from bnexport.cli.train import train_cli
    from bnexport.cli.tune import tune_cli

    for name, func in (
        ("train", train_cli),
        ("fold", fold_cli),
        ("onnx", onnx_cli),
        ("check", check_cli),
        ("bench", bench_cli),
        ("tune", tune_cli),
        ("package", package_cli),
        ("serve", serve_cli),
        ("load", load_cli),
    ):
        # check's extra positionals reach it, to refuse a checkpoint there with the fix
        settings = {"allow_extra_args": True} if name == "check" else None
        app.command(name, context_settings=settings)(func)


_register()


def main() -> None:
    """Console-script entry point."""
    errors.State.console_script = True
    try:
        app()
    finally:
        # The interpreter's exit-time garbage collection would walk every object torch's
        # exporter left alive (≈ 2 s after a resnet50 export); the OS frees the memory anyway.
        gc.freeze()
