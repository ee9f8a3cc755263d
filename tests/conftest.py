"""Suite-wide test settings."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Piped CLI output is as wide as ``COLUMNS`` says, and pytest-xdist's workers export
    ``COLUMNS=80``: pin the width the CLI tests read (a test that checks a width passes its own),
    for module-scoped fixtures too."""
    os.environ["COLUMNS"] = "200"
