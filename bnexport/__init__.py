"""bnexport: fold BatchNorm and temperature into PyTorch layers, export to ONNX, prove parity.

Importing this package stays light (no torch): the public functions are loaded on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "fold_model": "bnexport.fold",
    "FoldResult": "bnexport.fold",
    "Net": "bnexport.nets",
    "TemperatureBatchNorm2d": "bnexport.nets",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bnexport' has no attribute {name!r}")
