"""Defaults and choices the library and the CLI share: one definition each.

This module imports nothing, so the CLI can show them in ``--help`` (and validate options against
them) without loading torch, onnx or onnxruntime.
"""

from __future__ import annotations

#: ONNX default-domain opsets bnexport exports to, as measured by ``scripts/opset_range.py``
#: (torch 2.13's dynamo exporter, onnxscript 0.7.2, onnx 1.23.2, the seed Net folded and
#: unfolded; README "Opsets"): the exporter writes opset 18 and converts it to the one asked for.
#: It converts to 16 … 28 (onnx 1.23's newest); at 15 an unfolded BatchNormalization cannot be
#: converted, below that nothing can, and above 28 it silently writes 18.
OPSET_MIN = 16
OPSET_MAX = 28
DEFAULT_OPSET = 20

#: onnxruntime providers a parity check may ask for: ``auto`` is CPU plus CUDA when a probe
#: proves it runs; ``cuda`` demands it (never a silent CPU fallback).
PROVIDER_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DEFAULT_PROVIDERS: tuple[str, ...] = ("auto",)

#: onnxruntime graph optimization levels, weakest first; a check runs the CPU provider at each of
#: ``DEFAULT_OPT_LEVELS``.
OPT_LEVELS: tuple[str, ...] = ("disabled", "basic", "extended", "all")
DEFAULT_OPT_LEVELS: tuple[str, ...] = ("disabled", "all")

#: How a parity check decides (`bnexport.parity.tolerance`): ``noise`` is relative to fp32's own
#: error against the float64 truth, ``fixed`` is per-kind rtol/atol against fp32.
TOLERANCE_MODES: tuple[str, ...] = ("noise", "fixed")
DEFAULT_TOLERANCE_MODE = "noise"

#: `bnexport train`'s tuned defaults (models/net.md): `bnexport.train.TrainConfig` and the CLI's.
DEFAULT_EPOCHS = 12
DEFAULT_TRAIN_BATCH_SIZE = 128
DEFAULT_LR = 2e-3
DEFAULT_WEIGHT_DECAY = 5e-2
DEFAULT_TRAIN_SEED = 0
DEFAULT_TEMPERATURE = 1.0

#: torch devices `bnexport train` runs on: ``auto`` is CUDA when torch sees a GPU, else the CPU.
DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DEFAULT_DEVICE = "auto"


def opset_problem(opset: int) -> str | None:
    """Why `opset` cannot be exported to, naming the supported range; None when it can."""
    if OPSET_MIN <= opset <= OPSET_MAX:
        return None
    return (
        f"opset {opset} is outside the opsets bnexport exports to ({OPSET_MIN} to {OPSET_MAX}); "
        f"use {OPSET_MIN if opset < OPSET_MIN else OPSET_MAX}, or the default {DEFAULT_OPSET}"
    )
