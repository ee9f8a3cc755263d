"""Defaults and choices the library and the CLI share: one definition each.

This module imports nothing, so the CLI can show them in ``--help`` (and validate options against
them) without loading torch, onnx or onnxruntime.
"""

from __future__ import annotations

#: ONNX default-domain opsets bnexport exports to, as measured by ``scripts/opset_range.py``
#: (torch 2.13's dynamo exporter, onnxscript 0.7.2, onnx 1.23.2, the seed Net folded and
#: unfolded; docs/reference.md, "Opsets"): the exporter writes opset 18 and converts it to the
#: one asked for. It converts to 16 … 28 (onnx 1.23's newest); at 15 an unfolded
#: BatchNormalization cannot be converted, below that nothing can, and above 28 it silently
#: writes 18.
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

#: Seed of the random inputs `bnexport check`, `bench` and `tune` feed.
DEFAULT_SEED = 0
#: Generated integer inputs (parity's and the CLI's example inputs) lie in ``[0, INT_INPUT_HIGH)``:
#: valid indices of any embedding that large.
INT_INPUT_HIGH = 10

#: `bnexport bench`'s and `bnexport tune`'s timing (`bnexport.timing`): warm-up seconds per
#: runner and batch size before any timing; one timing lasts at least ``DEFAULT_MIN_TIME_S`` (many
#: calls at batch 1); idle seconds before each timing: onnxruntime's intra-op workers keep spinning
#: for 20-50 ms after a run (measured here), stealing a core from whatever is timed next, and 50 ms
#: lets them park.
DEFAULT_WARMUP_S = 0.2
DEFAULT_MIN_TIME_S = 0.02
DEFAULT_COOLDOWN_S = 0.05

#: `bnexport check`: the batch sizes a default check runs onnxruntime at (the last one goes for a
#: model too slow for the time budget, `bnexport.parity.plan`).
DEFAULT_CHECK_BATCH_SIZES: tuple[int, ...] = (1, 7, 64)

#: `bnexport bench`: the batch sizes (1 is the latency one), timed rounds per batch size, and the
#: fp32 peak probe (two ``n × n`` float32 matrices multiplied, best of the repeats).
DEFAULT_BENCH_BATCH_SIZES: tuple[int, ...] = (1, 64, 256)
DEFAULT_BENCH_REPEATS = 31
DEFAULT_PEAK_N = 1024
DEFAULT_PEAK_REPEATS = 5

#: `bnexport tune`: the batch size tuned for, the seconds of timing the screen and confirm stages
#: are sized to fit (setup and parity come on top), the most rounds of each stage, and how many
#: screened settings are confirmed.
DEFAULT_TUNE_BATCH_SIZE = 1
DEFAULT_TUNE_BUDGET_S = 90.0
DEFAULT_SCREEN_REPEATS = 9
DEFAULT_CONFIRM_REPEATS = 31
DEFAULT_FINALISTS = 3

#: torch devices `bnexport train` runs on: ``auto`` is CUDA when torch sees a GPU, else the CPU.
DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DEFAULT_DEVICE = "auto"


#: Reports on the terminal (fold, parity, localization, export lines) are at most this many
#: columns wide, or the terminal's width when it is narrower.
REPORT_WIDTH = 100


def opset_problem(opset: int) -> str | None:
    """Why `opset` cannot be exported to, naming the supported range; None when it can."""
    if OPSET_MIN <= opset <= OPSET_MAX:
        return None
    return (
        f"opset {opset} is outside the opsets bnexport exports to ({OPSET_MIN} to {OPSET_MAX}); "
        f"use {OPSET_MIN if opset < OPSET_MIN else OPSET_MAX}, or the default {DEFAULT_OPSET}"
    )
