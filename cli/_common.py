"""Shared CLI plumbing: the error boundary, output rendering and exit codes.

The library never prints and never exits; this module turns its results and errors into text and
exit codes: 0 pass, 1 mismatch (a result), 2 bad input or an unavailable request (an error).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from bnexport.errors import BnexportError

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_ERROR = 2

F = TypeVar("F", bound=Callable[..., Any])


class State:
    """Global options set by the app callback."""

    debug: bool = False


def console() -> Console:
    """stdout console; plain (no colour, no box drawing, wide) when piped."""
    if sys.stdout.isatty():
        return Console()
    return Console(no_color=True, width=200, soft_wrap=True, highlight=False)


def fail(message: str) -> typer.Exit:
    """Print one line on stderr and return the exit to raise (exit 2)."""
    typer.echo(f"bnexport: error: {message}", err=True)
    return typer.Exit(EXIT_ERROR)


def handle_errors(func: F) -> F:
    """Decorator: `BnexportError` → one line on stderr, exit 2; tracebacks only with --debug."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            typer.echo("bnexport: interrupted", err=True)
            raise typer.Exit(130) from None
        except BnexportError as exc:
            if State.debug:
                raise
            raise fail(_one_line(str(exc))) from None
        except Exception as exc:  # a bug or an unexpected library failure
            if State.debug:
                raise
            raise fail(
                f"unexpected {type(exc).__name__}: {_one_line(str(exc))} (rerun with --debug)"
            ) from None

    return wrapper  # type: ignore[return-value]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    """A rich table: boxed on a terminal, plain aligned columns when piped."""
    boxed = sys.stdout.isatty()
    kwargs: dict[str, Any] = {} if boxed else {"box": None, "show_edge": False}
    t = Table(title=title, title_justify="left", **kwargs)
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*(str(v) for v in row))
    return t


# Model selection, shared by fold, onnx, check and bench (same names, same meaning).
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Your own model as package.module:factory (the factory returns an nn.Module).",
        show_default=False,
    ),
]
InputShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        metavar="<shape[:dtype]>",
        help="Input shape without the batch dimension, e.g. 3,32,32, with an optional dtype "
        "(8:int64; default float32). Needed with --model; repeat it once per forward input, in "
        "order.",
        show_default=False,
    ),
]
TemperatureOpt = Annotated[
    float | None,
    typer.Option(
        "--temperature",
        help="Temperature of a seed state dict (default 1.0; bnexport checkpoints record theirs).",
        show_default=False,
    ),
]


def load_model_source(
    checkpoint: Path | None,
    model: str | None,
    input_shapes: list[str] | None,
    temperature: float | None,
) -> Any:
    """Parse the shared model options and load the model (`bnexport.source.load_source`)."""
    from bnexport.source import load_source, parse_input_spec

    specs = [parse_input_spec(text) for text in input_shapes or ()]
    return load_source(
        checkpoint, model_spec=model, input_specs=specs or None, temperature=temperature
    )


def split_names(text: str | None, flag: str) -> tuple[str, ...] | None:
    """``"a,b"`` → ``("a", "b")``; None stays None; empty or repeated names are an error."""
    from bnexport.errors import BnexportError

    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(","))
    if not all(names) or len(set(names)) != len(names):
        raise BnexportError(f"{flag} {text!r} must be distinct, non-empty, comma-separated names")
    return names
