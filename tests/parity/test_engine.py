"""The parity engine (`bnexport.parity.engine`) with runners whose errors are known exactly: the
noise floor is the reference's worst draw, ill-conditioned edge cases leave it, and a candidate
passes or fails by the noise rule against the truth."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from bnexport.errors import ParityInputError
from bnexport.noise import DEFAULT_NOISE_FACTOR, NoiseTolerance
from bnexport.parity.engine import check_candidate, measure_baseline
from bnexport.parity.inputs import InputSet, ParityInputs
from bnexport.runners import Runner
from bnexport.signature import TensorSpec

SPEC = (TensorSpec("x", (None, 4), np.dtype(np.float32)),)


class _Offset(Runner):
    """``y = x`` plus ``offset`` times the sample's scale; ``at_one``: the offset at batch 1."""

    def __init__(self, name: str, offset: float = 0.0, at_one: float | None = None) -> None:
        self.name, self.kind = name, "cpu"
        self.offset, self.at_one = offset, at_one

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = feed["x"].astype(np.float64)
        off = self.at_one if self.at_one is not None and len(x) == 1 else self.offset
        scale = np.abs(x).max(axis=1, keepdims=True)
        return {"y": (x + off * scale).astype(np.float32)}


def _inputs(edge: bool = False) -> ParityInputs:
    rng = np.random.default_rng(0)
    sets = [InputSet("random", {"x": rng.uniform(1, 2, (6, 4)).astype(np.float32)}, "random")]
    if edge:
        sets.append(InputSet("large+", {"x": np.full((1, 4), 1e4, np.float32)}, "large"))
    return ParityInputs(SPEC, tuple(sets))


def test_the_noise_floor_is_the_worst_reference_draw_and_decides() -> None:
    inputs = _inputs()
    ref, truth = _Offset("ref", 1e-6, at_one=3e-6), _Offset("truth")
    steps: list[str] = []
    base = measure_baseline(ref, inputs, 4, truth=truth, step=steps.append)
    assert steps == ["ref batch 4", "truth batch 4", "ref batch 1"]
    assert base.noise["y"] == pytest.approx(3e-6, rel=0.1)  # batch 1's draw is the worse one
    limit = DEFAULT_NOISE_FACTOR * base.noise["y"]
    for offset, passed in ((0.5 * limit, True), (2 * limit, False)):
        (out,) = check_candidate(
            _Offset("cand", offset), ref, truth, inputs, 4, tolerance=NoiseTolerance()
        )
        assert out.passed is passed and out.error == pytest.approx(offset, rel=0.1)
    # without the batch-1 draw (tune's reference), the floor is the batch's own error
    alone = measure_baseline(ref, inputs, 4, truth=truth, noise_batches=())
    assert alone.noise["y"] == pytest.approx(1e-6, rel=0.1)


def test_an_ill_conditioned_edge_case_leaves_the_floor_with_a_note() -> None:
    class _Wild(_Offset):
        def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = super().infer(feed)["y"]
            wild = feed["x"][:, 0] > 1e3  # the edge case: fp32 "errs" 1e-2 of its scale there
            out[wild] *= np.float32(1.01)
            return {"y": out}

    inputs = _inputs(edge=True)
    base = measure_baseline(_Wild("ref", 1e-6), inputs, 7, truth=_Offset("truth"))
    assert base.noise["y"] == pytest.approx(1e-6, rel=0.1)
    assert base.ungated["y"].tolist() == [False] * 6 + [True]
    (note,) = base.ungated_notes(inputs)
    assert note.startswith("edge cases large+: ill-conditioned") and "NaN/Inf only" in note


def test_a_failing_reference_is_bad_input_and_a_shape_mismatch_is_refused() -> None:
    class _Broken(Runner):
        name, kind = "broken", "torch"

        def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            raise RuntimeError("no")

    with pytest.raises(ParityInputError, match=r"\(broken\) fails on the inputs \(batch 4\)"):
        measure_baseline(_Broken(), _inputs(), 4)
    with pytest.raises(RuntimeError, match="no"):
        measure_baseline(_Broken(), _inputs(), 4, fail=None)

    class _Wide(_Offset):
        def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"y": np.zeros((len(feed["x"]), 5), np.float32)}

    with pytest.raises(ParityInputError, match="gives shape"):
        check_candidate(
            _Wide("wide"), _Offset("ref"), None, _inputs(), 4, tolerance=NoiseTolerance()
        )
