"""Parity checks: does the ONNX model compute what the PyTorch model computes?

``check_parity(onnx_model, reference, config)`` is the one call. It runs the PyTorch model
unfolded in float64 (the truth) and in fp32 on the CPU (the reference: its error against the truth
is this model's noise floor), then every candidate runner — PyTorch folded, onnxruntime CPU at each
graph optimization level, onnxruntime CUDA with ``use_tf32=0`` (and with TF32, reported) when a
probe proves CUDA really runs — over the same inputs at each batch size, and compares each
candidate per output (:mod:`bnexport.parity.compare`) under the noise-relative rule, or fixed
per-kind tolerances against the reference with ``tolerance_mode="fixed"``
(:mod:`bnexport.parity.tolerance`).

The default sample count and batch sizes adapt to the model's cost (:func:`plan_inputs`): its
FLOPs and op calls are counted on one forward, never timed, and the check sized to
``DEFAULT_TIME_BUDGET_S`` nominal seconds, so the same check feeds the same samples anywhere.

Models may have several inputs (fed by ONNX input name; the PyTorch models get them by name or in
the forward's order) and several outputs (a dict's matched by key, others by order). Before any
run, the reference's weights are checked against the ``weights_sha256`` the ONNX model records
(`bnexport.fingerprint`).

A mismatch is a result (``report.passed`` False); bad input raises ``ParityInputError`` (a weights
mismatch ``WeightsMismatchError``); CUDA asked for and not running raises
``ProviderUnavailableError`` — never a silent CPU pass.

The work lives in named modules: :mod:`~bnexport.parity.config` (`CheckConfig`,
`PreparedCheck`), :mod:`~bnexport.parity.prepare` (the model, its runners and the inputs),
:mod:`~bnexport.parity.plan` (input sizing), :mod:`~bnexport.parity.engine` (the one comparison
under the noise rule, also used by `bnexport fold`'s :mod:`~bnexport.parity.program` check and
`bnexport tune`), :mod:`~bnexport.parity.run` (running the runners), :mod:`~bnexport.parity.check`
(the stages in order), ``inputs``, ``compare``, ``tolerance`` and ``report``; this package
re-exports their public names. The runners are `bnexport.runners`', the noise rule
`bnexport.noise`'s.
"""

from __future__ import annotations

from bnexport.parity.check import check_parity, device_info
from bnexport.parity.compare import OutputComparison, compare_output
from bnexport.parity.config import (
    CUDA_OPT_LEVEL,
    DEFAULT_ORT_SPINNING,
    DEFAULT_ORT_THREADS,
    DEFAULT_TIME_BUDGET_S,
    DEFAULT_TORCH_THREADS,
    CheckConfig,
)
from bnexport.parity.engine import Baseline, check_candidate, compare_outputs, measure_baseline
from bnexport.parity.inputs import InputConfig, ParityInputs, load_inputs, save_inputs
from bnexport.parity.plan import (
    MIN_RANDOM_SAMPLES,
    PROBE_SAMPLES,
    build_sized_inputs,
    plan_inputs,
)
from bnexport.parity.prepare import resolve_providers
from bnexport.parity.program import ProgramCheck, check_program
from bnexport.parity.report import ParityReport, RunnerResult
from bnexport.parity.tolerance import DEFAULT_TOLERANCES, Tolerance, parse_tolerance_overrides

__all__ = [
    "CUDA_OPT_LEVEL",
    "DEFAULT_ORT_SPINNING",
    "DEFAULT_ORT_THREADS",
    "DEFAULT_TIME_BUDGET_S",
    "DEFAULT_TOLERANCES",
    "DEFAULT_TORCH_THREADS",
    "MIN_RANDOM_SAMPLES",
    "PROBE_SAMPLES",
    "Baseline",
    "CheckConfig",
    "InputConfig",
    "OutputComparison",
    "ParityInputs",
    "ParityReport",
    "ProgramCheck",
    "RunnerResult",
    "Tolerance",
    "build_sized_inputs",
    "check_candidate",
    "check_parity",
    "check_program",
    "compare_output",
    "compare_outputs",
    "device_info",
    "load_inputs",
    "measure_baseline",
    "parse_tolerance_overrides",
    "plan_inputs",
    "resolve_providers",
    "save_inputs",
]
