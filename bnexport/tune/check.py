"""The tuned file's outputs against the input model's, under `check`'s noise-relative rule.

An arbitrary ONNX file has no float64 model, so the *truth* is the input run as written (graph
optimizations disabled) and the *reference* (fp32's own error) the input under onnxruntime's
defaults; the tuned file, opened as its user opens it (`bnexport.tune.sessions.tuned_session`),
is the candidate. The comparison is the parity engine's (`bnexport.parity.engine.check_candidate`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnexport.ort_config import OrtSettings
from bnexport.tune.config import ParityResult, TuneConfig
from bnexport.tune.inputs import ModelInput, make_feeds
from bnexport.tune.sessions import settings_session, tuned_session

if TYPE_CHECKING:
    from bnexport.parity import OutputComparison, ParityInputs

PARITY_MIN_SAMPLES = 16  # parity feeds at least this many samples, in batches of the target size


def check_outputs(
    tuned: Path, untuned: Path, reference: Any, inputs: Sequence[ModelInput], config: TuneConfig
) -> ParityResult:
    """The tuned file (opened with what it carries) vs the input model, `check`'s noise rule.

    Truth: the model as written (graph optimizations disabled); reference: onnxruntime's
    defaults (fp32's own error is ``N`` = reference vs truth, at the tuned batch size only);
    candidate error ``E`` against the truth; pass ⇔ ``E ≤ factor · max(N, floor_ulps · eps)`` per
    output (`bnexport.noise.NoiseTolerance`). The worst output is the result.
    """
    from bnexport.noise import NoiseTolerance
    from bnexport.parity.engine import check_candidate
    from bnexport.runners import OnnxRuntimeRunner

    count = max(PARITY_MIN_SAMPLES, config.batch_size)
    count = math.ceil(count / config.batch_size) * config.batch_size
    samples = _samples(inputs, count, config.seed + 1)
    truth_session = settings_session(
        untuned, OrtSettings(graph_optimization_level="disabled"), config.provider
    )
    comparisons = check_candidate(
        OnnxRuntimeRunner.wrap(tuned_session(tuned, config.provider), name="tuned"),
        OnnxRuntimeRunner.wrap(reference, name="reference"),
        OnnxRuntimeRunner.wrap(truth_session, name="truth"),
        samples,
        config.batch_size,
        tolerance=NoiseTolerance(),
        noise_batches=(),  # onnxruntime's defaults at the tuned batch size are the reference
        fail=None,
    )
    return _worst([_result(c, count) for c in comparisons])


def _samples(inputs: Sequence[ModelInput], count: int, seed: int) -> ParityInputs:
    """``count`` seeded random samples per input, as the engine feeds them."""
    import numpy as np

    from bnexport.parity import ParityInputs
    from bnexport.parity.inputs import InputSet
    from bnexport.signature import TensorSpec

    specs = tuple(TensorSpec(i.name, (None, *i.shape), np.dtype(i.dtype)) for i in inputs)
    feeds = make_feeds(inputs, count, seed)
    return ParityInputs(specs, (InputSet("random", feeds, "seeded random samples"),))


def _result(comparison: OutputComparison, samples: int) -> ParityResult:
    """One output's comparison as tune reports it."""
    return ParityResult(
        passed=comparison.passed,
        error=float(comparison.error or 0.0),
        noise=float(comparison.noise or 0.0),
        limit=float(comparison.limit or 0.0),
        output=comparison.name,
        samples=samples,
        truth="the input model as written (onnxruntime, graph optimizations disabled)",
        reference="the input model under onnxruntime's defaults",
    )


def _worst(results: Sequence[ParityResult]) -> ParityResult:
    """The worst output: failing before passing, then the largest error/limit (earliest first)."""
    worst = results[0]
    for item in results[1:]:
        if (not item.passed and worst.passed) or (
            item.passed == worst.passed
            and item.error / max(item.limit, 1e-300) > worst.error / max(worst.limit, 1e-300)
        ):
            worst = item
    return worst
