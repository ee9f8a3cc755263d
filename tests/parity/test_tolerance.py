"""The tolerance formula, its per-sample scale, defaults and the --rtol/--atol parser."""

from __future__ import annotations

import re

import numpy as np
import pytest

from bnexport.errors import ParityInputError
from bnexport.noise import (
    NoiseTolerance,
    gated_candidate,
    noise_floor,
    relative_error,
    sample_errors,
)
from bnexport.parity.tolerance import (
    DEFAULT_TOLERANCES,
    Tolerance,
    parse_tolerance_overrides,
    resolve_tolerances,
)


def test_the_documented_defaults_table_is_the_defaults() -> None:
    """The module docstring's table (what users read) states `DEFAULT_TOLERANCES`, kind by kind."""
    import bnexport.parity.tolerance as tolerance

    number = r"(\d[\d.e+-]*)"
    rows = re.findall(rf"^``([\w-]+)``\s+{number}\s+{number}\s", tolerance.__doc__ or "", re.M)
    documented = {kind: Tolerance(float(rtol), float(atol)) for kind, rtol, atol in rows}
    assert documented == DEFAULT_TOLERANCES


def test_formula_at_the_boundary() -> None:
    """|a − r| <= atol_scale·max(1, max|ref|) + rtol·|r|, with max|ref| of the sample."""
    tol = Tolerance(rtol=1e-3, atol_scale=1e-2)
    ref = np.array([[200.0, 50.0, -3.0]])
    allowed = 1e-2 * 200.0 + 1e-3 * np.abs(ref)  # [2.2, 2.05, 2.003]
    np.testing.assert_allclose(tol.allowed(ref), allowed)
    just_in = ref + allowed * (1 - 1e-9)
    just_out = ref - allowed * (1 + 1e-6)
    assert tol.passes(just_in, ref).all()
    assert not tol.passes(just_out, ref).any()


def test_atol_floor_is_one_for_small_outputs() -> None:
    tol = Tolerance(rtol=0.0, atol_scale=1e-5)
    ref = np.array([[1e-3, -2e-3]])
    np.testing.assert_allclose(tol.allowed(ref), [[1e-5, 1e-5]])


def test_scale_is_per_sample_so_one_large_sample_loosens_nothing_else() -> None:
    tol = Tolerance(rtol=0.0, atol_scale=1e-5)
    ref = np.array([[1e4, 0.0], [2.0, 1.0]])
    cand = ref + np.array([[0.05, 0.05], [1e-4, 1e-4]])
    # sample 0: allowed 0.1 → passes; sample 1: allowed 2e-5 → fails (a global scale would pass it)
    assert tol.passes(cand, ref).tolist() == [[True, True], [False, False]]


def test_nan_passes_only_where_both_are_nan() -> None:
    tol = Tolerance(rtol=1e-4, atol_scale=1e-5)
    ref = np.array([[np.nan, 1.0, np.inf]])
    assert tol.passes(np.array([[np.nan, np.nan, np.inf]]), ref).tolist() == [[True, False, True]]


def test_overrides_for_all_kinds_and_one_kind() -> None:
    got = parse_tolerance_overrides(["1e-3"], ["cuda=5e-4"])
    assert got["cpu"] == Tolerance(1e-3, DEFAULT_TOLERANCES["cpu"].atol_scale)
    assert got["cuda"] == Tolerance(1e-3, 5e-4)
    assert resolve_tolerances(got)["torch"].rtol == 1e-3


@pytest.mark.parametrize(
    ("rtol", "atol", "message"),
    [
        (["abc"], [], "not a number"),
        (["gpu=1e-3"], [], "unknown runner kind"),
        ([], ["-1"], ">= 0"),
        (["nan"], [], ">= 0"),
    ],
)
def test_bad_overrides_are_clear_errors(rtol: list[str], atol: list[str], message: str) -> None:
    with pytest.raises(ParityInputError, match=message):
        parse_tolerance_overrides(rtol, atol)


# The noise-relative rule: one implementation (NoiseTolerance.passes), used by check, onnx and the
# fold self-check.


def test_noise_rule_boundary_equal_passes_next_float_fails() -> None:
    rule = NoiseTolerance(factor=4.0, floor_ulps=4.0)
    eps = float(np.finfo(np.float32).eps)
    noise = 3e-6  # above the 4-ulp floor
    limit = rule.limit(noise, eps)
    assert limit == 4.0 * noise
    assert rule.passes(limit, noise, eps)
    assert not rule.passes(np.nextafter(limit, np.inf), noise, eps)
    assert not rule.passes(float("nan"), noise, eps)


