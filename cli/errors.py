"""The CLI's error boundary and exit codes: 0 pass, 1 mismatch (a result), 2 bad input or an
unavailable request (an error), 130 interrupted.

The library never prints and never exits; `handle_errors` turns its errors into one stderr line
and an exit code, and keeps a closed stdout pipe from failing the work.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from bnexport.errors import BnexportError, interrupt_in

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

F = TypeVar("F", bound=Callable[..., Any])


class State:
    """Global options set by the app callback."""

    debug: bool = False
    interrupt_reported: bool = False  # "interrupted" already printed (by `interrupted`)
    console_script: bool = False  # run as the `bnexport` program (`main`), not in-process


def fail(message: str) -> typer.Exit:
    """Print one line on stderr and return the exit to raise (exit 2)."""
    typer.echo(f"bnexport: error: {message}", err=True)
    return typer.Exit(EXIT_ERROR)


def handle_errors(func: F) -> F:
    """Decorator: `BnexportError` → one line on stderr, exit 2; tracebacks only with --debug.

    Ctrl-C (also one a library wrapped in another exception) → ``bnexport: interrupted``, exit
    130. A closed stdout (``bnexport onnx … | head``) drops the rest of the output, not the work:
    the command finishes and its exit code stands.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        guard = ClosedPipeGuard(sys.stdout)
        sys.stdout = guard  # type: ignore[assignment]
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            raise interrupted() from None
        except BnexportError as exc:
            if interrupt_in(exc):
                raise interrupted() from None
            if State.debug:
                raise
            raise fail(_one_line(str(exc))) from None
        except Exception as exc:  # a bug or an unexpected library failure
            if interrupt_in(exc):
                raise interrupted() from None
            if State.debug:
                raise
            raise fail(
                f"unexpected {type(exc).__name__}: {_one_line(str(exc))} (rerun with --debug)"
            ) from None
        finally:
            sys.stdout = guard.stream

    return wrapper  # type: ignore[return-value]


def interrupted() -> typer.Exit:
    """Say so on stderr (once) and return the exit to raise (130)."""
    if not State.interrupt_reported:
        typer.echo("bnexport: interrupted", err=True)
        State.interrupt_reported = True
    return typer.Exit(EXIT_INTERRUPTED)


class ClosedPipeGuard:
    """``sys.stdout`` while a command runs: once the reader has gone (BrokenPipeError), output is
    dropped and the command carries on; the real stdout is pointed at /dev/null so the flush at
    exit cannot fail either."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.closed_pipe = False

    def write(self, text: str) -> int:
        if not self.closed_pipe:
            try:
                return int(self.stream.write(text))
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.closed_pipe:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        self.closed_pipe = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
        except OSError:
            return
        try:
            os.dup2(devnull, self.stream.fileno())
        except (OSError, ValueError, AttributeError):  # no real file descriptor (tests)
            pass
        finally:
            os.close(devnull)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _one_line(text: str) -> str:
    return " ".join(text.split())
