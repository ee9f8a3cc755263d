"""Fixtures for the parity tests (from parity_helpers; tests/cli/test_check.py shares them)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from parity_helpers import checkpoint, net, onnx_path  # noqa: F401
