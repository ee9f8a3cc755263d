"""Rendering shared by the commands: the stdout console, tables and the small number formats.

Plain output (no colour, no box drawing) when stdout is piped, so a result reads the same in a
file as on a terminal.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

PIPED_WIDTH = 200  # columns of plain output when piped (COLUMNS overrides)


def console() -> Console:
    """stdout console; plain (no colour, no box drawing; COLUMNS or 200 wide) when piped. Never
    turns ``:name:`` into an emoji: a user's path ``o:rocket:.onnx`` is printed as typed."""
    if sys.stdout.isatty():
        return Console(emoji=False)
    width = int(os.environ["COLUMNS"]) if os.environ.get("COLUMNS", "").isdigit() else PIPED_WIDTH
    return Console(no_color=True, width=width, soft_wrap=True, highlight=False, emoji=False)


def table(
    title: str | None,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    whole_words: bool = False,
) -> Table:
    """A rich table: boxed on a terminal, plain aligned columns when piped. ``whole_words``: no
    column is narrower than its longest word (a module path is never broken mid-name; cells wrap
    at spaces and at their own line breaks)."""
    boxed = sys.stdout.isatty()
    kwargs: dict[str, Any] = {} if boxed else {"box": None, "show_edge": False}
    t = Table(title=title, title_justify="left", **kwargs)
    for k, col in enumerate(columns):
        longest = max((len(w) for row in rows for w in str(row[k]).split()), default=0)
        t.add_column(col, overflow="fold", min_width=longest if whole_words else None)
    for row in rows:
        t.add_row(*(str(v) for v in row))
    return t


def wrap(text: str, width: int, first: str = "", rest: str = "  ") -> list[str]:
    """``text`` wrapped at ``width`` columns at spaces (indented ``first``, then ``rest``); its
    own line breaks kept; a word longer than a line (a long path) is never broken."""
    import textwrap

    return [
        line
        for k, para in enumerate(text.split("\n"))
        for line in textwrap.wrap(
            para,
            width,
            initial_indent=first if k == 0 else rest,
            subsequent_indent=rest,
            break_long_words=False,
            break_on_hyphens=False,
        )
        or [""]
    ]


def print_lines(out: Console, lines: Sequence[str]) -> None:
    """Print each line as typed: no markup, no emoji codes, no highlighting, no rewrapping."""
    for line in lines:
        out.print(line, markup=False, emoji=False, highlight=False, soft_wrap=True)


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