def test_noise_rule_floor_and_precision() -> None:
    """fp32 exact on every sample (N = 0): the floor is floor_ulps·eps; ρ rescales the limit."""
    rule = NoiseTolerance(factor=4.0, floor_ulps=4.0)
    eps = float(np.finfo(np.float32).eps)
    assert rule.floor(0.0, eps) == 4.0 * eps
    assert rule.passes(16.0 * eps, 0.0, eps) and not rule.passes(17.0 * eps, 0.0, eps)
    rho = float(np.finfo(np.float64).eps) / eps
    assert rule.limit(1e-6, eps, rho) == 4.0 * 1e-6 * rho


def test_relative_error_is_per_sample_and_worst_over_samples() -> None:
    truth = np.array([[100.0, -50.0], [1.0, 0.5], [0.0, 0.0]])
    cand = truth + np.array([[1.0, 0.0], [0.0, 0.02], [0.0, 0.0]])
    e = relative_error(cand, truth)
    # sample 0: 1/100; sample 1: 0.02/1 (worse, though smaller in absolute terms)
    assert e.value == pytest.approx(0.02) and (e.sample, e.index, e.scale) == (1, (1,), 1.0)
    # an all-zero sample is scaled by the output's largest magnitude
    zero = relative_error(truth + np.array([[0, 0], [0, 0], [1.0, 0]]), truth)
    assert zero.value == pytest.approx(0.01) and zero.sample == 2


def test_relative_error_nan_is_infinite_unless_both_nan() -> None:
    truth = np.array([[1.0, np.nan]])
    assert relative_error(np.array([[1.0, np.nan]]), truth).value == 0.0
    assert relative_error(np.array([[np.nan, np.nan]]), truth).value == float("inf")


def test_fixed_rule_boundary_equal_passes_next_float_fails() -> None:
    tol = Tolerance(rtol=0.0, atol_scale=0.25)
    ref = np.array([[2.0, 1.0]])  # allowed: 0.25 · max(1, 2) = 0.5, exact in binary
    assert tol.passes(np.array([[2.5, 1.0]]), ref).all()
    assert not tol.passes(np.array([[np.nextafter(2.5, 3.0), 1.0]]), ref)[0, 0]


# --------------------------------------------------------------------------------------------
# Ill-conditioned edge cases (noise_floor, gated_candidate)


def _outputs(errors: list[float], scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """A truth of ``len(errors)`` samples × 3 values (max |t| = scale) and a draw off by
    ``errors[i] · scale`` in sample i's first value."""
    truth = np.tile(np.array([scale, -1.0, 0.5]), (len(errors), 1))
    draw = truth.copy()
    draw[:, 0] += np.asarray(errors) * scale
    return draw, truth


def test_sample_errors_are_each_samples_relative_error() -> None:
    draw, truth = _outputs([1e-6, 3e-5, 0.0])
    np.testing.assert_allclose(sample_errors(draw, truth), [1e-6, 3e-5, 0.0], rtol=1e-9)


def test_an_edge_case_far_worse_than_the_data_is_left_out_of_the_floor() -> None:
    # samples: 2 data-like (worst 2e-6), then edge cases at 10× (kept, the boundary) and 11×
    draw, truth = _outputs([1e-6, 2e-6, 2e-5, 2.2e-5])
    edge = np.array([False, False, True, True])
    noise, ungated = noise_floor([draw], truth, edge)
    assert ungated.tolist() == [False, False, False, True]
    assert noise == pytest.approx(2e-5)  # the worst gated sample


def test_the_worst_draw_counts_per_sample() -> None:
    a, truth = _outputs([1e-6, 1e-6])
    b, _ = _outputs([3e-6, 1e-5])
    noise, ungated = noise_floor([a, b], truth, np.array([False, True]))
    assert noise == pytest.approx(1e-5) and not ungated.any()  # 1e-5 ≤ 10 × 3e-6


def test_without_data_like_samples_nothing_is_left_out() -> None:
    draw, truth = _outputs([1e-6, 1e-3])
    noise, ungated = noise_floor([draw], truth, np.array([True, True]))
    assert noise == pytest.approx(1e-3) and not ungated.any()
    noise, ungated = noise_floor([draw], truth, None)
    assert noise == pytest.approx(1e-3) and not ungated.any()


def test_a_left_out_sample_counts_for_nothing_but_a_nan_there_still_fails() -> None:
    cand, truth = _outputs([1e-6, 0.5])
    ungated = np.array([False, True])
    assert relative_error(gated_candidate(cand, truth, ungated), truth).value == pytest.approx(1e-6)
    cand[1, 2] = np.nan
    assert relative_error(gated_candidate(cand, truth, ungated), truth).value == np.inf
