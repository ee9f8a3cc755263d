"""Progress events: what a long library call reports while it works (the CLI renders them).

A leaf, so every command library (bench, tune, parity) reports in one type and the CLI has one
way to draw it. The library never prints; it calls ``progress(ProgressEvent(...))``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    """``done`` of ``total`` steps of ``stage`` (e.g. "setup", "measure", "screen"), and what."""

    stage: str
    done: int
    total: int
    message: str


#: A callback that receives progress events.
Progress = Callable[[ProgressEvent], None]
