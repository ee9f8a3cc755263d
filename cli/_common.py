"""Shared CLI plumbing: the error boundary, output rendering and exit codes.

The library never prints and never exits; this module turns its results and errors into text and
exit codes: 0 pass, 1 mismatch (a result), 2 bad input or an unavailable request (an error).
"""

from __future__ import annotations

import functools
import gc
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from bnexport import defaults
from bnexport.errors import BnexportError, interrupt_in

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_ERROR = 2

F = TypeVar("F", bound=Callable[..., Any])


class State:
    """Global options set by the app callback."""

    debug: bool = False
    interrupt_reported: bool = False  # "interrupted" already printed (by `interrupted`)
    console_script: bool = False  # run as the `bnexport` program (`main`), not in-process


PIPED_WIDTH = 200  # columns of plain output when piped (COLUMNS overrides)


def console() -> Console:
    """stdout console; plain (no colour, no box drawing; COLUMNS or 200 wide) when piped."""
    if sys.stdout.isatty():
        return Console()
    width = int(os.environ["COLUMNS"]) if os.environ.get("COLUMNS", "").isdigit() else PIPED_WIDTH
    return Console(no_color=True, width=width, soft_wrap=True, highlight=False)


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
        guard = _ClosedPipeGuard(sys.stdout)
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


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def interrupted() -> typer.Exit:
    """Say so on stderr (once) and return the exit to raise (130)."""
    if not State.interrupt_reported:
        typer.echo("bnexport: interrupted", err=True)
        State.interrupt_reported = True
    return typer.Exit(EXIT_INTERRUPTED)


class _ClosedPipeGuard:
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


