"""onnxruntime settings carried inside an ONNX file: the ``ort_config`` metadata entry.

onnxruntime reads a JSON object from the model's ``metadata_props`` entry ``ort_config`` when the
environment variable ``ORT_LOAD_CONFIG_FROM_MODEL=1`` is set while a session is created
(``FinalizeSessionOptions`` in ``onnxruntime/core/session/inference_session.cc``). Its
``session_options`` object may hold exactly these keys, all integers
(``JsonConfigParser::ParseSessionOptionsFromModelProto`` in
``onnxruntime/core/session/inference_session_utils.cc``; the same five strings are in the 1.32
binary bnexport pins)::

    intra_op_num_threads      >= 0 (0: onnxruntime picks one per physical core)
    inter_op_num_threads      >= 0 (used only in parallel execution mode)
    execution_mode            0 sequential, 1 parallel
    graph_optimization_level  0 disabled, 1 basic, 2 extended, 99 all
    enable_profiling          0/1 (not a speed setting; bnexport never writes it)

Any other key is ignored ("Ignoring unsupported session option in ORT config"). And the options
built from the model *replace* the caller's: onnxruntime starts from a default ``SessionOptions``
and applies the model's keys, so everything else — memory arena and pattern, spinning, prepacking,
every ``session.*`` config entry, the log level — is onnxruntime's default, whatever the caller
set. Provider choice and provider options are never read from the model. The Python package's
``read_config_from_model=1`` keyword is not enough on its own (1.32 still reads the environment
variable in C++); ``bnexport.ort.make_session(path, file_settings="opt_in")`` sets the variable
for the duration of one session creation.

Session config entries (``session.disable_prepacking`` and the like: 1.40× at batch 1 on the
shipped Net, 0.72× at batch 8: docs/serving.md) are out of ``ort_config``'s reach, so bnexport
carries them in its own metadata entry ``bnexport_session_config`` (a JSON object of string
values, as ``SessionOptions.add_session_config_entry`` takes them), read by `read_session_config`
and applied by bnexport's session factory (``make_session(path, file_settings="apply")``: what
``bnexport serve`` opens a file with). onnxruntime itself never reads that entry, and with
``ORT_LOAD_CONFIG_FROM_MODEL=1`` it would drop a caller's entries anyway.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from bnexport.defaults import OPT_LEVELS
from bnexport.errors import BnexportError
from bnexport.onnx_file import load_onnx
from bnexport.ort_names import (
    EXECUTION_MODE_ATTRS,
    EXECUTION_MODE_CODES,
    OPT_LEVEL_ATTRS,
    OPT_LEVEL_CODES,
    ExecutionMode,
    OptLevel,
)

if TYPE_CHECKING:
    import onnx
    import onnxruntime

ORT_CONFIG_KEY = "ort_config"
#: bnexport's own metadata entry for the session config entries ``ort_config`` cannot carry.
SESSION_CONFIG_KEY = "bnexport_session_config"
#: The prefix of onnxruntime's session config entry keys.
SESSION_ENTRY_PREFIX = "session."
SESSION_OPTIONS_KEY = "session_options"
LOAD_CONFIG_ENV = "ORT_LOAD_CONFIG_FROM_MODEL"
#: Where onnxruntime's parser lives, for messages and docs.
PARSER_SOURCE = (
    "onnxruntime/core/session/inference_session_utils.cc "
    "(JsonConfigParser::ParseSessionOptionsFromModelProto)"
)
#: The session-option keys onnxruntime reads from ``ort_config`` that change speed.
CARRIED_KEYS: tuple[str, ...] = (
    "intra_op_num_threads",
    "inter_op_num_threads",
    "execution_mode",
    "graph_optimization_level",
)
#: Read by onnxruntime too, but a diagnostic: never written, refused as a tuning setting.
IGNORED_CARRIED_KEYS: tuple[str, ...] = ("enable_profiling",)
_SESSION_CLASS = "onnxruntime.InferenceSession"  # apart: grep finds bnexport.ort's one call only
#: How to set, by hand, settings that ``ort_config`` cannot carry (Python API).
BY_HAND: dict[str, str] = {
    "enable_mem_arena": "so.enable_cpu_mem_arena = ...",
    "enable_cpu_mem_arena": "so.enable_cpu_mem_arena = ...",
    "enable_mem_pattern": "so.enable_mem_pattern = ...",
    "allow_spinning": 'so.add_session_config_entry("session.intra_op.allow_spinning", "0")',
    "log_severity_level": "so.log_severity_level = ...",
    "provider": f'{_SESSION_CLASS}(path, so, providers=["CUDAExecutionProvider", ...])',
}


@dataclass(frozen=True)
class OrtSettings:
    """The session settings a tuned file carries (onnxruntime's defaults when unset): the keys of
    its ``ort_config`` and the session config entries of its ``bnexport_session_config``
    (``((key, value), …)`` sorted; a mapping is accepted and sorted)."""

    intra_op_num_threads: int = 0
    inter_op_num_threads: int = 0
    execution_mode: ExecutionMode = "sequential"
    graph_optimization_level: OptLevel = "all"
    session_config_entries: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        entries = check_session_entries(dict(self.session_config_entries), "session config")
        object.__setattr__(self, "session_config_entries", tuple(sorted(entries.items())))
        for key in ("intra_op_num_threads", "inter_op_num_threads"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BnexportError(f"{key} must be an integer >= 0, got {value!r}")
        if self.execution_mode not in EXECUTION_MODE_CODES:
            raise BnexportError(
                f"execution_mode {self.execution_mode!r}: choose sequential or parallel"
            )
        if self.graph_optimization_level not in OPT_LEVEL_CODES:
            raise BnexportError(
                f"graph_optimization_level {self.graph_optimization_level!r}: choose one of "
                f"{list(OPT_LEVELS)}"
            )

    def changes(self) -> dict[str, Any]:
        """The keys that differ from onnxruntime's defaults (entries as a dict)."""
        default = OrtSettings().to_dict()
        return {k: v for k, v in self.to_dict().items() if default[k] != v}

    @property
    def entries(self) -> dict[str, str]:
        """The session config entries, as ``add_session_config_entry`` takes them."""
        return dict(self.session_config_entries)

    def label(self) -> str:
        """``defaults`` or the changed keys, e.g. ``threads=1, level=extended, prepacking=off``."""
        short = {
            "intra_op_num_threads": "threads",
            "inter_op_num_threads": "inter-op threads",
            "execution_mode": "mode",
            "graph_optimization_level": "level",
        }
        changed = self.changes()
        changed.pop("session_config_entries", None)
        parts = [f"{short[k]}={v}" for k, v in changed.items()]
        parts += [ENTRY_LABELS.get((k, v), f"{k}={v}") for k, v in self.session_config_entries]
        return ", ".join(parts) or "defaults"

    def session_options_json(self) -> dict[str, int]:
        """The ``session_options`` object onnxruntime parses (integers, every carried key)."""
        return {
            "intra_op_num_threads": self.intra_op_num_threads,
            "inter_op_num_threads": self.inter_op_num_threads,
            "execution_mode": EXECUTION_MODE_CODES[self.execution_mode],
            "graph_optimization_level": OPT_LEVEL_CODES[self.graph_optimization_level],
        }

    @classmethod
    def from_session_options_json(cls, data: Mapping[str, Any], where: str) -> OrtSettings:
        """Parse an ``ort_config``'s ``session_options`` the way onnxruntime does (integers)."""
        levels = {v: k for k, v in OPT_LEVEL_CODES.items()}
        modes = {v: k for k, v in EXECUTION_MODE_CODES.items()}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in CARRIED_KEYS:
                continue  # onnxruntime ignores it too (or it is enable_profiling)
            if not isinstance(value, int) or isinstance(value, bool):
                raise BnexportError(
                    f"{where}: ort_config session option {key}={value!r} must be an integer "
                    "(onnxruntime refuses the model otherwise)"
                )
            if key == "graph_optimization_level":
                if value not in levels:
                    raise BnexportError(
                        f"{where}: graph_optimization_level {value} is not one onnxruntime "
                        f"reads from ort_config ({sorted(levels)})"
                    )
                kwargs[key] = levels[value]
            elif key == "execution_mode":
                if value not in modes:
                    raise BnexportError(f"{where}: execution_mode {value} must be 0 or 1")
                kwargs[key] = modes[value]
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "session_config_entries": self.entries}


