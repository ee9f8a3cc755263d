"""The tuned file's outputs against the input model's, under `check`'s noise-relative rule.

An arbitrary ONNX file has no float64 model, so the *truth* is the input run as written (graph
optimizations disabled) and the *reference* (fp32's own error) the input under onnxruntime's
defaults; the tuned file, opened as a deployer opts in, is the candidate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnexport.ort_config import OrtSettings
from bnexport.tune.config import ParityResult, TuneConfig
from bnexport.tune.inputs import ModelInput, make_feeds
from bnexport.tune.sessions import opted_in_session, settings_session

if TYPE_CHECKING:
    import numpy as np

PARITY_MIN_SAMPLES = 16  # parity feeds at least this many samples, in batches of the target size


def check_outputs(
    tuned: Path, untuned: Path, reference: Any, inputs: Sequence[ModelInput], config: TuneConfig
) -> ParityResult:
    """The tuned file (opened with its ``ort_config``) vs the input model, `check`'s noise rule.

    Truth: the model as written (graph optimizations disabled); reference: onnxruntime's
    defaults (fp32's own error is ``N`` = reference vs truth); candidate error ``E`` against the
    truth; pass ⇔ ``E ≤ factor · max(N, floor_ulps · eps)`` per output
    (`bnexport.noise.NoiseTolerance`).
    """
    count = max(PARITY_MIN_SAMPLES, config.batch_size)
    count = math.ceil(count / config.batch_size) * config.batch_size
    feeds = make_feeds(inputs, count, config.seed + 1)
    truth_session = settings_session(
        untuned, OrtSettings(graph_optimization_level="disabled"), config.provider
    )
    tuned_session = opted_in_session(tuned, config.provider)
    runs = {"truth": truth_session, "reference": reference, "tuned": tuned_session}
    outs = _outputs_in_batches(runs, feeds, count, config.batch_size)
    names = [o.name for o in reference.get_outputs()]
    return _worst(
        [
            _compare_output(name, outs["tuned"][j], outs["reference"][j], outs["truth"][j], count)
            for j, name in enumerate(names)
        ]
    )


def _outputs_in_batches(
    runs: Mapping[str, Any], feeds: Mapping[str, np.ndarray], count: int, batch_size: int
) -> dict[str, list[np.ndarray]]:
    """Each session run on ``feeds`` ``batch_size`` samples at a time: per session, its outputs
    (in order) over all ``count`` samples."""
    import numpy as np

    chunks: dict[str, list[list[Any]]] = {k: [] for k in runs}
    for start in range(0, count, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in feeds.items()}
        for key, sess in runs.items():
            chunks[key].append(sess.run(None, batch))
    return {
        key: [np.concatenate([np.asarray(c[j]) for c in parts]) for j in range(len(parts[0]))]
        for key, parts in chunks.items()
    }


def _compare_output(
    name: str, tuned: np.ndarray, reference: np.ndarray, truth: np.ndarray, samples: int
) -> ParityResult:
    """One output of the tuned file against the truth, `check`'s noise-relative rule."""
    import numpy as np

    from bnexport.noise import NoiseTolerance
    from bnexport.parity.compare import compare_output

    result = compare_output(
        name, tuned, reference, NoiseTolerance(), truth=truth.astype(np.float64)
    )
    return ParityResult(
        passed=result.passed,
        error=float(result.error or 0.0),
        noise=float(result.noise or 0.0),
        limit=float(result.limit or 0.0),
        output=name,
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