def duration(seconds: float) -> str:
    """Seconds in µs, ms or s, whichever reads best."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def load_averages(environment: Mapping[str, Any]) -> str:
    """A run's load averages before and after, as ``1.00/0.50/0.25 → 1.20/0.60/0.30`` (``?``
    where the OS gave none)."""

    def text(values: list[float] | None) -> str:
        return "?" if not values else "/".join(f"{v:.2f}" for v in values)

    before = environment.get("load_average_before")
    return f"{text(before)} → {text(environment.get('load_average_after'))}"


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
    source = load_source(
        checkpoint, model_spec=model, input_specs=specs or None, temperature=temperature
    )
    if State.console_script:
        # The imported libraries and the model live until the command ends: frozen, they are
        # not walked again by each of the many full collections torch's exporter triggers
        # (≈ 1 s on resnet50). Only in the program: in-process callers keep normal collection.
        gc.freeze()
    return source


def split_names(text: str | None, flag: str) -> tuple[str, ...] | None:
    """``"a,b"`` → ``("a", "b")``; None stays None; empty or repeated names are an error."""
    from bnexport.errors import BnexportError

    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(","))
    if not all(names) or len(set(names)) != len(names):
        raise BnexportError(f"{flag} {text!r} must be distinct, non-empty, comma-separated names")
    return names


def choices(values: Sequence[str], flag: str, *, multiple: bool = False) -> dict[str, Any]:
    """``typer.Option`` keyword arguments making a ``str`` option one of `values` (or, with
    `multiple`, a comma-separated list of them): a usage error (exit 2) naming the choices, and
    shell completion of each item."""
    shown = ", ".join(values)

    def validate(value: str | None) -> str | None:
        if value is None:
            return None
        items = [item.strip().lower() for item in value.split(",")]
        bad = [item for item in items if item not in values]
        if bad or (not multiple and len(items) != 1):
            what = "one or more, comma-separated, of" if multiple else "one of"
            raise typer.BadParameter(f"{value!r}: choose {what} {shown}", param_hint=flag)
        return ",".join(items)

    def complete(incomplete: str) -> list[str]:
        head, sep, last = incomplete.rpartition(",") if multiple else ("", "", incomplete)
        taken = set(head.split(",")) if sep else set()
        return [head + sep + v for v in values if v.startswith(last.lower()) and v not in taken]

    return {"callback": validate, "autocompletion": complete}


# Parity options, shared by check and onnx (same names, same meaning; CheckConfig's fields).
DEFAULT_PROVIDERS = ",".join(defaults.DEFAULT_PROVIDERS)
DEFAULT_OPT_LEVELS = ",".join(defaults.DEFAULT_OPT_LEVELS)
DEFAULT_TOLERANCE = defaults.DEFAULT_TOLERANCE_MODE
#: bench's and tune's timing (`bnexport.bench.timing`); defaults in `bnexport.defaults`.
MinTimeOpt = Annotated[
    float,
    typer.Option("--min-time", help="Seconds one timing lasts at least (many calls if fast)."),
]
WarmupOpt = Annotated[
    float, typer.Option("--warmup", help="Warm-up seconds per candidate (each batch size, stage).")
]
CooldownOpt = Annotated[
    float,
    typer.Option("--cooldown", help="Idle seconds before each timing (spinning threads park)."),
]
ProvidersOpt = Annotated[
    str,
    typer.Option(
        "--providers",
        help="onnxruntime providers: auto (CPU, plus CUDA when a probe proves it runs), cpu, cuda "
        "or cpu,cuda. CUDA asked for and not running is exit 2, never a CPU pass.",
        **choices(defaults.PROVIDER_CHOICES, "--providers", multiple=True),
    ),
]
ToleranceOpt = Annotated[
    str,
    typer.Option(
        "--tolerance",
        help="noise: a runner passes when its error against the float64 truth is within "
        "--noise-factor × PyTorch fp32's own error (docs/parity.md); fixed: --rtol/--atol against "
        "PyTorch fp32.",
    ),
]
NoiseFactorOpt = Annotated[
    float | None,
    typer.Option(
        "--noise-factor",
        help="How many times fp32's own error a runner may err (--tolerance noise; default "
        "measured in docs/parity.md).",
        show_default=False,
    ),
]
RtolOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--rtol",
        help="With --tolerance fixed: relative tolerance, for every runner kind or KIND=VALUE "
        "(kinds: cpu, torch, cuda, cuda-tf32). Repeatable.",
        show_default=False,
    ),
]
AtolOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--atol",
        help="With --tolerance fixed: absolute tolerance per unit of output scale: "
        "atol = VALUE·max(1, max|ref|). VALUE or KIND=VALUE, repeatable.",
        show_default=False,
    ),
]
SamplesOpt = Annotated[
    int | None,
    typer.Option(
        "--samples",
        "--random",
        min=0,
        help="Seeded random samples to feed, with every edge case. Default: 64, fewer for a "
        "model whose forward is slow (the check is sized to a few seconds; the slowest get 2 "
        "with only the zeros and ±large edge cases, and a note says so).",
        show_default=False,
    ),
]
BatchSizesOpt = Annotated[
    str | None,
    typer.Option(
        "--batch-sizes",
        help="onnxruntime batch sizes, comma-separated. Default: 1,7,64, or 1,7 for a slow model.",
        show_default=False,
    ),
]
OptLevelsOpt = Annotated[
    str,
    typer.Option(
        "--opt-levels",
        help="onnxruntime CPU graph optimization levels, comma-separated: "
        f"{', '.join(defaults.OPT_LEVELS)}.",
        **choices(defaults.OPT_LEVELS, "--opt-levels", multiple=True),
    ),
]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose", "-v", help="One parity row per runner, batch size and output (worst element)."
    ),
]


def split_values(text: str, flag: str) -> tuple[str, ...]:
    """``"a, B"`` → ``("a", "b")``; at least one value."""
    from bnexport.errors import ParityInputError

    items = tuple(p.strip().lower() for p in text.split(",") if p.strip())
    if not items:
        raise ParityInputError(f"{flag} needs at least one value")
    return items


def split_ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    """``"1,7"`` → ``(1, 7)``; None stays None."""
    from bnexport.errors import ParityInputError

    if text is None:
        return None
    try:
        return tuple(int(p) for p in split_values(text, flag))
    except ValueError:
        raise ParityInputError(f"{flag} {text!r} must be comma-separated integers") from None


def tolerance_config(
    tolerance: str, noise_factor: float | None, rtol: list[str] | None, atol: list[str] | None
) -> dict[str, Any]:
    """``CheckConfig`` keyword arguments for the tolerance options."""
    from bnexport.parity.tolerance import NoiseTolerance, parse_tolerance_overrides

    mode = tolerance.strip().lower()
    out: dict[str, Any] = {
        "tolerance_mode": mode,
        "tolerances": parse_tolerance_overrides(rtol or (), atol or ()),
    }
    if noise_factor is not None:
        if mode != "noise":
            from bnexport.errors import ParityInputError

            raise ParityInputError(
                "--noise-factor sets the noise-relative rule: drop --tolerance fixed"
            )
        out["noise_tolerance"] = NoiseTolerance(factor=noise_factor)
    return out
