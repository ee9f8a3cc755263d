"""Real torchvision/timm models (marker ``real``).

torchvision must be importable before any test module imports it: on a CPU-only torch build the
index's CUDA torchvision wheel needs its import-time operators stubbed (`tv_compat`; a matching
build is left alone). What was done is printed in the terminal summary, never silently.
"""

from __future__ import annotations

from typing import Any

from real.tv_compat import ensure_torchvision_ops

TORCHVISION_OPS = ensure_torchvision_ops()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(str(TORCHVISION_OPS))
