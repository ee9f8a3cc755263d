"""The search, pure: the settings to try, the repeats that fit the budget, and the pick.

No sessions and no clocks here: every function takes numbers and settings and returns them, so
the decisions can be tested on synthetic timings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from bnexport.ort_config import OrtSettings
from bnexport.timing import Ratio
from bnexport.tune.config import CandidateResult, Decision, TuneConfig, fixed_settings

MIN_SCREEN_REPEATS = 3
MIN_CONFIRM_REPEATS = 7
SCREEN_SHARE = 0.35  # of the timing budget; the rest confirms
# Other processes busy on the CPUs change which setting wins (measured: with another process on
# one of 2 cores, intra_op_num_threads=1 was 2.3x the defaults at batch 1-256; on a quieter machine
# the same files lost 20-48 % at batch 64-1024). A 1-minute load average above this many runnable
# tasks per available CPU, before or after the run, is reported with the pick.
BUSY_LOAD_PER_CPU = 0.25
# A slow candidate (parallel mode, one thread at a large batch) takes up to this many times the
# defaults' time per call: the budget plan assumes it for every candidate.
SLOW_CANDIDATE_FACTOR = 2.0
# The noise band is never narrower than ±1 %: a quiet run's control can agree within less.
MIN_NOISE_BAND = 0.01
GRAPH_LEVELS: tuple[str, ...] = ("all", "extended", "basic")
#: Session config entries the search tries beside onnxruntime's default for each setting
#: (carried in ``bnexport_session_config``, applied by bnexport's session factory). Prepacking
#: off: 1.40× the defaults at batch 1 on the shipped Net, 2.13× with one thread, but 0.72× at
#: batch 8 (docs/serving.md): which way it goes depends on the model and batch, so it is measured.
SEARCHED_ENTRIES: tuple[tuple[str, str], ...] = (("session.disable_prepacking", "1"),)


def thread_counts(max_threads: int) -> tuple[int, ...]:
    """0 (onnxruntime's choice), 1, the powers of two below ``max_threads``, and ``max_threads``."""
    counts = {0, 1, max_threads}
    power = 2
    while power < max_threads:
        counts.add(power)
        power *= 2
    return tuple(sorted(counts))


def candidate_settings(
    max_threads: int, fixed: Mapping[str, Any] | None = None, provider: str = "cpu"
) -> list[OrtSettings]:
    """Every setting the search tries; onnxruntime's defaults (with ``fixed`` applied) first.

    Threads × graph level (``all``, ``extended``, ``basic``) in sequential mode, plus parallel
    execution at the default threads (it only helps graphs with independent branches; not on
    CUDA, where onnxruntime forces sequential execution); each also with every entry of
    `SEARCHED_ENTRIES` on the CPU (prepacking is a CPU kernel matter).
    """
    pinned = fixed_settings(fixed or {})
    out = [OrtSettings(**pinned)]
    for threads in thread_counts(max_threads):
        for level in GRAPH_LEVELS:
            level_: Any = level
            out.append(OrtSettings(intra_op_num_threads=threads, graph_optimization_level=level_))
    if provider != "cuda":
        out.append(OrtSettings(execution_mode="parallel"))
        out += [replace(s, session_config_entries=(e,)) for e in SEARCHED_ENTRIES for s in out]
    keys = {k: v for k, v in pinned.items() if k != "session_config_entries"}
    entries = dict(pinned.get("session_config_entries", ()))
    seen: list[OrtSettings] = []
    for s in out:
        s = replace(s, **keys, session_config_entries=tuple({**s.entries, **entries}.items()))
        if s not in seen:
            seen.append(s)
    return seen


def finalists(
    screen: Sequence[CandidateResult], defaults: OrtSettings, count: int
) -> list[OrtSettings]:
    """The ``count`` best screened settings other than the defaults (by median ratio)."""
    ranked = sorted(
        (r for r in screen if r.settings != defaults), key=lambda r: r.ratio.median, reverse=True
    )
    return [r.settings for r in ranked[:count]]


def noise_band(control: Ratio, minimum: float = MIN_NOISE_BAND) -> tuple[float, float]:
    """``(lo, hi)``: the control's p10–p90, widened to at least ``1 ± minimum``."""
    return min(control.p10, 1.0 - minimum), max(control.p90, 1.0 + minimum)


def pick(
    finalists: Sequence[CandidateResult],
    control: Ratio,
    defaults: OrtSettings | None = None,
    minimum_band: float = MIN_NOISE_BAND,
) -> Decision:
    """The fastest finalist that is faster beyond noise and not slower beyond noise.

    With ``(lo, hi)`` = :func:`noise_band` of the control (a copy carrying the defaults, timed
    against the defaults: the same computation), a finalist qualifies when its paired ratio's
    median is above ``hi`` and its p10 is at least ``lo``; the highest median wins (the earlier
    finalist on a tie). None qualifies: ``defaults``.
    """
    defaults = defaults or OrtSettings()
    lo, hi = noise_band(control, minimum_band)
    qualified = [r for r in finalists if r.ratio.median > hi and r.ratio.p10 >= lo]
    if not qualified:
        best = max(finalists, key=lambda r: r.ratio.median, default=None)
        if best is None:
            why = "no setting beat onnxruntime's defaults beyond noise"
        else:
            r = best.ratio
            why = f"best was {best.settings.label()} at {r.median:.3f}× [{r.p10:.3f}–{r.p90:.3f}]"
            if r.median > hi:
                why += f": its p10 is below the control's ({lo:.3f}), slower in its slow rounds"
            else:
                why += f", inside or below the noise band [{lo:.3f}–{hi:.3f}]"
        return Decision(defaults, False, (lo, hi), why, None)
    best = max(qualified, key=lambda r: r.ratio.median)  # max keeps the first of equals
    why = (
        f"{best.ratio.median:.3f}× [{best.ratio.p10:.3f}–{best.ratio.p90:.3f}] vs onnxruntime's "
        f"defaults, above the noise band [{lo:.3f}–{hi:.3f}]"
    )
    return Decision(best.settings, True, (lo, hi), why, best.ratio)


def plan_repeats(
    per_call_s: float, n_screen: int, n_confirm: int, config: TuneConfig
) -> dict[str, Any]:
    """Repeats of each stage so the timed stages fit ``config.budget_s`` (never below minimums).

    One timing lasts ``max(min_time, slow × per_call) + cooldown``; each runner is warmed up for
    ``warmup`` once per stage.
    """
    timing = max(config.min_time_s, SLOW_CANDIDATE_FACTOR * per_call_s) + config.cooldown_s
    warm = (n_screen + n_confirm) * (config.warmup_s + 3 * per_call_s)
    left = max(config.budget_s - warm, 0.0)
    screen = min(config.screen_repeats, math.floor(left * SCREEN_SHARE / (n_screen * timing)))
    confirm = min(
        config.confirm_repeats, math.floor(left * (1 - SCREEN_SHARE) / (n_confirm * timing))
    )
    screen = max(screen, min(MIN_SCREEN_REPEATS, config.screen_repeats))
    confirm = max(confirm, min(MIN_CONFIRM_REPEATS, config.confirm_repeats))
    estimate = warm + timing * (n_screen * screen + n_confirm * confirm)
    return {
        "per_call_s": per_call_s,
        "screen_repeats": screen,
        "confirm_repeats": confirm,
        "estimated_s": estimate,
        "over_budget": estimate > config.budget_s * 1.05,
    }


def busy_warnings(
    before: Sequence[float] | None, after: Sequence[float] | None, cpus: int
) -> list[str]:
    """A warning when other work shared the CPUs: the pick then fits a machine that busy."""
    loads = [v[0] for v in (before, after) if v]
    if not loads or max(loads) <= BUSY_LOAD_PER_CPU * cpus:
        return []
    return [
        f"load average {max(loads):.2f} on {cpus} CPUs during the run: other processes shared "
        "the CPUs, which favours fewer threads; the pick fits a machine that busy — tune on an "
        "idle machine (or one as busy as the deployment) and compare with bench --tuned"
    ]
