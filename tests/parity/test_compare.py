"""Comparison metrics against values computed by hand (and numpy formulas written here)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bnexport.parity.compare import compare_output, cosine_similarity, error_histogram
from bnexport.parity.tolerance import Tolerance

REF = np.array([[1.0, -2.0, 3.0], [0.5, 0.5, -4.0]])
CAND = np.array([[1.1, -2.0, 2.9], [0.5, 0.7, -4.0]])
TOL = Tolerance(rtol=0.01, atol_scale=0.01)


def test_metrics_match_hand_computed_values() -> None:
    c = compare_output("logits", CAND, REF, TOL, locate=lambda i: ("set", i + 10))
    assert c.max_abs_err == pytest.approx(0.2)
    assert c.mean_abs_err == pytest.approx(0.4 / 6)
    assert c.median_abs_err == pytest.approx(0.05)  # sorted errors 0,0,0,.1,.1,.2
    assert c.rel_err == pytest.approx(0.05)  # sample 1: 0.2 / max|ref| 4 (sample 0: 0.1 / 3)
    assert c.ref_max_abs == 4.0
    dot = float((CAND * REF).sum())
    assert c.cosine == pytest.approx(dot / (np.linalg.norm(CAND) * np.linalg.norm(REF)))
    row1 = float(CAND[1] @ REF[1]) / (np.linalg.norm(CAND[1]) * np.linalg.norm(REF[1]))
    assert c.min_sample_cosine == pytest.approx(row1)
    assert c.argmax_agreement == 0.5  # sample 1: ref argmax 0, candidate argmax 1
    # allowed: atol 0.01·3 / 0.01·4 per sample + 0.01·|r| → errors .1, .1, .2 exceed it
    assert c.violations == 3 and not c.passed and c.elements == 6
    # smallest atol_scale at rtol .01: (0.2 − 0.01·0.5) / 4; smallest rtol at atol: (0.2 − 0.04)/0.5
    assert c.min_atol_scale == pytest.approx(0.04875)
    assert c.min_rtol == pytest.approx(0.32)
    assert c.worst is not None
    assert (c.worst.sample, c.worst.index) == (1, (1,))
    assert (c.worst.input_set, c.worst.set_index) == ("set", 11)
    assert c.worst.candidate == pytest.approx(0.7) and c.worst.reference == 0.5
    assert c.worst.allowed == pytest.approx(0.04 + 0.005)
    assert c.histogram["0"] == 3 and c.histogram["1e-1..1e0"] == 3
    assert sum(c.histogram.values()) == 6
    assert c.nan_candidate == c.inf_candidate == c.nan_reference == 0


def test_identical_outputs_pass_with_zero_needed_tolerance() -> None:
    c = compare_output("y", REF.copy(), REF, TOL)
    assert c.passed and c.max_abs_err == 0.0 and c.min_atol_scale == 0.0 and c.min_rtol == 0.0
    assert c.cosine == pytest.approx(1.0) and c.argmax_agreement == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reported_minimum_tolerances_are_exactly_the_boundary(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((5, 7)) * 10
    cand = ref + rng.standard_normal((5, 7)) * 1e-3
    tol = Tolerance(rtol=1e-6, atol_scale=1e-6)  # both too strict: each minimum is positive
    c = compare_output("y", cand, ref, tol)
    assert c.min_atol_scale > 0 and c.min_rtol > 0
    assert Tolerance(tol.rtol, c.min_atol_scale * (1 + 1e-9)).passes(cand, ref).all()
    assert not Tolerance(tol.rtol, c.min_atol_scale * (1 - 1e-6)).passes(cand, ref).all()
    assert Tolerance(c.min_rtol * (1 + 1e-9), tol.atol_scale).passes(cand, ref).all()
    assert not Tolerance(c.min_rtol * (1 - 1e-6), tol.atol_scale).passes(cand, ref).all()


def test_nan_in_candidate_fails_and_needs_infinite_tolerance() -> None:
    cand = CAND.copy()
    cand[0, 1] = np.nan
    c = compare_output("y", cand, REF, Tolerance(1.0, 1.0))
    assert not c.passed and c.nan_candidate == 1
    assert math.isinf(c.min_atol_scale) and math.isinf(c.min_rtol) and math.isinf(c.max_abs_err)
    assert math.isnan(c.cosine)
    assert c.histogram["non-finite"] == 1
    assert c.worst is not None and (c.worst.sample, c.worst.index) == (0, (1,))


def test_matching_nan_and_inf_agree() -> None:
    ref = np.array([[np.nan, np.inf, 1.0]])
    c = compare_output("y", ref.copy(), ref, TOL)
    assert c.passed and c.nan_reference == 1 and c.inf_reference == 1


def test_cosine_conventions() -> None:
    assert cosine_similarity(np.zeros(3), np.zeros(3)) == 1.0
    assert cosine_similarity(np.zeros(3), np.ones(3)) == 0.0
    assert cosine_similarity(np.array([1.0, 0.0]), np.array([0.0, 2.0])) == 0.0
    assert cosine_similarity(np.array([1.0, 2.0]), np.array([-1.0, -2.0])) == pytest.approx(-1.0)


def test_histogram_bins_are_decades() -> None:
    h = error_histogram(np.array([0.0, 5e-10, 3e-6, 2e-6, 0.5, 20.0, np.inf]))
    assert h["0"] == 1 and h["<1e-9"] == 1 and h["1e-6..1e-5"] == 2
    assert h["1e-1..1e0"] == 1 and h[">=1e1"] == 1 and h["non-finite"] == 1
