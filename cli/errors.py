"""The CLI's error boundary and exit codes: 0 pass, 1 mismatch (a result), 2 bad input or an
unavailable request (an error), 130 interrupted.

The library never prints and never exits; `handle_errors` turns its errors into one stderr line
and an exit code, and keeps a closed stdout pipe from failing the work. ``--debug`` adds the
traceback above that line and keeps the exit code. A system error (an `OSError`: a name too
long, a full disk) and running out of memory are one line too; "unexpected" is kept for
bnexport's own bugs.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import traceback
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
    """Decorator: any error → one line on stderr (`error_line`), exit 2; ``--debug`` prints the
    traceback first and keeps the exit code.

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
        except Exception as exc:
            if interrupt_in(exc):
                raise interrupted() from None
            if State.debug:  # the traceback, then the same line and the same exit code
                traceback.print_exc(file=sys.stderr)
            raise fail(error_line(exc)) from None
        finally:
            sys.stdout = guard.stream

    return wrapper  # type: ignore[return-value]


def error_line(exc: BaseException) -> str:
    """The one line an exception becomes: a `BnexportError`'s message; a system error naming
    its file and the fix; running out of memory; anything else is a bug ("unexpected")."""
    if isinstance(exc, BnexportError):
        return _one_line(str(exc))
    if isinstance(exc, OSError):
        return os_error_line(exc)
    if is_out_of_memory(exc):
        return (
            f"out of memory ({_one_line(str(exc)) or type(exc).__name__}); ask for less: a "
            "smaller batch size, fewer samples, or a machine with more memory"
        )
    if type(exc).__module__.split(".")[0] == "onnxruntime":  # the library, not bnexport
        return (
            f"onnxruntime failed: {_one_line(str(exc))}; the model cannot run as given (rerun "
            "with --verbose for onnxruntime's log)"
        )
    hint = "" if State.debug else " (rerun with --debug)"
    return f"unexpected {type(exc).__name__}: {_one_line(str(exc))}{hint}"


def os_error_line(exc: OSError) -> str:
    """``cannot use PATH: reason; fix`` for an `OSError` (the file it names, when it names one)."""
    reason = exc.strerror or _one_line(str(exc)) or type(exc).__name__
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    where = f"cannot use {' → '.join(names)}: " if names else ""
    fixes = {
        errno.ENAMETOOLONG: "choose a shorter file name (at most 255 bytes per name)",
        errno.ENOSPC: "free some disk space or write elsewhere",
        errno.EACCES: "choose a path you may read and write",
        errno.EPERM: "choose a path you may read and write",
        errno.EROFS: "choose a path on a writable file system",
        errno.ENOENT: "check the path",
        errno.EISDIR: "give a path to a file",
        errno.ENOTDIR: "check the path",
    }
    fix = fixes.get(exc.errno or 0, "check the path and the disk")
    return f"{where}{reason}; {fix}"


def is_out_of_memory(exc: BaseException) -> bool:
    """A `MemoryError`, or a library's allocation failure (torch's and onnxruntime's)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return any(
        marker in text
        for marker in ("can't allocate memory", "Failed to allocate memory", "std::bad_alloc")
    )


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
