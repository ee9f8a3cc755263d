"""What `bnexport tune` is asked (`TuneConfig`, the ``--fix`` values) and what it reports."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from bnexport.defaults import (
    DEFAULT_CONFIRM_REPEATS,
    DEFAULT_COOLDOWN_S,
    DEFAULT_FINALISTS,
    DEFAULT_MIN_TIME_S,
    DEFAULT_SCREEN_REPEATS,
    DEFAULT_SEED,
    DEFAULT_TUNE_BATCH_SIZE,
    DEFAULT_TUNE_BUDGET_S,
    DEFAULT_WARMUP_S,
)
from bnexport.errors import BnexportError
from bnexport.limits import (
    MAX_BUDGET_S,
    MAX_DIM,
    MAX_REPEATS,
    check_count,
    check_seconds,
    check_seed,
    check_threads,
)
from bnexport.ort_config import SESSION_ENTRY_PREFIX, OrtSettings, check_carriable
from bnexport.ort_names import EXECUTION_MODE_CODES, OPT_LEVEL_CODES
from bnexport.timing import Ratio, TimingConfig


@dataclass(frozen=True)
class TuneConfig:
    """What to tune for and how long to measure (``max_threads=None``: every available CPU)."""

    batch_size: int = DEFAULT_TUNE_BATCH_SIZE
    max_threads: int | None = None
    provider: str = "cpu"
    fixed: dict[str, Any] = field(default_factory=dict)
    budget_s: float = DEFAULT_TUNE_BUDGET_S
    screen_repeats: int = DEFAULT_SCREEN_REPEATS
    confirm_repeats: int = DEFAULT_CONFIRM_REPEATS
    finalists: int = DEFAULT_FINALISTS
    min_time_s: float = DEFAULT_MIN_TIME_S
    warmup_s: float = DEFAULT_WARMUP_S
    cooldown_s: float = DEFAULT_COOLDOWN_S
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        checks = [
            (self.provider in ("cpu", "cuda"), f"provider {self.provider!r}: cpu or cuda"),
            (self.confirm_repeats >= 3, "confirm repeats must be >= 3 (p10/p90 need them)"),
        ]
        for ok, message in checks:
            if not ok:
                raise BnexportError(f"tune: {message}")
        check_count(self.batch_size, "--batch-size", maximum=MAX_DIM)
        check_threads(self.max_threads, "--threads")
        check_seconds(self.budget_s, "--budget", positive=True, maximum=MAX_BUDGET_S)
        check_count(self.screen_repeats, "--screen-repeats", maximum=MAX_REPEATS)
        check_count(self.confirm_repeats, "--repeats", minimum=3, maximum=MAX_REPEATS)
        check_count(self.finalists, "--finalists", maximum=MAX_REPEATS)
        check_seconds(self.min_time_s, "--min-time", positive=True)
        check_seconds(self.warmup_s, "--warmup")
        check_seconds(self.cooldown_s, "--cooldown")
        check_seed(self.seed)
        for key in self.fixed:
            check_carriable(key)
        fixed_settings(self.fixed)  # values valid?

    def timing(self, repeats: int) -> TimingConfig:
        """The timing core's config for a stage of ``repeats`` rounds."""
        return TimingConfig(repeats, self.warmup_s, self.min_time_s, self.cooldown_s)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fixed_settings(fixed: Mapping[str, Any]) -> dict[str, Any]:
    """``--fix`` values as `OrtSettings` field values (levels/modes by name or integer code; session
    config entries, ``session.*``, as strings under ``session_config_entries``)."""
    levels = {str(v): k for k, v in OPT_LEVEL_CODES.items()} | {k: k for k in OPT_LEVEL_CODES}
    modes = {str(v): k for k, v in EXECUTION_MODE_CODES.items()} | {
        k: k for k in EXECUTION_MODE_CODES
    }
    out: dict[str, Any] = {}
    entries: dict[str, str] = {}
    for key, raw in fixed.items():
        check_carriable(key)
        text = str(raw).strip()
        if key.startswith(SESSION_ENTRY_PREFIX):
            if not text:
                raise BnexportError(f"--fix {key}=: give the entry's value, e.g. {key}=1")
            entries[key] = text
        elif key == "graph_optimization_level":
            if text not in levels:
                raise BnexportError(f"{key}={raw!r}: choose one of {sorted(levels)}")
            out[key] = levels[text]
        elif key == "execution_mode":
            if text not in modes:
                raise BnexportError(f"{key}={raw!r}: choose one of {sorted(modes)}")
            out[key] = modes[text]
        else:
            try:
                value = int(text)
            except ValueError:
                raise BnexportError(f"{key}={raw!r} must be an integer >= 0") from None
            check_threads(value, f"--fix {key}=", allow_zero=True)  # 0: onnxruntime picks
            out[key] = value
    if entries:
        out["session_config_entries"] = tuple(sorted(entries.items()))
    return out


@dataclass(frozen=True)
class CandidateResult:
    """One setting measured against onnxruntime's defaults on the input file (> 1: faster)."""

    settings: OrtSettings
    stage: str  # "screen" or "confirm"
    ratio: Ratio
    median_s: float
    effective: OrtSettings | None = None  # read back from the session (confirm stage)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "settings": self.settings.to_dict(),
            "label": self.settings.label(),
            "stage": self.stage,
            "ratio": self.ratio.to_dict(),
            "median_s": self.median_s,
        }
        if self.effective is not None:
            d["effective"] = self.effective.to_dict()
        return d


@dataclass(frozen=True)
class Decision:
    """The pick: which setting, whether it is faster beyond noise, and the noise band used."""

    settings: OrtSettings
    faster: bool
    band: tuple[float, float]
    reason: str
    ratio: Ratio | None  # the picked finalist's ratio (None: defaults, nothing measured beat them)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings.to_dict(),
            "label": self.settings.label(),
            "faster_beyond_noise": self.faster,
            "noise_band": list(self.band),
            "reason": self.reason,
            "ratio": None if self.ratio is None else self.ratio.to_dict(),
        }


@dataclass(frozen=True)
class ParityResult:
    """The tuned file's outputs vs the input model (`check`'s noise-relative rule)."""

    passed: bool
    error: float
    noise: float
    limit: float
    output: str
    samples: int
    truth: str
    reference: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TuneReport:
    """Everything `tune_model` measured and decided; ``record`` is what the file carries."""

    model: str
    output: str | None
    config: TuneConfig
    screen: tuple[CandidateResult, ...]
    confirm: tuple[CandidateResult, ...]
    control: Ratio
    decision: Decision
    parity: ParityResult | None
    rejected: tuple[str, ...]
    warnings: tuple[str, ...]
    plan: dict[str, Any]
    record: dict[str, Any]
    environment: dict[str, Any]
    seconds: float

    @property
    def passed(self) -> bool:
        return self.parity is not None and self.parity.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "output": self.output,
            "config": self.config.to_dict(),
            "plan": self.plan,
            "screen": [r.to_dict() for r in self.screen],
            "confirm": [r.to_dict() for r in self.confirm],
            "control": self.control.to_dict(),
            "decision": self.decision.to_dict(),
            "parity": None if self.parity is None else self.parity.to_dict(),
            "rejected": list(self.rejected),
            "warnings": list(self.warnings),
            "record": self.record,
            "environment": self.environment,
            "seconds": self.seconds,
        }
