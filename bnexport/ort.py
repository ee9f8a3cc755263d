"""onnxruntime sessions: the one factory that creates them, and a CUDA probe that never lies.

Every onnxruntime session bnexport opens comes from :func:`make_session` (the CUDA probe's tiny
one too, through the same private call). A session asked for CUDA whose ``get_providers()[0]`` is
not ``CUDAExecutionProvider`` has silently fallen back to the CPU; :func:`make_session` refuses it
(``ProviderUnavailableError``) instead of letting a CPU run pass as a GPU run. :func:`probe_cuda`
says *why* CUDA does not run: the CPU-only ``onnxruntime`` package, missing CUDA libraries, or no
driver/device.

The settings an ONNX file carries in its ``ort_config`` (`bnexport.ort_config`) are applied only
when asked (``file_settings``): ``"ignore"`` (the default) never reads them, ``"apply"`` lays the
file's keys and the session config entries of its ``bnexport_session_config`` over bnexport's
options (how ``bnexport serve`` opens a tuned file), ``"opt_in"`` opens the file exactly as a
deployer who sets ``ORT_LOAD_CONFIG_FROM_MODEL=1`` does (onnxruntime reads no session config
entry from a file).

The default session options are the named constants below (the bench helper tunes them);
:data:`ORT_DEFAULTS` is onnxruntime's own ``SessionOptions()``, what tune and bench compare with.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from bnexport.cuda_diagnosis import (
    ProbeResult,
    diagnose_fallback,
    installed_packages,
    no_cuda_provider,
    tiny_model_bytes,
)
from bnexport.defaults import OPT_LEVELS
from bnexport.errors import (
    BnexportError,
    ExportError,
    ProviderUnavailableError,
    raise_if_interrupted,
)
from bnexport.onnx_file import check_model_bytes, external_data_files, load_onnx
from bnexport.ort_config import (
    CARRIED_KEYS,
    LOAD_CONFIG_ENV,
    SESSION_OPTIONS_KEY,
    OrtSettings,
    read_ort_config,
    read_session_config,
)
from bnexport.ort_names import (
    EXECUTION_MODE_ATTRS,
    OPT_LEVEL_ATTRS,
    PROVIDER_NAMES,
    ExecutionMode,
    OptLevel,
    Provider,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    import onnxruntime

#: How `make_session` treats the settings a file carries in its ``ort_config``.
FileSettings = Literal["ignore", "apply", "opt_in"]
FILE_SETTINGS: tuple[str, ...] = ("ignore", "apply", "opt_in")

# Defaults (named so they are data, not literals buried in code; the bench helper tunes them).
DEFAULT_PROVIDER: Provider = "cpu"
DEFAULT_GRAPH_OPTIMIZATION: OptLevel = "all"
DEFAULT_INTRA_OP_THREADS = 0  # 0: onnxruntime picks (one per physical core)
DEFAULT_INTER_OP_THREADS = 0  # 0: onnxruntime picks; only used in "parallel" execution mode
DEFAULT_EXECUTION_MODE: ExecutionMode = "sequential"
DEFAULT_ENABLE_MEM_ARENA = True
DEFAULT_ALLOW_SPINNING = True  # intra-op threads busy-wait between ops (ORT's default)
#: onnxruntime's log levels: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal. By default only
#: fatal lines: onnxruntime's own coloured error and warning lines stay off the user's stderr
#: (bnexport reports a failure in one line of its own); ``--verbose`` shows warnings and errors.
DEFAULT_LOG_SEVERITY = 4
VERBOSE_LOG_SEVERITY = 2
DEFAULT_CUDA_DEVICE_ID = 0
DEFAULT_CUDA_OPTIONS: dict[str, str] = {
    "use_tf32": "0",  # TF32 would make fp32 convs/GEMMs ~1e-3 accurate; strict parity needs it off
    "cudnn_conv_algo_search": "HEURISTIC",  # no run-to-run algorithm changes
}
_ENV_LOCK = threading.Lock()  # os.environ is process-wide: one session creation at a time
_LOG_LEVEL: dict[str, int | None] = {"override": None}  # `show_log`'s process-wide choice


@dataclass(frozen=True)
class SessionConfig:
    """How to create an onnxruntime session.

    ``provider_options`` are merged over the provider's defaults (:data:`DEFAULT_CUDA_OPTIONS` for
    CUDA; values are strings as onnxruntime wants them, e.g. ``{"use_tf32": "1"}``).
    ``allow_spinning=None`` leaves onnxruntime's own default (no config entry set);
    ``session_config_entries`` are added with ``add_session_config_entry`` after it.
    """

    provider: Provider = DEFAULT_PROVIDER
    graph_optimization_level: OptLevel = DEFAULT_GRAPH_OPTIMIZATION
    intra_op_num_threads: int = DEFAULT_INTRA_OP_THREADS
    inter_op_num_threads: int = DEFAULT_INTER_OP_THREADS
    execution_mode: ExecutionMode = DEFAULT_EXECUTION_MODE
    enable_mem_arena: bool = DEFAULT_ENABLE_MEM_ARENA
    allow_spinning: bool | None = DEFAULT_ALLOW_SPINNING
    device_id: int = DEFAULT_CUDA_DEVICE_ID
    provider_options: dict[str, str] = field(default_factory=dict)
    log_severity_level: int = DEFAULT_LOG_SEVERITY
    session_config_entries: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.provider not in PROVIDER_NAMES:
            raise ProviderUnavailableError(
                f"unknown provider {self.provider!r}; choose one of {sorted(PROVIDER_NAMES)}"
            )
        if self.graph_optimization_level not in OPT_LEVELS:
            raise BnexportError(
                f"unknown graph optimization level {self.graph_optimization_level!r}; "
                f"choose one of {list(OPT_LEVELS)}"
            )
        if self.execution_mode not in EXECUTION_MODE_ATTRS:
            raise BnexportError(
                f"unknown execution mode {self.execution_mode!r}; choose sequential or parallel"
            )

    def carrying(self, settings: OrtSettings) -> SessionConfig:
        """This config with the keys an ``ort_config`` carries set to ``settings``'s, and its
        session config entries added."""
        fields = settings.to_dict()
        entries = {**self.session_config_entries, **fields.pop("session_config_entries")}
        return replace(self, **fields, session_config_entries=entries)

    def resolved_provider_options(self) -> dict[str, str]:
        """The options actually handed to the provider (defaults, then overrides)."""
        if self.provider == "cuda":
            opts = {"device_id": str(self.device_id), **DEFAULT_CUDA_OPTIONS}
        else:
            opts = {}
        opts.update({k: str(v) for k, v in self.provider_options.items()})
        return opts

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["provider_options"] = self.resolved_provider_options()
        return d


#: onnxruntime's own ``SessionOptions()`` (its defaults, spelled out; the log level aside, which
#: keeps onnxruntime's warnings off the console): the baseline tune's and bench's ratios use.
ORT_DEFAULTS = SessionConfig(
    graph_optimization_level="all",
    intra_op_num_threads=0,
    inter_op_num_threads=0,
    execution_mode="sequential",
    enable_mem_arena=True,
    allow_spinning=None,
)


def show_log(show: bool) -> None:
    """Let onnxruntime's own warning and error lines reach stderr (``--verbose``), or keep them
    off whatever a `SessionConfig` asks (the default: only fatal lines). Process-wide, like
    onnxruntime's default logger."""
    _LOG_LEVEL["override"] = VERBOSE_LOG_SEVERITY if show else None


