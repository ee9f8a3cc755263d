"""tune's sessions (all from `bnexport.ort.make_session`) and their timing (`bnexport.timing`).

Two ways to open a file: in-process, onnxruntime's defaults plus a setting's carried keys and
entries (what onnxruntime builds from an ``ort_config``: the screen, the reference, the truth),
and as its user opens the tuned file (`tuned_session`: the confirm stage, the tuned file's check).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnexport.ort import ORT_DEFAULTS, SessionConfig, make_session
from bnexport.ort_config import OrtSettings
from bnexport.progress import Progress, ProgressEvent
from bnexport.timing import measure_interleaved

if TYPE_CHECKING:
    import onnxruntime

    from bnexport.runners import OnnxRuntimeRunner
    from bnexport.tune.config import TuneConfig


def _defaults(provider: str) -> SessionConfig:
    return replace(ORT_DEFAULTS, provider=provider)  # type: ignore[arg-type]


def settings_session(
    path: Path, settings: OrtSettings | None, provider: str
) -> onnxruntime.InferenceSession:
    """In-process session: onnxruntime's defaults (``settings=None``) or defaults + the keys."""
    return make_session(path, _defaults(provider).carrying(settings or OrtSettings()))


def tuned_session(path: Path, provider: str) -> onnxruntime.InferenceSession:
    """``path`` opened as its user opens it: as a deployer opts in (onnxruntime's defaults plus
    its ``ort_config``, ``ORT_LOAD_CONFIG_FROM_MODEL=1``), or, when it carries session config
    entries (which onnxruntime never reads from a file), through bnexport's session factory as
    ``bnexport serve`` does (``file_settings="apply"`` over onnxruntime's defaults)."""
    from bnexport.ort_config import model_settings

    settings = model_settings(path)
    how = "apply" if settings is not None and settings.session_config_entries else "opt_in"
    return make_session(path, _defaults(provider), file_settings=how)


def runner(name: str, session: Any) -> OnnxRuntimeRunner:
    """A timing runner over ``session`` (`bnexport.runners.OnnxRuntimeRunner`)."""
    from bnexport.runners import OnnxRuntimeRunner

    return OnnxRuntimeRunner.wrap(session, name=name)


def first_call(session: Any, feed: Mapping[str, Any], path: Path) -> float:
    """`per_call`, with onnxruntime's failure to run the file (a shape its weights contradict, a
    kernel missing for a type) as a `BnexportError` naming the file."""
    from bnexport.errors import BnexportError, raise_if_interrupted

    try:
        return per_call(session, feed)
    except Exception as exc:
        raise_if_interrupted(exc)
        if type(exc).__module__.split(".")[0] != "onnxruntime":
            raise
        raise BnexportError(
            f"{path} cannot run on onnxruntime: {' '.join(str(exc).split())}; the file is "
            "broken, or needs other inputs than the random ones tune feeds: re-export it"
        ) from exc


def per_call(session: Any, feed: Mapping[str, Any]) -> float:
    """Seconds of one call (best of three, after one warm-up call)."""
    session.run(None, dict(feed))
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        session.run(None, dict(feed))
        best = min(best, time.perf_counter() - t0)
    return best


def measure(
    runners: Sequence[OnnxRuntimeRunner],
    feed: Mapping[str, Any],
    config: TuneConfig,
    repeats: int,
    stage: str,
    progress: Progress | None,
) -> dict[str, list[float]]:
    """The timing core's interleaved, paired, cooled-down timing; ``{runner name: seconds per
    call}``, progress reported under ``stage``."""

    def relay(event: ProgressEvent) -> None:
        if progress is not None:
            progress(replace(event, stage=stage))

    raw = measure_interleaved(runners, {config.batch_size: feed}, config.timing(repeats), relay)
    return {name: times for (name, _), (times, _) in raw.items()}
