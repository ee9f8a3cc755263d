"""`tune_model`: one tuning run, from an ONNX file to a `TuneReport` and a tuned copy.

Stages: load (the input, its output path, the reference session, the plan), screen (every
candidate in-process), confirm (the finalists' files as a deployer opens them, beside a control),
pick and check (`bnexport.tune.check`), write.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnexport.errors import BnexportError
from bnexport.files import discard, failed_path, json_text, write_files
from bnexport.machine import cpus_available, load_average
from bnexport.ort_config import (
    CARRIED_KEYS,
    LOAD_CONFIG_ENV,
    OrtSettings,
    effective_settings,
    read_ort_config,
)
from bnexport.progress import Progress, ProgressEvent
from bnexport.timing import Ratio, collect_environment, paired_ratio
from bnexport.tune.carry import carried_copies, check_tune_output, tune_record, write_tuned
from bnexport.tune.check import check_outputs
from bnexport.tune.config import CandidateResult, Decision, ParityResult, TuneConfig, TuneReport
from bnexport.tune.inputs import ModelInput, check_feed_memory, make_feeds, model_inputs
from bnexport.tune.search import (
    busy_warnings,
    candidate_settings,
    finalists,
    pick,
    plan_repeats,
)
from bnexport.tune.sessions import (
    first_call,
    measure,
    runner,
    settings_session,
    tuned_session,
)

if TYPE_CHECKING:
    import numpy as np
    import onnx


def tune_model(
    model_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    config: TuneConfig | None = None,
    progress: Progress | None = None,
    *,
    json_path: str | os.PathLike[str] | None = None,
    keep_failed: bool = False,
) -> TuneReport:
    """Measure the best carried onnxruntime settings for ``model_path`` and write ``output``.

    ``output`` (and ``json_path``, the report as JSON) are checked before any work and written
    all or nothing, only when the picked file passes the parity check. When it fails, nothing is
    left at ``output`` (a file there is removed: it is not this run's result); with
    ``keep_failed`` the failing file is written to `bnexport.files.failed_path` (``output`` with
    ``.failed`` before its suffix). Never prints; progress goes to ``progress``. Raises
    `BnexportError` for bad input.
    """
    config = config or TuneConfig()
    model_path, output = Path(model_path), Path(output)
    started = time.perf_counter()
    load_before = load_average()
    s = _prepare(model_path, output, json_path, keep_failed, config, progress)
    defaults = s.candidates[0]
    screen = _screen(model_path, s.candidates, s.reference, s.feed, config, s.plan, progress)
    chosen = finalists(screen, defaults, config.finalists)
    work = output.parent if s.external else None
    with carried_copies(s.model, output, [defaults, *chosen], work) as files:
        confirm, control = _confirm(files, s.reference, s.feed, config, s.plan, progress)
        decision, parity, rejected = _decide_and_check(
            confirm, control, defaults, files, model_path, s.reference, s.inputs, config, progress
        )
        record = tune_record(model_path, config, s.plan, decision, control, load_before)
        passed = parity is not None and parity.passed
        target = output if passed else failed_path(output) if keep_failed else None
        environment = collect_environment(load_before=load_before)
        report = TuneReport(
            model=str(model_path),
            output=None if target is None else str(target),
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
        _event(progress, "write", str(target) if target is not None else "nothing (parity failed)")
        _write(report, files[decision.settings], output, target, json_path)
    return report


def _write(
    report: TuneReport,
    tuned_copy: Path,
    output: Path,
    target: Path | None,
    json_path: str | os.PathLike[str] | None,
) -> None:
    """The tuned file (at ``target``: ``output``, the failed name, or nowhere) and the JSON
    report, all or nothing; after a failed check nothing is left at ``output``."""
    writers: dict[str | os.PathLike[str], Any] = {}
    if target is not None:
        writers[target] = lambda tmp: write_tuned(tuned_copy, tmp, report.record)
    if json_path is not None:
        writers[json_path] = lambda tmp: tmp.write_text(json_text(report.to_dict()))
    write_files(writers)
    if target != output:
        discard(output)


@dataclass(frozen=True)
class _Setup:
    """The loaded input (and whether it keeps external data), onnxruntime's defaults on it (the
    reference), the timing feed, the settings to try (onnxruntime's defaults first) and the
    repeats that fit the budget."""

    model: onnx.ModelProto
    external: bool
    reference: Any
    inputs: list[ModelInput]
    feed: dict[str, np.ndarray]
    candidates: list[OrtSettings]
    plan: dict[str, Any]


def _prepare(
    model_path: Path,
    output: Path,
    json_path: str | os.PathLike[str] | None,
    keep_failed: bool,
    config: TuneConfig,
    progress: Progress | None,
) -> _Setup:
    """Check the input (`bnexport.onnx_file.check_onnx_model`) and the output paths, open the
    reference, size the feed against the memory, run it once, plan the search: every refusal
    comes before the first progress event."""
    from bnexport.onnx_file import check_onnx_model, external_data_files

    model = check_onnx_model(model_path)
    read_ort_config(model, str(model_path))  # bad JSON: refused before any work
    data_files = external_data_files(model_path)
    failed = failed_path(output) if keep_failed else None
    check_tune_output(
        model_path, output, data_files, {"--json": json_path, "--keep-failed": failed}
    )
    if config.provider == "cuda":
        _require_cuda()

    reference = settings_session(model_path, None, config.provider)
    inputs = model_inputs(reference, config.batch_size, str(model_path))
    check_feed_memory(inputs, config.batch_size)
    feed = make_feeds(inputs, config.batch_size, config.seed)
    call_s = first_call(reference, feed, model_path)
    max_threads = config.max_threads or cpus_available()
    candidates = candidate_settings(max_threads, config.fixed, config.provider)
    n_confirm = min(config.finalists, len(candidates) - 1) + 2
    plan = plan_repeats(call_s, len(candidates) + 1, n_confirm, config)
    _event(progress, "load", f"{model_path.name}: {len(model.graph.node)} nodes")
    return _Setup(model, bool(data_files), reference, inputs, feed, candidates, plan)


def _event(
    progress: Progress | None, stage: str, message: str, done: int = 0, total: int = 1
) -> None:
    if progress is not None:
        progress(ProgressEvent(stage, done, total, message))


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
    runners = [runner("reference", reference)]
    runners += [
        runner(f"c{i}", settings_session(path, s, config.provider))
        for i, s in enumerate(candidates)
    ]
    times = measure(runners, feed, config, repeats, "screen", progress)
    ref = times["reference"]
    return [
        CandidateResult(
            s, "screen", paired_ratio(ref, times[f"c{i}"]), statistics.median(times[f"c{i}"])
        )
        for i, s in enumerate(candidates)
    ]


def _confirm(
    files: Mapping[OrtSettings, Path],
    reference: Any,
    feed: Mapping[str, Any],
    config: TuneConfig,
    plan: Mapping[str, Any],
    progress: Progress | None,
) -> tuple[list[CandidateResult], Ratio]:
    """The finalists' files opened as their user opens them (`tuned_session`), the defaults copy
    as the control."""
    repeats = plan["confirm_repeats"]
    settings = list(files)
    how = f"with {LOAD_CONFIG_ENV}=1"
    if any(s.session_config_entries for s in settings):
        how = "as deployed (ort_config + session entries)"  # `tuned_session`
    rounds = f"{len(settings) - 1} finalists + control × {repeats} rounds"
    _event(progress, "confirm", f"{rounds}, opened {how}")
    sessions = {s: tuned_session(files[s], config.provider) for s in settings}
    for s, sess in sessions.items():
        _check_effective(s, sess, files[s])
    runners = [runner("reference", reference)]
    runners += [runner(f"f{i}", sessions[s]) for i, s in enumerate(settings)]
    times = measure(runners, feed, config, repeats, "confirm", progress)
    ref = times["reference"]
    control = paired_ratio(ref, times["f0"])
    results = [
        CandidateResult(
            s,
            "confirm",
            paired_ratio(ref, times[f"f{i}"]),
            statistics.median(times[f"f{i}"]),
            effective_settings(sessions[s], s.entries),
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
    inputs: Sequence[ModelInput],
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


def _require_cuda() -> None:
    from bnexport.errors import ProviderUnavailableError
    from bnexport.ort import probe_cuda

    probe = probe_cuda()
    if not probe.available:
        raise ProviderUnavailableError(f"--providers cuda: CUDA does not run here: {probe.reason}")
