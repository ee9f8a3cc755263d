"""What a tuned file carries: its ``ort_config``, the ``bnexport_tune`` record, and the writing.

The tuned copy differs from the input only in ``metadata_props``: ``ort_config`` (the settings
onnxruntime reads with ``ORT_LOAD_CONFIG_FROM_MODEL=1``), ``bnexport_session_config`` (session
config entries onnxruntime never reads from a file, applied by bnexport's session factory; only
when the pick has some) and ``bnexport_tune`` (the measurement behind them). The output path is
checked before any work and written atomically.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnexport import __version__
from bnexport.errors import OutputPathError
from bnexport.machine import cpu_flags, cpu_model, cpus_available, load_average
from bnexport.ort_config import (
    LOAD_CONFIG_ENV,
    ORT_CONFIG_KEY,
    SESSION_CONFIG_KEY,
    SESSION_OPTIONS_KEY,
    OrtSettings,
    read_ort_config,
    with_metadata,
)

if TYPE_CHECKING:
    import onnx

    from bnexport.timing import Ratio
    from bnexport.tune.config import Decision, TuneConfig

TUNE_RECORD_KEY = "bnexport_tune"


def check_tune_output(
    model_path: Path,
    output: Path,
    data_files: Sequence[Path],
    others: Mapping[str, str | os.PathLike[str] | None] | None = None,
) -> None:
    """``output`` and the ``others`` (``--json``, …) checked before any work
    (`bnexport.files.check_output_paths`: none is the input nor its ``data_files``, each a
    writable file), and, for a model with external data, ``output`` in the input's folder:
    onnxruntime resolves the data next to the .onnx file (`OutputPathError`)."""
    from bnexport.files import check_output_paths

    check_output_paths({"-o": output, **(others or {})}, [model_path, *data_files])
    if data_files and output.parent.resolve() != model_path.parent.resolve():
        raise OutputPathError(
            f"{model_path} keeps its weights in external data files, which onnxruntime resolves "
            f"next to the .onnx file; write the tuned copy into {model_path.parent} (-o "
            f"{model_path.parent / output.name}) or copy the data files beside {output}"
        )


def with_ort_config(
    model: onnx.ModelProto, settings: OrtSettings, record: Mapping[str, Any] | None = None
) -> onnx.ModelProto:
    """``model`` with ``ort_config`` carrying ``settings`` (other top-level keys of an existing
    ``ort_config`` kept), ``bnexport_session_config`` carrying its session config entries (none:
    no such entry) and, if given, the ``bnexport_tune`` record."""
    existing = read_ort_config(model, "the model") or {}
    config = {**existing, SESSION_OPTIONS_KEY: settings.session_options_json()}
    entries = {ORT_CONFIG_KEY: json.dumps(config, sort_keys=True)}
    if settings.session_config_entries:
        entries[SESSION_CONFIG_KEY] = json.dumps(settings.entries, sort_keys=True)
    if record is not None:
        entries[TUNE_RECORD_KEY] = json.dumps(record, sort_keys=True)
    return with_metadata(model, entries, drop=[SESSION_CONFIG_KEY])


@contextmanager
def carried_copies(
    model: onnx.ModelProto,
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


def tune_record(
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
        "the tuned file, opened with ORT_LOAD_CONFIG_FROM_MODEL=1 (with session config entries: "
        "by bnexport's session factory, file_settings='apply'), is faster (paired, median and "
        "p10-p90)",
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


def write_tuned(tuned_copy: Path, path: Path, record: Mapping[str, Any]) -> None:
    """The measured copy plus the record, written to ``path`` (a temp path of
    `bnexport.files.write_files`, which renames it into place with the rest of the set)."""
    from bnexport.onnx_file import load_onnx

    model = load_onnx(tuned_copy)
    final = with_metadata(model, {TUNE_RECORD_KEY: json.dumps(record, sort_keys=True)})
    path.write_bytes(final.SerializeToString())
