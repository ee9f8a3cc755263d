"""Deployment tuning: measure the onnxruntime settings an ONNX file should carry, and carry them.

`tune_model` searches the session options onnxruntime reads from a model's ``ort_config``
(`bnexport.ort_config.CARRIED_KEYS`: intra-op threads, graph optimization level, execution mode)
at one target batch size, and writes a copy of the file whose ``ort_config`` holds the fastest
setting, plus a ``bnexport_tune`` metadata record of the measurement. Nothing else changes: the
copy's bytes differ from the input's only in ``metadata_props``.

Method (bench's timing: `bnexport.bench.measure_interleaved`, interleaved rounds in a balanced
Latin square, a cool-down before each timing, ratios paired within a round):

1. **screen** every candidate setting, in-process (onnxruntime's default options plus the
   candidate's keys: what onnxruntime builds from an ``ort_config``), a few rounds, ratio against
   onnxruntime's defaults on the input file;
2. **confirm** the best ``finalists``: each is written to a temporary copy with its ``ort_config``
   and opened the way a deployer opts in (``ORT_LOAD_CONFIG_FROM_MODEL=1``, default
   ``SessionOptions``); each session's effective options are read back (a key onnxruntime ignored
   is an error). A copy carrying onnxruntime's *defaults* runs beside them as the *control*: the
   same computation as the reference, so its paired ratio is this run's noise band;
3. **pick** (:func:`pick`): the fastest finalist whose median ratio is above the control's p90
   (faster beyond noise) and whose p10 is not below the control's p10 (not slower beyond noise);
   none: onnxruntime's defaults;
4. **parity**: the picked file's outputs against the input model, with `check`'s noise-relative
   rule (`bnexport.parity.tolerance.NoiseTolerance`). An arbitrary ONNX file has no float64 model,
   so the *truth* is the input run as written (graph optimizations disabled), the *reference*
   (fp32's own error) the input under onnxruntime's defaults; a failing finalist is dropped.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnexport import __version__
from bnexport.bench import (
    BenchConfig,
    BenchEvent,
    Ratio,
    collect_environment,
    measure_interleaved,
    paired_ratio,
)
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
from bnexport.machine import cpu_flags, cpu_model, cpus_available, load_average
from bnexport.ort_config import (
    CARRIED_KEYS,
    EXECUTION_MODE_CODES,
    LOAD_CONFIG_ENV,
    OPT_LEVEL_CODES,
    ORT_CONFIG_KEY,
    SESSION_OPTIONS_KEY,
    OrtSettings,
    check_carriable,
    effective_settings,
    open_with_model_config,
    read_ort_config,
    with_metadata,
)

if TYPE_CHECKING:
    import numpy as np
    import onnx

TUNE_RECORD_KEY = "bnexport_tune"
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
PARITY_MIN_SAMPLES = 16  # parity feeds at least this many samples, in batches of the target size

Progress = Callable[[BenchEvent], None]


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
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (
                self.max_threads is None or self.max_threads >= 1,
                f"threads must be >= 1, got {self.max_threads}",
            ),
            (self.provider in ("cpu", "cuda"), f"provider {self.provider!r}: cpu or cuda"),
            (self.budget_s > 0, f"budget must be > 0 s, got {self.budget_s}"),
            (self.screen_repeats >= 1, f"screen repeats must be >= 1, got {self.screen_repeats}"),
            (self.confirm_repeats >= 3, "confirm repeats must be >= 3 (p10/p90 need them)"),
            (self.finalists >= 1, f"finalists must be >= 1, got {self.finalists}"),
            (self.min_time_s > 0, f"min time must be > 0 s, got {self.min_time_s}"),
            (self.warmup_s >= 0 and self.cooldown_s >= 0, "warmup and cooldown must be >= 0 s"),
        ]
        for ok, message in checks:
            if not ok:
                raise BnexportError(f"tune: {message}")
        for key in self.fixed:
            check_carriable(key)
        fixed_settings(self.fixed)  # values valid?

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


# --------------------------------------------------------------------------------------------
# Candidates and the pick (pure)


def fixed_settings(fixed: Mapping[str, Any]) -> dict[str, Any]:
    """``--fix`` values as `OrtSettings` field values (levels/modes by name or integer code)."""
    levels = {str(v): k for k, v in OPT_LEVEL_CODES.items()} | {k: k for k in OPT_LEVEL_CODES}
    modes = {str(v): k for k, v in EXECUTION_MODE_CODES.items()} | {
        k: k for k in EXECUTION_MODE_CODES
    }
    out: dict[str, Any] = {}
    for key, raw in fixed.items():
        check_carriable(key)
        text = str(raw).strip()
        if key == "graph_optimization_level":
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
            if value < 0:
                raise BnexportError(f"{key}={raw!r} must be an integer >= 0")
            out[key] = value
    return out


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
    CUDA, where onnxruntime forces sequential execution).
    """
    pinned = fixed_settings(fixed or {})
    out = [OrtSettings(**pinned)]
    for threads in thread_counts(max_threads):
        for level in GRAPH_LEVELS:
            level_: Any = level
            out.append(OrtSettings(intra_op_num_threads=threads, graph_optimization_level=level_))
    if provider != "cuda":
        out.append(OrtSettings(execution_mode="parallel"))
    seen: list[OrtSettings] = []
    for s in out:
        s = replace(s, **pinned)
        if s not in seen:
            seen.append(s)
    return seen


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


