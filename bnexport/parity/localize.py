"""Where an export goes wrong: the first layer, in execution order, whose error exceeds its budget.

After a check, the failing onnxruntime runner is run again on a copy of the model whose layer
values are marked as outputs (`bnexport.parity.onnx_graph`; which value is which module's output:
`bnexport.parity.layermap`), with the same provider and optimization level, and compared layer by
layer with the unfolded PyTorch model's module outputs in fp32 and float64
(`bnexport.parity.layers`): each layer under its own noise floor, by the check's rule.

**Bounded cost.** A model with at most `FULL_MARK_LAYERS` mapped layers is compared in one
session. A larger one is bisected over its *cut* values (after which everything downstream depends
on the inputs only through that value): each round marks up to `BISECT_PROBES` cuts evenly spread
between the last cut that agreed and the first that failed; when few cuts are left, one last round
marks every layer between the two (in chunks of `ROUND_MAX_LAYERS`). A fault before an agreeing
cut cannot explain an error after it, so the search misses nothing that reaches the outputs. Each
round is one onnxruntime session and one hooked forward of each PyTorch draw, stopped after its
last wanted module.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from bnexport.errors import BnexportError, raise_if_interrupted
from bnexport.parity.config import PreparedCheck
from bnexport.parity.inputs import InputSet, ParityInputs
from bnexport.parity.layermap import LayerMap, map_layers
from bnexport.parity.layers import Layer, LayerResult, RoundSetup, compare_layers
from bnexport.parity.onnx_graph import GraphView, marked_copy, read_graph
from bnexport.parity.report import RunnerResult
from bnexport.progress import Progress, ProgressEvent
from bnexport.runners import OnnxRuntimeRunner

#: Models with at most this many mapped layers are compared in one session, every layer at once.
FULL_MARK_LAYERS = 32
#: Cut layers marked per bisection round.
BISECT_PROBES = 7
#: At most this many layers are marked in one round (a longer segment is split, in order).
ROUND_MAX_LAYERS = 48
#: Bytes of layer outputs one round may hold: per element, fp32 for the reference, its batch-1
#: and reordered draws and onnxruntime, float64 for the truth, and the concatenated copies.
ROUND_MEMORY_BYTES = 1 << 30
BYTES_PER_ELEMENT = 48
#: Localization feeds the check's edge cases and at most this many of its other samples.
MAX_DATA_SAMPLES = 64
LOCALIZE_STAGE = "localize"


@dataclass
class Localization:
    """The layers compared, the first failing one and the last that agreed, and the cost."""

    runner: str
    batch_size: int
    requested: bool
    layer_map: LayerMap
    results: list[LayerResult] = field(default_factory=list)
    strategy: str = "all"  # "all" (one pass over every layer) or "bisect"
    rounds: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    samples: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def sessions(self) -> int:
        return len(self.rounds)

    @property
    def first_failing(self) -> LayerResult | None:
        failing = [r for r in self.results if not r.passed]
        return min(failing, key=lambda r: r.layer.order) if failing else None

    @property
    def last_agreeing(self) -> LayerResult | None:
        first = self.first_failing
        before = [
            r
            for r in self.results
            if r.passed and (first is None or r.layer.order < first.layer.order)
        ]
        return max(before, key=lambda r: r.layer.order) if before else None

    def neighbours(self, around: int = 2) -> list[LayerResult]:
        """The measured layers around the first failing one (or the last ones measured)."""
        ordered = sorted(self.results, key=lambda r: r.layer.order)
        first = self.first_failing
        at = ordered.index(first) if first is not None else len(ordered) - 1
        return ordered[max(0, at - around) : at + around + 1]

    def to_dict(self) -> dict[str, Any]:
        first, last = self.first_failing, self.last_agreeing
        return {
            "runner": self.runner,
            "batch_size": self.batch_size,
            "requested": self.requested,
            "strategy": self.strategy,
            "sessions": self.sessions,
            "seconds": self.seconds,
            "samples": self.samples,
            "first_failing": None if first is None else first.to_dict(),
            "last_agreeing": None if last is None else last.to_dict(),
            "mapping": self.layer_map.to_dict(),
            "layers": [r.to_dict() for r in sorted(self.results, key=lambda r: r.layer.order)],
            "rounds": self.rounds,
            "notes": list(self.notes),
        }


def localize(
    onnx_model: str | os.PathLike[str] | bytes,
    check: PreparedCheck,
    results: Sequence[RunnerResult],
    *,
    fold_report: Any = None,
    folded: Any = None,
    requested: bool = False,
    progress: Progress | None = None,
    strategy: str = "auto",
) -> Localization | None:
    """Localize the worst failing onnxruntime runner of ``results`` (with ``requested``, the
    worst one even when all passed); None when no onnxruntime runner ran. ``strategy``: "auto"
    (every layer at once up to `FULL_MARK_LAYERS`, else bisection), "all" (every layer, in
    chunks: what measuring a model's per-layer floors needs) or "bisect"."""
    started = time.perf_counter()
    picked = _target(check, results, requested)
    if picked is None:
        return None
    result, runner, notes = picked
    view = read_graph(_load(onnx_model))
    inputs = _subset(check.inputs)
    lmap = map_layers(
        view, check.ref_runner, _one_sample(inputs), fold_report=fold_report, folded=folded
    )
    loc = Localization(result.runner, result.batch_size, requested, lmap, samples=inputs.size)
    loc.notes += notes + lmap.notes + ([view.note] if view.note else [])
    assert runner.config is not None
    setup = RoundSetup(
        reference=check.ref_runner,
        truth=check.gt_runner if check.config.tolerance_mode == "noise" else None,
        candidate=runner,
        config=runner.config,
        inputs=inputs,
        ref_batch=max(check.batch_sizes),
        batch=result.batch_size,
        tolerance=check.config.tolerance_for(runner.kind),
        noise_runner=_reordered(),
    )
    _Search(loc, setup, view, progress).run(
        lmap.layers, failing=not result.passed, strategy=strategy
    )
    loc.seconds = time.perf_counter() - started
    return loc


def localize_check(
    onnx_model: str | os.PathLike[str] | bytes,
    check: PreparedCheck,
    results: Sequence[RunnerResult],
    *,
    notes: list[str],
    **kwargs: Any,
) -> Localization | None:
    """`localize`, for a check that already has its verdict: a localization that fails (a model
    whose hooks or marked copy onnxruntime cannot run, a copy over protobuf's 2 GiB) leaves the
    verdict as it is and says why in ``notes``; bad input still raises."""
    try:
        return localize(onnx_model, check, results, **kwargs)
    except BnexportError:
        raise
    except Exception as exc:
        raise_if_interrupted(exc)
        notes.append(f"localization failed: {type(exc).__name__}: {' '.join(str(exc).split())}")
        return None


def _target(
    check: PreparedCheck, results: Sequence[RunnerResult], requested: bool
) -> tuple[RunnerResult, OnnxRuntimeRunner, list[str]] | None:
    """The onnxruntime result to localize: the gating failure furthest past its limit, or (asked
    for) the closest to it; and a note when only PyTorch runners failed."""
    runners = {r.name: r for r in check.ort_runners if r.config is not None}
    ort = [r for r in results if r.runner in runners and r.error is None]
    failing = [r for r in ort if r.gating and not r.passed]
    notes = []
    if not failing and any(r.gating and not r.passed for r in results):
        notes.append("only PyTorch runners failed: the fold, not the export, differs")
    pool = failing or (ort if requested or notes else [])
    if not pool:
        return None
    worst = max(pool, key=lambda r: (not r.passed, r.margin))
    return worst, runners[worst.runner], notes


def _load(onnx_model: str | os.PathLike[str] | bytes) -> Any:
    """The whole model, external data included (the marked copy goes to onnxruntime as bytes)."""
    import onnx

    if isinstance(onnx_model, bytes):
        return onnx.load_model_from_string(onnx_model)
    return onnx.load(str(onnx_model))


def _subset(inputs: ParityInputs) -> ParityInputs:
    """The check's edge cases and its first `MAX_DATA_SAMPLES` other samples (in set order)."""
    mask = inputs.edge_case_mask()
    if int((~mask).sum()) <= MAX_DATA_SAMPLES:
        return inputs
    left = MAX_DATA_SAMPLES
    sets = []
    for s in inputs.sets:
        if s.name in _edge_names(inputs):
            sets.append(s)
            continue
        take = min(left, s.size)
        left -= take
        if take:
            sets.append(InputSet(s.name, {k: v[:take] for k, v in s.arrays.items()}, s.description))
    return replace(inputs, sets=tuple(sets), notes=list(inputs.notes), _arrays=None)


def _edge_names(inputs: ParityInputs) -> set[str]:
    from bnexport.parity.inputs import EDGE_CASE_SETS

    return {s.name for s in inputs.sets if s.name in EDGE_CASE_SETS}


def _one_sample(inputs: ParityInputs) -> dict[str, Any]:
    """The first data-like sample (else the first), as a batch of one."""
    mask = inputs.edge_case_mask()
    i = int((~mask).argmax()) if (~mask).any() else 0
    return {name: arr[i : i + 1] for name, arr in inputs.arrays().items()}


def _reordered() -> Any:
    """The reordered-sums draw of the check's noise floor, where this version has one."""
    try:
        from bnexport.parity.orders import ReorderedRunner
    except ImportError:  # pragma: no cover - the draw is part of the check's rule where it exists
        return None
    return ReorderedRunner


class _Search:
    """The rounds of one localization (module docstring)."""

    def __init__(
        self, loc: Localization, setup: RoundSetup, view: GraphView, progress: Progress | None
    ) -> None:
        self.loc = loc
        self.setup = setup
        self.view = view
        self.progress = progress
        self.expected = 1  # rounds expected, for progress

    def run(self, layers: list[Layer], *, failing: bool, strategy: str = "auto") -> None:
        if not layers:
            return
        if strategy == "all" or (strategy == "auto" and len(layers) <= FULL_MARK_LAYERS):
            self.loc.strategy = "all"
            self.expected = len(_chunks(layers, self.loc.samples))
            self._segment(layers, stop_at_failure=False)
            return
        self.loc.strategy = "bisect"
        cuts = [i for i, x in enumerate(layers) if x.cut and x.output is None]
        self.expected = 1 + math.ceil(
            math.log(max(len(cuts), 1) / BISECT_PROBES + 1, BISECT_PROBES + 1)
        )
        lo, hi = -1, len(layers)
        while True:
            inner = [i for i in cuts if lo < i < hi]
            if len(inner) <= BISECT_PROBES:
                break
            probes = [
                inner[round((k + 1) * len(inner) / (BISECT_PROBES + 1)) - 1]
                for k in range(BISECT_PROBES)
            ]
            measured = self._round([layers[i] for i in dict.fromkeys(probes)])
            failed = [i for i in probes if not measured[layers[i].key].passed]
            if failed:
                hi = min(failed)
                lo = max([p for p in probes if p < hi], default=lo)
            else:
                lo = max(probes)
        done = {r.layer.key for r in self.loc.results}
        segment = [x for x in layers[lo + 1 : hi + 1] if x.key not in done]
        self._segment(segment, stop_at_failure=failing or hi < len(layers))

    def _segment(self, layers: list[Layer], *, stop_at_failure: bool) -> None:
        """Every layer of ``layers``, in chunks that fit a round, in order."""
        for chunk in _chunks(layers, self.loc.samples):
            measured = self._round(chunk)
            if stop_at_failure and not all(c.passed for c in measured.values()):
                return

    def _round(self, layers: list[Layer]) -> dict[str, Any]:
        comparisons, seconds = compare_layers(self.setup, self._bytes, layers)
        index = len(self.loc.rounds)
        by_key = {x.key: x for x in layers}
        for key, comparison in comparisons.items():
            self.loc.results.append(LayerResult(by_key[key], comparison, index))
        failing = [x.key for x in layers if not comparisons[x.key].passed]
        self.loc.rounds.append(
            {
                "layers": len(layers),
                "seconds": seconds,
                "first_failing": failing[0] if failing else None,
            }
        )
        if self.progress:
            total = max(self.expected, index + 1)
            message = f"localize: round {index + 1}, {len(layers)} layers"
            self.progress(ProgressEvent(LOCALIZE_STAGE, index + 1, total, message))
        return comparisons

    def _bytes(self, values: Sequence[str]) -> bytes:
        return marked_copy(self.view.proto, values, self.view.dtypes)


def _chunks(layers: list[Layer], samples: int) -> list[list[Layer]]:
    """``layers`` in order, split so that no round holds more than `ROUND_MAX_LAYERS` layers or
    `ROUND_MEMORY_BYTES` of outputs."""
    chunks: list[list[Layer]] = [[]]
    used = 0
    for x in layers:
        cost = x.size * max(samples, 1) * BYTES_PER_ELEMENT
        if chunks[-1] and (len(chunks[-1]) >= ROUND_MAX_LAYERS or used + cost > ROUND_MEMORY_BYTES):
            chunks.append([])
            used = 0
        chunks[-1].append(x)
        used += cost
    return [c for c in chunks if c]
