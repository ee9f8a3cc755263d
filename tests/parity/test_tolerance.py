"""The tolerance formula, its per-sample scale, defaults and the --rtol/--atol parser."""

from __future__ import annotations

import numpy as np
import pytest

from bnexport.errors import ParityInputError
from bnexport.parity.tolerance import (
    DEFAULT_TOLERANCES,
    Tolerance,
    parse_tolerance_overrides,
    resolve_tolerances,
)


def test_documented_defaults() -> None:
    assert DEFAULT_TOLERANCES["cpu"] == Tolerance(rtol=1e-4, atol_scale=1e-5)
    assert DEFAULT_TOLERANCES["cuda"] == Tolerance(rtol=1e-3, atol_scale=1e-4)
    assert DEFAULT_TOLERANCES["torch"] == Tolerance(rtol=1e-4, atol_scale=1e-5)
    assert DEFAULT_TOLERANCES["cuda-tf32"].rtol > DEFAULT_TOLERANCES["cuda"].rtol


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
