"""The `bnexport` Typer app: global options and command registration.

Each command lives in its own module and does three things: parse options into a typed config,
call one library function, render the result. Heavy imports (torch, onnx, onnxruntime) happen
inside command bodies so `bnexport --help` stays fast.
"""

from __future__ import annotations

import typer

from bnexport import __version__
from bnexport.cli import _common

app = typer.Typer(
    name="bnexport",
    help="Fold BatchNorm and temperature into PyTorch layers, export to ONNX, prove parity.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
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
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    """Fold BatchNorm and temperature into PyTorch layers, export to ONNX, prove parity."""
    _common.State.debug = debug


def _register() -> None:
    """Each command module exposes one `<name>_cli` function: thin Typer glue over the library."""
    from bnexport.cli.bench import bench_cli
    from bnexport.cli.check import check_cli
    from bnexport.cli.fold import fold_cli
    from bnexport.cli.onnx import onnx_cli
    from bnexport.cli.train import train_cli
    from bnexport.cli.tune import tune_cli

    for name, func in (
        ("train", train_cli),
        ("fold", fold_cli),
        ("onnx", onnx_cli),
        ("check", check_cli),
        ("bench", bench_cli),
        ("tune", tune_cli),
    ):
        app.command(name)(func)


_register()


def main() -> None:
    """Console-script entry point."""
    app()