# --------------------------------------------------------------------------------------------
# Model I/O


@dataclass(frozen=True)
class _Input:
    name: str
    shape: tuple[int, ...]  # without the batch dimension
    dtype: Any


def load_model(path: Path) -> onnx.ModelProto:
    """The input file (external data left on disk), with its ``ort_config`` validated."""
    import onnx

    if not path.is_file():
        raise BnexportError(f"ONNX model {path} not found; check the path")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise BnexportError(f"{path} is not an ONNX model: {' '.join(str(exc).split())}") from None
    read_ort_config(model, str(path))
    return model


def has_external_data(model: onnx.ModelProto) -> bool:
    """Whether any initializer keeps its bytes in a separate file."""
    import onnx

    return any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
    ) or any(
        a.t.data_location == onnx.TensorProto.EXTERNAL
        for n in model.graph.node
        for a in n.attribute
        if a.HasField("t")
    )


def check_output_path(model_path: Path, output: Path, external: bool) -> None:
    """Refuse the input itself, an unwritable place, or one where external data won't resolve."""
    if output.resolve() == model_path.resolve():
        raise BnexportError(
            f"-o {output} is the input file; write the tuned copy elsewhere (the input stays "
            "untouched so the two can be compared)"
        )
    if output.exists() and output.is_dir():
        raise BnexportError(f"-o {output} is a directory; give a file name (e.g. tuned.onnx)")
    parent = output.parent if str(output.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise BnexportError(f"cannot write {output}: {parent} is not writable")
    if external and parent.resolve() != model_path.parent.resolve():
        raise BnexportError(
            f"{model_path} keeps its weights in external data files, which onnxruntime resolves "
            f"next to the .onnx file; write the tuned copy into {model_path.parent} (-o "
            f"{model_path.parent / output.name}) or copy the data files beside {output}"
        )


def model_inputs(session: Any, batch_size: int, where: str) -> list[_Input]:
    """The inputs to feed at ``batch_size``: the first axis is the batch, the rest concrete."""
    from bnexport.parity.inputs import TensorSpec

    inputs = []
    for node in session.get_inputs():
        spec = TensorSpec.from_ort(node)
        if not spec.shape:
            raise BnexportError(
                f"{where}: input {spec.name!r} is a scalar; tune needs a batch axis on every input"
            )
        if spec.shape[0] is not None and spec.shape[0] != batch_size:
            raise BnexportError(
                f"{where}: input {spec.name!r} has a fixed batch of {spec.shape[0]}, not "
                f"--batch-size {batch_size}; tune at {spec.shape[0]} or re-export with a dynamic "
                "batch axis"
            )
        if any(d is None for d in spec.shape[1:]):
            raise BnexportError(
                f"{where}: input {spec.describe()} has symbolic dimensions besides the batch; "
                "tune needs concrete shapes (re-export with fixed sizes, e.g. bnexport onnx "
                "--input-shape)"
            )
        inputs.append(_Input(spec.name, tuple(int(d) for d in spec.shape[1:]), spec.dtype))
    return inputs


def make_feeds(inputs: Sequence[_Input], count: int, seed: int) -> dict[str, np.ndarray]:
    """``count`` seeded samples per input (`bnexport.parity.inputs.random_inputs`)."""
    from bnexport.parity.inputs import random_inputs

    shapes = {i.name: i.shape for i in inputs}
    dtypes = {i.name: i.dtype for i in inputs}
    return random_inputs(shapes, dtypes, count, seed).arrays


# --------------------------------------------------------------------------------------------
# Sessions and timing


class FeedRunner:
    """A session fed a fixed dict of inputs (`bnexport.bench.Runner`; the batch is the feed)."""

    def __init__(self, name: str, session: Any) -> None:
        self.name = name
        self.session = session

    def prepare(self, batch: Any) -> Callable[[], Any]:
        feed = dict(batch)
        run = self.session.run

        def call() -> Any:
            return run(None, feed)

        return call


def _providers(provider: str) -> list[Any]:
    from bnexport.ort import DEFAULT_CUDA_OPTIONS, PROVIDER_NAMES

    if provider == "cuda":
        return [(PROVIDER_NAMES["cuda"], dict(DEFAULT_CUDA_OPTIONS)), PROVIDER_NAMES["cpu"]]
    return [PROVIDER_NAMES["cpu"]]


def _session(path: Path, settings: OrtSettings | None, provider: str) -> Any:
    """In-process session: onnxruntime's defaults (``settings=None``) or defaults + the keys."""
    import onnxruntime as ort

    so = (settings or OrtSettings()).session_options()
    if os.environ.get(LOAD_CONFIG_ENV) == "1":
        raise BnexportError(
            f"{LOAD_CONFIG_ENV}=1 is set in this environment: onnxruntime would replace the "
            "reference sessions' options by the file's own; unset it for bnexport tune"
        )
    sess = ort.InferenceSession(str(path), so, providers=_providers(provider))
    _check_provider(sess, provider)
    return sess


def _check_provider(session: Any, provider: str) -> None:
    from bnexport.errors import ProviderUnavailableError
    from bnexport.ort import PROVIDER_NAMES

    got = session.get_providers()
    if not got or got[0] != PROVIDER_NAMES[provider]:
        raise ProviderUnavailableError(
            f"the session runs on {got[0] if got else 'nothing'}, not {PROVIDER_NAMES[provider]}; "
            "refusing a silent fallback"
        )


def _per_call(session: Any, feed: Mapping[str, Any]) -> float:
    """Seconds of one call (best of three, after one warm-up call)."""
    session.run(None, dict(feed))
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        session.run(None, dict(feed))
        best = min(best, time.perf_counter() - t0)
    return best


def _bench_config(config: TuneConfig, repeats: int) -> BenchConfig:
    return BenchConfig(
        batch_sizes=(config.batch_size,),
        warmup_s=config.warmup_s,
        repeats=repeats,
        min_time_s=config.min_time_s,
        cooldown_s=config.cooldown_s,
        threads=None,
        include_cuda=False,
    )


def _measure(
    runners: Sequence[FeedRunner],
    feed: Mapping[str, Any],
    config: TuneConfig,
    repeats: int,
    stage: str,
    progress: Progress | None,
) -> dict[str, list[float]]:
    """bench's interleaved, paired, cooled-down timing; ``{runner name: seconds per call}``."""

    def relay(event: BenchEvent) -> None:
        if progress is not None:
            progress(BenchEvent(stage, event.done, event.total, event.message))

    raw = measure_interleaved(
        runners,  # type: ignore[arg-type]
        {config.batch_size: feed},  # type: ignore[dict-item]
        _bench_config(config, repeats),
        relay,
    )
    return {name: times for (name, _), (times, _) in raw.items()}


# --------------------------------------------------------------------------------------------
# The run


def tune_model(
    model_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    config: TuneConfig | None = None,
    progress: Progress | None = None,
) -> TuneReport:
    """Measure the best carried onnxruntime settings for ``model_path`` and write ``output``.

    ``output`` is written (atomically) only when the picked file passes the parity check.
    Never prints; progress goes to ``progress``. Raises `BnexportError` for bad input.
    """
    config = config or TuneConfig()
    model_path, output = Path(model_path), Path(output)
    started = time.perf_counter()
    load_before = load_average()
    s = _prepare(model_path, output, config, progress)
    defaults = s.candidates[0]
    screen = _screen(model_path, s.candidates, s.reference, s.feed, config, s.plan, progress)
    finalists = _finalists(screen, defaults, config.finalists)
    work = output.parent if has_external_data(s.model) else None
    with _copies(s.model, model_path, output, [defaults, *finalists], work) as files:
        confirm, control = _confirm(files, s.reference, s.feed, config, s.plan, progress)
        decision, parity, rejected = _decide_and_check(
            confirm, control, defaults, files, model_path, s.reference, s.inputs, config, progress
        )
        record = _record(model_path, config, s.plan, decision, control, load_before)
        written: str | None = None
        if parity is not None and parity.passed:
            _event(progress, "write", str(output))
            _write(files[decision.settings], output, record)
            written = str(output)
    environment = collect_environment(load_before=load_before)
    return TuneReport(
        model=str(model_path),
        output=written,
        config=config,
        screen=tuple(screen),
        confirm=tuple(confirm),
        control=control,
        decision=decision,
        parity=parity,
        rejected=tuple(rejected),
        warnings=tuple(
            busy_warnings(load_before, environment["load_average_after"], cpus_available())
        ),
        plan=s.plan,
        record=record,
        environment=environment,
        seconds=time.perf_counter() - started,
    )


@dataclass(frozen=True)
class _Setup:
    """The loaded input, onnxruntime's defaults on it (the reference), the timing feed, the
    settings to try (onnxruntime's defaults first) and the repeats that fit the budget."""

    model: onnx.ModelProto
    reference: Any
    inputs: list[_Input]
    feed: dict[str, np.ndarray]
    candidates: list[OrtSettings]
    plan: dict[str, Any]


def _prepare(
    model_path: Path, output: Path, config: TuneConfig, progress: Progress | None
) -> _Setup:
    """Load and check the input and the output path, open the reference, plan the search."""
    model = load_model(model_path)
    check_output_path(model_path, output, has_external_data(model))
    if config.provider == "cuda":
        _require_cuda()
    _event(progress, "load", f"{model_path.name}: {len(model.graph.node)} nodes")

    reference = _session(model_path, None, config.provider)
    inputs = model_inputs(reference, config.batch_size, str(model_path))
    feed = make_feeds(inputs, config.batch_size, config.seed)
    max_threads = config.max_threads or cpus_available()
    candidates = candidate_settings(max_threads, config.fixed, config.provider)
    per_call = _per_call(reference, feed)
    n_confirm = min(config.finalists, len(candidates) - 1) + 2
    plan = plan_repeats(per_call, len(candidates) + 1, n_confirm, config)
    return _Setup(model, reference, inputs, feed, candidates, plan)


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


def _event(
    progress: Progress | None, stage: str, message: str, done: int = 0, total: int = 1
) -> None:
    if progress is not None:
        progress(BenchEvent(stage, done, total, message))


def _screen(
    path: Path,
    candidates: Sequence[OrtSettings],
    reference: Any,
    feed: Mapping[str, Any],
    config: TuneConfig,
    plan: Mapping[str, Any],
    progress: Progress | None,
) -> list[CandidateResult]:
    """Every candidate in-process against the defaults, ``plan['screen_repeats']`` rounds."""
    repeats = plan["screen_repeats"]
    _event(
        progress,
        "screen",
        f"{len(candidates)} settings × {repeats} rounds at batch "
        f"{config.batch_size} (~{plan['estimated_s']:.0f} s of timing in all)",
    )
    runners = [FeedRunner("reference", reference)]
    runners += [
        FeedRunner(f"c{i}", _session(path, s, config.provider)) for i, s in enumerate(candidates)
    ]
    times = _measure(runners, feed, config, repeats, "screen", progress)
    ref = times["reference"]
    return [
        CandidateResult(
            s, "screen", paired_ratio(ref, times[f"c{i}"]), statistics.median(times[f"c{i}"])
        )
        for i, s in enumerate(candidates)
    ]


def _finalists(
    screen: Sequence[CandidateResult], defaults: OrtSettings, count: int
) -> list[OrtSettings]:
    """The ``count`` best screened settings other than the defaults (by median ratio)."""
    ranked = sorted(
        (r for r in screen if r.settings != defaults), key=lambda r: r.ratio.median, reverse=True
    )
    return [r.settings for r in ranked[:count]]


@contextmanager
def _copies(
    model: onnx.ModelProto,
    model_path: Path,
    output: Path,
    settings: Sequence[OrtSettings],
    work: Path | None,
) -> Iterator[dict[OrtSettings, Path]]:
    """A temporary copy of the model per setting, its ``ort_config`` set; removed afterwards.

    ``work``: the folder for them (the input's, when external data must resolve); else a
    temporary folder.
    """
    import tempfile

    tmp = None if work is not None else tempfile.TemporaryDirectory(prefix="bnexport-tune-")
    folder = work if work is not None else Path(tmp.name)  # type: ignore[union-attr]
    files: dict[OrtSettings, Path] = {}
    try:
        for i, s in enumerate(settings):
            path = folder / f".{output.stem}.tune-{os.getpid()}-{i}.onnx"
            path.write_bytes(with_ort_config(model, s).SerializeToString())
            files[s] = path
        yield files
    finally:
        for path in files.values():
            path.unlink(missing_ok=True)
        if tmp is not None:
            tmp.cleanup()


def with_ort_config(
    model: onnx.ModelProto, settings: OrtSettings, record: Mapping[str, Any] | None = None
) -> onnx.ModelProto:
    """``model`` with ``ort_config`` carrying ``settings`` (other top-level keys of an existing
    ``ort_config`` kept) and, if given, the ``bnexport_tune`` record."""
    existing = read_ort_config(model, "the model") or {}
    config = {**existing, SESSION_OPTIONS_KEY: settings.session_options_json()}
    entries = {ORT_CONFIG_KEY: json.dumps(config, sort_keys=True)}
    if record is not None:
        entries[TUNE_RECORD_KEY] = json.dumps(record, sort_keys=True)
    return with_metadata(model, entries)


def _confirm(
    files: Mapping[OrtSettings, Path],
    reference: Any,
    feed: Mapping[str, Any],
    config: TuneConfig,
    plan: Mapping[str, Any],
    progress: Progress | None,
) -> tuple[list[CandidateResult], Ratio]:
    """The finalists' files opened as a deployer opts in, the defaults copy as the control."""
    repeats = plan["confirm_repeats"]
    settings = list(files)
    _event(
        progress,
        "confirm",
        f"{len(settings) - 1} finalists + control × {repeats} rounds, "
        f"opened with {LOAD_CONFIG_ENV}=1",
    )
    sessions = {s: open_with_model_config(files[s], _providers(config.provider)) for s in settings}
    for s, sess in sessions.items():
        _check_provider(sess, config.provider)
        _check_effective(s, sess, files[s])
    runners = [FeedRunner("reference", reference)]
    runners += [FeedRunner(f"f{i}", sessions[s]) for i, s in enumerate(settings)]
    times = _measure(runners, feed, config, repeats, "confirm", progress)
    ref = times["reference"]
    control = paired_ratio(ref, times["f0"])
    results = [
        CandidateResult(
            s,
            "confirm",
            paired_ratio(ref, times[f"f{i}"]),
            statistics.median(times[f"f{i}"]),
            effective_settings(sessions[s]),
        )
        for i, s in enumerate(settings)
        if i > 0
    ]
    return results, control


def _check_effective(settings: OrtSettings, session: Any, path: Path) -> None:
    """Every key written must be what the session uses (onnxruntime honoured the ort_config)."""
    got = effective_settings(session)
    wrong = {
        k: (getattr(settings, k), getattr(got, k))
        for k in CARRIED_KEYS
        if getattr(settings, k) != getattr(got, k)
    }
    if wrong:
        detail = ", ".join(f"{k}: wrote {a!r}, session uses {b!r}" for k, (a, b) in wrong.items())
        raise BnexportError(
            f"onnxruntime did not apply {path.name}'s ort_config ({detail}); this onnxruntime "
            f"build does not read settings from the model (a minimal build?), so tune cannot "
            "carry them"
        )


def _decide_and_check(
    confirm: Sequence[CandidateResult],
    control: Ratio,
    defaults: OrtSettings,
    files: Mapping[OrtSettings, Path],
    model_path: Path,
    reference: Any,
    inputs: Sequence[_Input],
    config: TuneConfig,
    progress: Progress | None,
) -> tuple[Decision, ParityResult | None, list[str]]:
    """Pick; check the pick's outputs; drop a failing pick and pick again (defaults last)."""
    rejected: list[str] = []
    left = list(confirm)
    while True:
        decision = pick(left, control, defaults)
        _event(progress, "parity", f"{decision.settings.label()} vs the input model")
        parity = check_outputs(files[decision.settings], model_path, reference, inputs, config)
        if parity.passed or decision.settings == defaults:
            return decision, parity, rejected
        rejected.append(
            f"{decision.settings.label()}: outputs off by {parity.error:.3g} (limit "
            f"{parity.limit:.3g}, relative to the sample scale)"
        )
        left = [r for r in left if r.settings != decision.settings]


def check_outputs(
    tuned: Path, untuned: Path, reference: Any, inputs: Sequence[_Input], config: TuneConfig
) -> ParityResult:
    """The tuned file (opened with its ``ort_config``) vs the input model, `check`'s noise rule.

    Truth: the model as written (graph optimizations disabled); reference: onnxruntime's
    defaults (fp32's own error is ``N`` = reference vs truth); candidate error ``E`` against the
    truth; pass ⇔ ``E ≤ factor · max(N, floor_ulps · eps)`` per output
    (`bnexport.parity.tolerance.NoiseTolerance`).
    """
    count = max(PARITY_MIN_SAMPLES, config.batch_size)
    count = math.ceil(count / config.batch_size) * config.batch_size
    feeds = make_feeds(inputs, count, config.seed + 1)
    truth_session = _session(
        untuned, OrtSettings(graph_optimization_level="disabled"), config.provider
    )
    tuned_session = open_with_model_config(tuned, _providers(config.provider))
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

    from bnexport.parity.compare import compare_output
    from bnexport.parity.tolerance import NoiseTolerance

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


def _record(
    model_path: Path,
    config: TuneConfig,
    plan: Mapping[str, Any],
    decision: Decision,
    control: Ratio,
    load_before: list[float] | None,
) -> dict[str, Any]:
    """The ``bnexport_tune`` metadata: the measurement behind the carried settings."""
    import platform

    import onnxruntime as ort

    from bnexport.files import sha256_file

    return {
        "tool": f"bnexport tune {__version__}",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "input_sha256": sha256_file(model_path),
        "batch_size": config.batch_size,
        "provider": config.provider,
        "settings": decision.settings.to_dict(),
        "faster_beyond_noise": decision.faster,
        "ratio": None if decision.ratio is None else decision.ratio.to_dict(),
        "control": control.to_dict(),
        "noise_band": list(decision.band),
        "reference": "onnxruntime defaults (SessionOptions()) on the untuned file; ratio > 1: "
        "the tuned file, opened with ORT_LOAD_CONFIG_FROM_MODEL=1, is faster (paired, median "
        "and p10-p90)",
        "repeats": {"screen": plan["screen_repeats"], "confirm": plan["confirm_repeats"]},
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_flags": cpu_flags(),
            "logical_cpus": os.cpu_count(),
            "cpus_available": cpus_available(),
            "platform": platform.platform(),
        },
        "onnxruntime": ort.__version__,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "opt_in": f"{LOAD_CONFIG_ENV}=1",
    }


def _write(tuned_copy: Path, output: Path, record: Mapping[str, Any]) -> None:
    """The measured copy plus the record, written atomically to ``output``."""
    import onnx

    from bnexport.files import atomic_path

    model = onnx.load(str(tuned_copy), load_external_data=False)
    final = with_metadata(model, {TUNE_RECORD_KEY: json.dumps(record, sort_keys=True)})
    with atomic_path(output) as tmp:
        tmp.write_bytes(final.SerializeToString())


def read_record(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``bnexport_tune`` record of a tuned file (None: not tuned by bnexport)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == TUNE_RECORD_KEY:
            return json.loads(prop.value)
    return None


def _require_cuda() -> None:
    from bnexport.errors import ProviderUnavailableError
    from bnexport.ort import probe_cuda

    probe = probe_cuda()
    if not probe.available:
        raise ProviderUnavailableError(f"--providers cuda: CUDA does not run here: {probe.reason}")
