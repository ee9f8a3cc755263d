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