#: Short names of session config entries in labels.
ENTRY_LABELS: dict[tuple[str, str], str] = {
    ("session.disable_prepacking", "1"): "prepacking=off",
    ("session.disable_prepacking", "0"): "prepacking=on",
}


def check_session_entries(entries: Mapping[str, Any], where: str) -> dict[str, str]:
    """``entries`` if each is a ``session.*`` key with a string value; else `BnexportError`."""
    out: dict[str, str] = {}
    for key, value in entries.items():
        if not isinstance(key, str) or not key.startswith(SESSION_ENTRY_PREFIX):
            raise BnexportError(
                f"{where}: {key!r} is not an onnxruntime session config entry "
                f"(those start with {SESSION_ENTRY_PREFIX!r})"
            )
        if not isinstance(value, str):
            raise BnexportError(
                f"{where}: {key}={value!r} must be a string, as onnxruntime takes it"
            )
        out[key] = value
    return out


def effective_settings(
    session: onnxruntime.InferenceSession, entries: Collection[str] = ()
) -> OrtSettings:
    """The carried keys, and the session config ``entries`` named, as a live session really uses
    them (``get_session_options()``; an entry the session lacks is left out)."""
    import onnxruntime as ort

    so = session.get_session_options()
    levels = {getattr(ort.GraphOptimizationLevel, v): k for k, v in OPT_LEVEL_ATTRS.items()}
    modes = {getattr(ort.ExecutionMode, v): k for k, v in EXECUTION_MODE_ATTRS.items()}
    level = levels.get(so.graph_optimization_level)
    if level is None:
        raise BnexportError(f"session uses graph optimization level {so.graph_optimization_level}")
    found = {}
    for key in entries:
        try:
            found[key] = so.get_session_config_entry(key)
        except Exception:  # onnxruntime raises for an entry it does not hold
            continue
    return OrtSettings(
        session_config_entries=tuple(found.items()),
        intra_op_num_threads=int(so.intra_op_num_threads),
        inter_op_num_threads=int(so.inter_op_num_threads),
        execution_mode=modes[so.execution_mode],  # type: ignore[arg-type]
        graph_optimization_level=level,  # type: ignore[arg-type]
    )


