"""`bnexport.tune.search` (and `--fix` parsing): the pick on synthetic paired timings, the
settings tried, the budget plan."""

from __future__ import annotations

import numpy as np
import pytest

from bnexport.errors import BnexportError
from bnexport.ort_config import OrtSettings
from bnexport.timing import Ratio, paired_ratio
from bnexport.tune import (
    CandidateResult,
    TuneConfig,
    busy_warnings,
    candidate_settings,
    fixed_settings,
    noise_band,
    pick,
    plan_repeats,
    thread_counts,
)


def _result(settings: OrtSettings, median: float, p10: float, p90: float) -> CandidateResult:
    return CandidateResult(settings, "confirm", Ratio(median, p10, p90), 1e-3)


THREADS1 = OrtSettings(intra_op_num_threads=1)
EXTENDED = OrtSettings(graph_optimization_level="extended")
CONTROL = Ratio(1.0, 0.97, 1.03)


def test_pick_from_synthetic_paired_timings() -> None:
    """Times per round as `bench` records them: the reference drifts, the ratio is paired."""
    drift = np.array([1.0, 1.3, 0.9, 1.6, 1.1, 1.0, 1.2])  # the machine's slow and fast rounds
    reference = list(1e-3 * drift)
    control = paired_ratio(reference, list(1e-3 * drift * [1.01, 0.99, 1.0, 1.02, 0.98, 1, 1]))
    fast = paired_ratio(reference, list(1e-3 / 1.25 * drift))  # 1.25× faster in every round
    slow = paired_ratio(reference, list(1e-3 / 0.8 * drift))
    result = pick(
        [_result(EXTENDED, *slow.__dict__.values()), _result(THREADS1, *fast.__dict__.values())],
        control,
    )
    assert result.settings == THREADS1 and result.faster
    assert result.ratio is not None and result.ratio.median == pytest.approx(1.25)


def test_pick_takes_the_fastest_qualified() -> None:
    finalists = [_result(EXTENDED, 1.10, 1.05, 1.20), _result(THREADS1, 1.30, 1.10, 1.50)]
    assert pick(finalists, CONTROL).settings == THREADS1


def test_pick_keeps_defaults_when_the_gain_is_inside_the_noise() -> None:
    decision = pick([_result(THREADS1, 1.02, 0.99, 1.05)], CONTROL)
    assert decision.settings == OrtSettings() and not decision.faster
    assert decision.ratio is None and "inside or below the noise band" in decision.reason


def test_pick_refuses_a_fast_median_with_a_slow_tail() -> None:
    """1.3× on the median but its p10 (0.8) is below the control's: slower beyond noise."""
    decision = pick([_result(THREADS1, 1.30, 0.80, 1.60)], CONTROL)
    assert decision.settings == OrtSettings() and "p10 is below the control's" in decision.reason


def test_pick_the_noise_band_comes_from_the_control() -> None:
    noisy = Ratio(1.0, 0.7, 1.4)
    assert noise_band(noisy) == (0.7, 1.4)
    assert pick([_result(THREADS1, 1.3, 1.1, 1.5)], noisy).settings == OrtSettings()
    assert noise_band(Ratio(1.0, 0.999, 1.001)) == (0.99, 1.01)  # never narrower than ±1 %


def test_pick_tie_goes_to_the_earlier_finalist() -> None:
    finalists = [_result(EXTENDED, 1.2, 1.1, 1.3), _result(THREADS1, 1.2, 1.1, 1.3)]
    assert pick(finalists, CONTROL).settings == EXTENDED


def test_pick_uses_the_fixed_defaults() -> None:
    pinned = OrtSettings(intra_op_num_threads=1)
    assert pick([], CONTROL, pinned).settings == pinned


def test_a_busy_machine_is_reported() -> None:
    assert busy_warnings([0.1, 0.2, 0.3], [0.4, 0.3, 0.3], 2) == []
    (warning,) = busy_warnings([0.2, 0.2, 0.2], [1.6, 1.0, 0.5], 2)
    assert "load average 1.60 on 2 CPUs" in warning and "idle machine" in warning
    assert busy_warnings(None, None, 2) == []


def test_thread_counts() -> None:
    assert thread_counts(1) == (0, 1)
    assert thread_counts(2) == (0, 1, 2)
    assert thread_counts(6) == (0, 1, 2, 4, 6)


def test_candidates_start_with_defaults_and_cover_threads_levels_parallel_and_prepacking() -> None:
    cands = candidate_settings(2)
    assert cands[0] == OrtSettings()
    assert len(cands) == len(set(cands)) == (3 * 3 + 1) * 2  # each with prepacking on and off
    assert OrtSettings(intra_op_num_threads=1, graph_optimization_level="extended") in cands
    assert OrtSettings(execution_mode="parallel") in cands
    off = {"session.disable_prepacking": "1"}
    assert OrtSettings(intra_op_num_threads=1, session_config_entries=off) in cands  # type: ignore[arg-type]
    cuda = candidate_settings(2, provider="cuda")
    assert OrtSettings(execution_mode="parallel") not in cuda
    assert len(cuda) == 3 * 3 and not any(c.session_config_entries for c in cuda)


def test_a_fixed_session_config_entry_is_in_every_candidate() -> None:
    cands = candidate_settings(2, {"session.disable_prepacking": "1"})
    assert len(cands) == len(set(cands)) == 3 * 3 + 1
    assert {c.session_config_entries for c in cands} == {(("session.disable_prepacking", "1"),)}
    assert cands[0].label() == "prepacking=off"
    with pytest.raises(BnexportError, match="give the entry's value"):
        fixed_settings({"session.disable_prepacking": " "})


def test_candidates_keep_fixed_keys() -> None:
    cands = candidate_settings(4, {"intra_op_num_threads": "1"})
    assert {c.intra_op_num_threads for c in cands} == {1}
    assert cands[0] == OrtSettings(intra_op_num_threads=1)
    assert {c.graph_optimization_level for c in cands} == {"all", "extended", "basic"}


def test_fixed_settings_parse_names_and_codes() -> None:
    got = fixed_settings({"graph_optimization_level": "2", "execution_mode": "sequential"})
    assert got == {"graph_optimization_level": "extended", "execution_mode": "sequential"}
    with pytest.raises(BnexportError, match="choose one of"):
        fixed_settings({"graph_optimization_level": "fast"})
    with pytest.raises(BnexportError, match="integer >= 0"):
        fixed_settings({"intra_op_num_threads": "two"})
    with pytest.raises(BnexportError, match=r"intra_op_num_threads=-1: give 0 to \d+ threads"):
        fixed_settings({"intra_op_num_threads": "-1"})


def test_plan_fits_the_budget_and_keeps_minimums() -> None:
    config = TuneConfig(budget_s=10.0, min_time_s=0.02, cooldown_s=0.05, warmup_s=0.1)
    plan = plan_repeats(1e-4, 11, 5, config)
    assert plan["estimated_s"] <= 10.0 and not plan["over_budget"]
    assert 3 <= plan["screen_repeats"] <= config.screen_repeats
    tight = plan_repeats(1.0, 11, 5, TuneConfig(budget_s=1.0))
    assert (tight["screen_repeats"], tight["confirm_repeats"]) == (3, 7) and tight["over_budget"]
    roomy = plan_repeats(1e-5, 3, 3, TuneConfig(budget_s=1000.0))
    assert (roomy["screen_repeats"], roomy["confirm_repeats"]) == (9, 31)