def log_severity(config: SessionConfig | None = None) -> int:
    """The log level sessions get: `show_log`'s choice, else ``config``'s (else the default)."""
    override = _LOG_LEVEL["override"]
    if override is not None:
        return override
    return DEFAULT_LOG_SEVERITY if config is None else config.log_severity_level


def _session_options(config: SessionConfig) -> onnxruntime.SessionOptions:
    """The ``SessionOptions`` for ``config``: level, threads, mode, arena, logging, config entries
    (the one place bnexport builds them)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, OPT_LEVEL_ATTRS[config.graph_optimization_level]
    )
    so.intra_op_num_threads = config.intra_op_num_threads
    so.inter_op_num_threads = config.inter_op_num_threads
    so.execution_mode = getattr(ort.ExecutionMode, EXECUTION_MODE_ATTRS[config.execution_mode])
    so.enable_cpu_mem_arena = config.enable_mem_arena
    so.log_severity_level = log_severity(config)
    if config.allow_spinning is not None:
        so.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if config.allow_spinning else "0"
        )
    for key, value in config.session_config_entries.items():
        so.add_session_config_entry(key, str(value))
    return so


def make_session(
    path_or_bytes: str | os.PathLike[str] | bytes,
    config: SessionConfig | None = None,
    *,
    file_settings: FileSettings = "ignore",
) -> onnxruntime.InferenceSession:
    """Create an ``InferenceSession`` exactly as ``config`` asks, or raise.

    A path is checked first (`bnexport.onnx_file`: it exists, is ONNX, keeps its external data
    beside it); bytes with external data are refused. CUDA sessions are checked after creation:
    ``get_providers()[0]`` must be ``CUDAExecutionProvider`` — otherwise
    ``ProviderUnavailableError``. ``file_settings`` (the file's ``ort_config``):

    * ``"ignore"``: ``config`` alone (even when ``ORT_LOAD_CONFIG_FROM_MODEL=1`` is set);
    * ``"apply"``: the keys onnxruntime reads from it (`bnexport.ort_config.CARRIED_KEYS`)
      override ``config``'s, and its ``bnexport_session_config`` entries are added; the rest of
      ``config`` stays;
    * ``"opt_in"``: what a deployer gets with ``ORT_LOAD_CONFIG_FROM_MODEL=1``: onnxruntime's
      default options plus the file's keys; of ``config`` only the provider applies.
    """
    import onnxruntime as ort

    config = config or SessionConfig()
    if file_settings not in FILE_SETTINGS:
        raise BnexportError(f"file_settings {file_settings!r}: choose one of {FILE_SETTINGS}")
    if file_settings == "apply":
        config = _with_file_settings(path_or_bytes, config)
    # Process-wide: ORT 1.31 warns on the default logger ("No registered plugin EP device found")
    # for every CUDA session; the session's own level does not cover it, nor an opt-in session's.
    ort.set_default_logger_severity(log_severity(config))
    providers = _providers(config)
    model: str | bytes
    if isinstance(path_or_bytes, bytes):
        model = path_or_bytes
        check_model_bytes(model)
    else:
        external_data_files(path_or_bytes)  # a model file, its data beside it and nowhere else
        model = str(path_or_bytes)  # by path: onnxruntime finds external data beside the model
    options = None if file_settings == "opt_in" else _session_options(config)
    try:
        with _config_from_model(file_settings == "opt_in"):
            sess = _inference_session(model, options, providers)
    except Exception as exc:
        where = "the given bytes" if isinstance(model, bytes) else model
        raise ExportError(
            f"onnxruntime cannot load {where}: {' '.join(str(exc).split())} "
            "(is it a valid ONNX model? try onnx.checker.check_model)"
        ) from exc
    wanted = PROVIDER_NAMES[config.provider]
    got = sess.get_providers()
    if not got or got[0] != wanted:
        raise ProviderUnavailableError(
            f"onnxruntime session asked for {wanted} but runs on {got[0] if got else 'nothing'} "
            f"(providers {got}); refusing a silent fallback"
        )
    return sess


def _inference_session(
    model: str | bytes, options: onnxruntime.SessionOptions | None, providers: list[Any]
) -> onnxruntime.InferenceSession:
    """The one ``InferenceSession`` call in bnexport (`make_session` and the CUDA probe)."""
    import onnxruntime as ort

    return ort.InferenceSession(model, sess_options=options, providers=providers)


def _providers(config: SessionConfig) -> list[Any]:
    """The providers list for ``config``; CUDA first only once the probe proved it runs."""
    if config.provider == "cuda":
        probe = probe_cuda(config.device_id)
        if not probe.available:
            raise ProviderUnavailableError(f"CUDA was asked for but does not run: {probe.reason}")
        return [
            (PROVIDER_NAMES["cuda"], config.resolved_provider_options()),
            PROVIDER_NAMES["cpu"],  # nodes CUDA lacks kernels for; the first provider stays CUDA
        ]
    return [(PROVIDER_NAMES["cpu"], config.resolved_provider_options())]


@contextlib.contextmanager
def _config_from_model(read: bool) -> Iterator[None]:
    """``ORT_LOAD_CONFIG_FROM_MODEL`` set to 1 (``read``) or unset while the block runs,
    restored afterwards; serialised across threads (the environment is process-wide)."""
    with _ENV_LOCK:
        old = os.environ.get(LOAD_CONFIG_ENV)
        if read:
            os.environ[LOAD_CONFIG_ENV] = "1"
        else:
            os.environ.pop(LOAD_CONFIG_ENV, None)
        try:
            yield
        finally:
            if old is None:
                os.environ.pop(LOAD_CONFIG_ENV, None)
            else:
                os.environ[LOAD_CONFIG_ENV] = old


def _with_file_settings(
    path_or_bytes: str | os.PathLike[str] | bytes, config: SessionConfig
) -> SessionConfig:
    """``config`` with the keys the model's ``ort_config`` carries and the session config entries
    of its ``bnexport_session_config`` (unchanged without either)."""
    import onnx

    if isinstance(path_or_bytes, bytes):
        model, where = onnx.load_from_string(path_or_bytes), "the given bytes"
    else:
        model, where = load_onnx(path_or_bytes), str(path_or_bytes)
    data = read_ort_config(model, where)
    options = (data or {}).get(SESSION_OPTIONS_KEY)
    if isinstance(options, dict):
        settings = OrtSettings.from_session_options_json(options, where)
        config = replace(config, **{k: getattr(settings, k) for k in options if k in CARRIED_KEYS})
    entries = read_session_config(model, where)
    if entries:
        merged = {**config.session_config_entries, **entries}
        config = replace(config, session_config_entries=merged)
    return config


@functools.lru_cache(maxsize=8)
def probe_cuda(device_id: int = DEFAULT_CUDA_DEVICE_ID) -> ProbeResult:
    """Prove that a CUDA session really runs: create a tiny one and check ``get_providers()[0]``.

    Cached per device id (``probe_cuda.cache_clear()`` forgets).
    """
    import numpy as np
    import onnxruntime as ort

    available = tuple(ort.get_available_providers())
    packages = installed_packages()
    common = {
        "available_providers": available,
        "onnxruntime_version": ort.__version__,
        "packages": packages,
    }
    if PROVIDER_NAMES["cuda"] not in available:
        return ProbeResult(False, no_cuda_provider(packages, available), **common)
    try:
        sess, preloaded = _cuda_probe_session(device_id)
    except Exception as exc:
        raise_if_interrupted(exc)
        return ProbeResult(
            False, f"creating a CUDA session failed: {' '.join(str(exc).split())}", **common
        )
    if sess is None:
        return ProbeResult(False, diagnose_fallback(), **common)
    try:
        x = np.array([1.5, -2.0], dtype=np.float32)
        (y,) = sess.run(None, {"x": x})
    except Exception as exc:
        raise_if_interrupted(exc)
        return ProbeResult(
            False, f"a CUDA session was created but running it failed: {exc}", **common
        )
    if not np.array_equal(y, x + x):
        return ProbeResult(False, f"the CUDA probe computed {y} instead of {x + x}", **common)
    return ProbeResult(
        True, f"CUDAExecutionProvider runs on device {device_id}{preloaded}", **common
    )


def _cuda_probe_session(device_id: int) -> tuple[onnxruntime.InferenceSession | None, str]:
    """The probe's tiny session on CUDA and a note when onnxruntime had to preload the CUDA
    libraries first; ``None`` when onnxruntime placed it on the CPU even after that."""
    import onnxruntime as ort

    ort.set_default_logger_severity(log_severity())
    so = _session_options(replace(ORT_DEFAULTS, log_severity_level=4))
    cuda = PROVIDER_NAMES["cuda"]
    options = {"device_id": str(device_id), **DEFAULT_CUDA_OPTIONS}
    providers = [(cuda, options), PROVIDER_NAMES["cpu"]]
    preloaded = ""
    for attempt in range(2):
        sess = _inference_session(tiny_model_bytes(), so, providers)
        if sess.get_providers()[:1] == [cuda]:
            return sess, preloaded
        if attempt or not hasattr(ort, "preload_dlls"):
            break
        # CUDA/cuDNN from pip (nvidia-* wheels) are not on the loader path until preloaded.
        try:
            ort.preload_dlls()
        except Exception:
            break
        preloaded = " (CUDA libraries loaded with onnxruntime.preload_dlls())"
    return None, ""