def check_carriable(key: str) -> str:
    """``key`` if a tuned file can carry it (an ``ort_config`` key, or a session config entry in
    ``bnexport_session_config``); otherwise `BnexportError` naming the by-hand way."""
    if key in CARRIED_KEYS or key.startswith(SESSION_ENTRY_PREFIX):
        return key
    if key in IGNORED_CARRIED_KEYS:
        raise BnexportError(
            f"{key} is a diagnostic, not a speed setting: bnexport tune never writes it"
        )
    if key.startswith(("cuda.", "cpu.")) or key in ("use_tf32", "cudnn_conv_algo_search"):
        option = key.split(".", 1)[-1]
        how = (
            f'providers=[("CUDAExecutionProvider", {{"{option}": VALUE}})] in '
            "onnxruntime.InferenceSession (provider options are never read from the model)"
        )
    else:
        how = BY_HAND.get(key, f"set {key} on onnxruntime.SessionOptions")
    raise BnexportError(
        f"onnxruntime does not read {key!r} from a model's ort_config (it reads only "
        f"{', '.join(CARRIED_KEYS)}; {PARSER_SOURCE}), so a tuned file cannot carry it, and with "
        f"{LOAD_CONFIG_ENV}=1 onnxruntime replaces the caller's other options by its defaults. "
        f"Set it by hand instead — {how} — and leave {LOAD_CONFIG_ENV} unset"
    )


def read_ort_config(model: onnx.ModelProto, where: str) -> dict[str, Any] | None:
    """The parsed ``ort_config`` entry of ``model`` (None when absent); bad JSON is an error."""
    refused = f"; onnxruntime refuses such a model when {LOAD_CONFIG_ENV}=1"
    return _metadata_object(model, ORT_CONFIG_KEY, where, refused)


def read_session_config(model: onnx.ModelProto, where: str) -> dict[str, str]:
    """The session config entries of ``model``'s ``bnexport_session_config`` ({} when absent);
    anything but a JSON object of ``session.*`` strings is an error."""
    data = _metadata_object(model, SESSION_CONFIG_KEY, where)
    return {} if data is None else check_session_entries(data, f"{where}: {SESSION_CONFIG_KEY}")


def _metadata_object(
    model: onnx.ModelProto, key: str, where: str, refused: str = ""
) -> dict[str, Any] | None:
    """The JSON object in ``model``'s metadata entry ``key`` (None when absent); anything else
    is a `BnexportError` (``refused``: who else would refuse it)."""
    for prop in model.metadata_props:
        if prop.key == key:
            try:
                data = json.loads(prop.value)
            except json.JSONDecodeError as exc:
                raise BnexportError(
                    f"{where}: its {key} metadata is not JSON ({exc}){refused}"
                ) from None
            if not isinstance(data, dict):
                raise BnexportError(f"{where}: its {key} metadata is not a JSON object")
            return data
    return None


def carried_settings(model: onnx.ModelProto, where: str) -> OrtSettings | None:
    """The settings ``model`` carries in ``ort_config`` and ``bnexport_session_config`` (None:
    neither holds any)."""
    data = read_ort_config(model, where)
    options = (data or {}).get(SESSION_OPTIONS_KEY)
    entries = read_session_config(model, where)
    if not isinstance(options, dict) and not entries:
        return None
    settings = OrtSettings.from_session_options_json(options or {}, where)
    return replace(settings, session_config_entries=tuple(entries.items()))


def model_settings(path: str | os.PathLike[str]) -> OrtSettings | None:
    """The settings a file carries (`carried_settings`; None: none)."""
    return carried_settings(load_onnx(path), str(path))


def with_metadata(
    model: onnx.ModelProto, entries: Mapping[str, str], drop: Collection[str] = ()
) -> onnx.ModelProto:
    """A copy of ``model`` whose ``metadata_props`` has ``entries`` set and the keys in ``drop``
    removed (others kept, in order)."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [(p.key, p.value) for p in out.metadata_props if p.key not in {*entries, *drop}]
    del out.metadata_props[:]
    for key, value in [*kept, *entries.items()]:
        prop = out.metadata_props.add()
        prop.key, prop.value = key, value
    return out
