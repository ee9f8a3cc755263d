"""Fold BatchNorm — with temperature and any constant scale/shift chain after it — into the adjacent
Conv/ConvTranspose/Linear layer of any traceable PyTorch model, and report every BatchNorm.

``fold_model(model, example_inputs)`` (`bnexport.fold.pipeline`) copies the model (its modules; the
Parameters it keeps are copied at the end, the folded ones are new), traces it with torch.fx
(`bnexport.fold.trace`), propagates shapes with the example inputs, applies the patterns of
`bnexport.fold.patterns` by rewriting *nodes* (a shared module is never mutated), checks the fold
(:func:`self_check`), and returns ``FoldResult(module, report)``. Math: `bnexport.fold.math`.

**Self-check** (`bnexport.fold.verify`). Folding is exact algebra, so the folded graph, run in
float64 with the fold's own float64 parameters, must agree with the unfolded model in float64 to
what float64 rounding explains on this model, measured: the model's own fp32 error and, when that
alone would fail the fold, its sensitivity to ±eps changes of its inputs and parameters. A fold step
that fails it is localized (`bnexport.fold.localize`) and left unfolded with the reason.
"""

from __future__ import annotations

from bnexport.fold.batchnorm import BNParams, register_batchnorm
from bnexport.fold.localize import Localization, StepCheck
from bnexport.fold.patterns import PATTERNS
from bnexport.fold.pipeline import FoldResult, fold_model
from bnexport.fold.report import REASONS, ChainEntry, FoldEntry, FoldReport
from bnexport.fold.rules import Pattern, Rule
from bnexport.fold.verify import self_check

__all__ = [
    "PATTERNS",
    "REASONS",
    "BNParams",
    "ChainEntry",
    "FoldEntry",
    "FoldReport",
    "FoldResult",
    "Localization",
    "Pattern",
    "Rule",
    "StepCheck",
    "fold_model",
    "register_batchnorm",
    "self_check",
]
