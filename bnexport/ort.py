"""onnxruntime sessions for bnexport: one place that creates them, and a CUDA probe that never lies.

A session asked for CUDA whose ``get_providers()[0]`` is not ``CUDAExecutionProvider`` has silently
fallen back to the CPU; :func:`make_session` refuses it (``ProviderUnavailableError``) instead of
letting a CPU run pass as a GPU run. :func:`probe_cuda` says *why* CUDA does not run: the CPU-only
``onnxruntime`` package, missing CUDA libraries, or no driver/device.

The default session options are the named constants below (the bench helper tunes them).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from bnexport.defaults import OPT_LEVELS
from bnexport.errors import (
    BnexportError,
    ExportError,
    ProviderUnavailableError,
    raise_if_interrupted,
)

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    import onnx
    import onnxruntime

Provider = Literal["cpu", "cuda"]
OptLevel = Literal["disabled", "basic", "extended", "all"]
ExecutionMode = Literal["sequential", "parallel"]

PROVIDER_NAMES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}
_ORT_OPT_LEVEL_ATTR = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

# Defaults (named so they are data, not literals buried in code; the bench helper tunes them).
DEFAULT_PROVIDER: Provider = "cpu"
DEFAULT_GRAPH_OPTIMIZATION: OptLevel = "all"
DEFAULT_INTRA_OP_THREADS = 0  # 0: onnxruntime picks (one per physical core)
DEFAULT_INTER_OP_THREADS = 0  # 0: onnxruntime picks; only used in "parallel" execution mode
DEFAULT_EXECUTION_MODE: ExecutionMode = "sequential"
DEFAULT_ENABLE_MEM_ARENA = True
DEFAULT_ALLOW_SPINNING = True  # intra-op threads busy-wait between ops (ORT's default)
DEFAULT_LOG_SEVERITY = 3  # 0 verbose … 3 error, 4 fatal: keeps ORT's warnings off the console
DEFAULT_CUDA_DEVICE_ID = 0
DEFAULT_CUDA_OPTIONS: dict[str, str] = {
    "use_tf32": "0",  # TF32 would make fp32 convs/GEMMs ~1e-3 accurate; strict parity needs it off
    "cudnn_conv_algo_search": "HEURISTIC",  # no run-to-run algorithm changes
}


@dataclass(frozen=True)
class SessionConfig:
    """How to create an onnxruntime session.

    ``provider_options`` are merged over the provider's defaults (:data:`DEFAULT_CUDA_OPTIONS` for
    CUDA; values are strings as onnxruntime wants them, e.g. ``{"use_tf32": "1"}``).
    """

    provider: Provider = DEFAULT_PROVIDER
    graph_optimization_level: OptLevel = DEFAULT_GRAPH_OPTIMIZATION
    intra_op_num_threads: int = DEFAULT_INTRA_OP_THREADS
    inter_op_num_threads: int = DEFAULT_INTER_OP_THREADS
    execution_mode: ExecutionMode = DEFAULT_EXECUTION_MODE
    enable_mem_arena: bool = DEFAULT_ENABLE_MEM_ARENA
    allow_spinning: bool = DEFAULT_ALLOW_SPINNING
    device_id: int = DEFAULT_CUDA_DEVICE_ID
    provider_options: dict[str, str] = field(default_factory=dict)
    log_severity_level: int = DEFAULT_LOG_SEVERITY

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
        if self.execution_mode not in ("sequential", "parallel"):
            raise BnexportError(
                f"unknown execution mode {self.execution_mode!r}; choose sequential or parallel"
            )

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


@dataclass(frozen=True)
class ProbeResult:
    """Whether onnxruntime's CUDA provider really runs here, and if not, why."""

    available: bool
    reason: str
    available_providers: tuple[str, ...] = ()
    onnxruntime_version: str = ""
    packages: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def session_options(config: SessionConfig) -> onnxruntime.SessionOptions:
    """The ``SessionOptions`` for ``config`` (optimization level, threads, arena, logging)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(
        ort.GraphOptimizationLevel, _ORT_OPT_LEVEL_ATTR[config.graph_optimization_level]
    )
    so.intra_op_num_threads = config.intra_op_num_threads
    so.inter_op_num_threads = config.inter_op_num_threads
    so.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL
        if config.execution_mode == "parallel"
        else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    so.enable_cpu_mem_arena = config.enable_mem_arena
    so.log_severity_level = config.log_severity_level
    so.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if config.allow_spinning else "0"
    )
    return so


def make_session(
    path_or_bytes: str | os.PathLike[str] | bytes,
    config: SessionConfig | None = None,
    *,
    model_config: bool = False,
) -> onnxruntime.InferenceSession:
    """Create an ``InferenceSession`` exactly as ``config`` asks, or raise.

    CUDA sessions are checked after creation: ``get_providers()[0]`` must be
    ``CUDAExecutionProvider`` — otherwise ``ProviderUnavailableError`` with the probe's reason.
    ``model_config=True`` honours the model's ``ort_config`` (what ``bnexport tune`` writes): the
    keys onnxruntime reads from it (`bnexport.ort_config.CARRIED_KEYS`) override ``config``'s;
    the rest of ``config`` stays (onnxruntime's own opt-in would reset it to its defaults).
    """
    import onnxruntime as ort

    config = config or SessionConfig()
    if model_config:
        config = _with_model_config(path_or_bytes, config)
    # Process-wide: ORT 1.31 warns on the default logger ("No registered plugin EP device found")
    # for every CUDA session; the session's own level does not cover it.
    ort.set_default_logger_severity(config.log_severity_level)
    if config.provider == "cuda":
        probe = probe_cuda(config.device_id)
        if not probe.available:
            raise ProviderUnavailableError(f"CUDA was asked for but does not run: {probe.reason}")
        providers: list[Any] = [
            (PROVIDER_NAMES["cuda"], config.resolved_provider_options()),
            PROVIDER_NAMES["cpu"],  # nodes CUDA lacks kernels for; the first provider stays CUDA
        ]
    else:
        providers = [(PROVIDER_NAMES["cpu"], config.resolved_provider_options())]

    model: str | bytes
    if isinstance(path_or_bytes, bytes):
        model = path_or_bytes
        _refuse_external_data_in_bytes(model)
    else:
        path = Path(path_or_bytes)
        if not path.is_file():
            raise ExportError(f"ONNX model {path} not found; check the path")
        external_data_files(path)  # beside the model, never outside its folder
        model = str(path)  # by path: onnxruntime finds external data beside the model
    try:
        sess = ort.InferenceSession(
            model, sess_options=session_options(config), providers=providers
        )
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


def _with_model_config(
    path_or_bytes: str | os.PathLike[str] | bytes, config: SessionConfig
) -> SessionConfig:
    """``config`` with the carried keys of the model's ``ort_config`` (unchanged without one)."""
    import onnx

    from bnexport.ort_config import SESSION_OPTIONS_KEY, OrtSettings, read_ort_config

    if isinstance(path_or_bytes, bytes):
        model, where = onnx.load_from_string(path_or_bytes), "the given bytes"
    else:
        if not Path(path_or_bytes).is_file():
            raise ExportError(f"ONNX model {path_or_bytes} not found; check the path")
        model = onnx.load(str(path_or_bytes), load_external_data=False)
        where = str(path_or_bytes)
    data = read_ort_config(model, where)
    options = (data or {}).get(SESSION_OPTIONS_KEY)
    if not isinstance(options, dict):
        return config
    settings = OrtSettings.from_session_options_json(options, where)
    return replace(config, **{k: getattr(settings, k) for k in options if hasattr(settings, k)})


def external_data_files(path: str | os.PathLike[str]) -> tuple[Path, ...]:
    """The external-data files (``.data`` beside the ``.onnx``) the model at `path` uses.

    Every tensor's ``location`` must be a relative path inside the model's folder: an absolute
    path or one that leaves the folder through ``..`` is refused (`ExportError`) before
    onnxruntime reads anything, and so is a missing file. Cached per file version.
    """
    st = Path(path).stat()
    return _external_data_files(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _external_data_files(path: str, _mtime_ns: int, _size: int) -> tuple[Path, ...]:
    import onnx

    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise ExportError(f"{path} is not an ONNX model: {' '.join(str(exc).split())}") from exc
    folder = Path(path).parent
    files: dict[Path, None] = {}
    for tensor in _tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = Path(os.path.normpath(folder / location))
        if not location or os.path.isabs(location) or not target.is_relative_to(folder):
            raise ExportError(
                f"{path}: tensor {tensor.name!r} keeps its data at {location!r}, outside the "
                f"model's folder {folder}; bnexport reads external data only beside the model: "
                "save it with a relative location (onnx.save(..., save_as_external_data=True, "
                "location='model.onnx.data'))"
            )
        if not target.is_file():
            raise ExportError(
                f"{path}: tensor {tensor.name!r} keeps its data in {target}, which is missing; "
                "copy the .data file beside the model"
            )
        files[target] = None
    return tuple(files)


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of `model`: initializers, sparse ones, and node attributes, in subgraphs and
    functions too."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for graph in attr.graphs:
                yield from _graph_tensors(graph)


def _refuse_external_data_in_bytes(data: bytes) -> None:
    """A model given as bytes has no folder: onnxruntime would look for its external data in the
    working directory. Refuse it (`ExportError`)."""
    import onnx

    if b"location" not in data:  # the key every external-data tensor serializes: none here
        return
    proto = onnx.load_model_from_string(data)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _tensors(proto)):
        raise ExportError(
            "an ONNX model given as bytes uses external data, which onnxruntime would look for in "
            "the working directory; pass the model's path instead"
        )


def _tiny_model_bytes() -> bytes:
    """A one-node ONNX model (y = x + x) used to probe a provider."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def _installed_packages() -> dict[str, str]:
    found: dict[str, str] = {}
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _diagnose_fallback() -> str:
    """Why a CUDA session fell back: the provider library, the driver, or the device."""
    import onnxruntime as ort

    capi = Path(ort.__file__).parent / "capi"
    lib = capi / "libonnxruntime_providers_cuda.so"
    if lib.exists():
        try:
            ctypes.CDLL(str(lib))
        except OSError as exc:
            return (
                f"CUDA libraries missing: {lib.name} cannot load ({exc}); install the CUDA runtime "
                "and cuDNN that this onnxruntime-gpu build needs (e.g. pip install "
                "'onnxruntime-gpu[cuda,cudnn]') or put them on LD_LIBRARY_PATH"
            )
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver: libcuda.so.1 not found (no GPU on this machine?)"
    rc = cuda.cuInit(0)
    if rc != 0:
        return f"no usable CUDA device: cuInit failed with CUDA error {rc}"
    count = ctypes.c_int(0)
    rc = cuda.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0 or count.value == 0:
        return f"no CUDA device visible (cuDeviceGetCount → error {rc}, {count.value} devices)"
    return (
        "the CUDA provider is installed and a device is visible, but onnxruntime placed the "
        "session on the CPU; rerun with log_severity_level=0 to see onnxruntime's reason"
    )


@functools.lru_cache(maxsize=8)
def probe_cuda(device_id: int = DEFAULT_CUDA_DEVICE_ID) -> ProbeResult:
    """Prove that a CUDA session really runs: create a tiny one and check ``get_providers()[0]``.

    Cached per device id (``probe_cuda.cache_clear()`` forgets).
    """
    import numpy as np
    import onnxruntime as ort

    available = tuple(ort.get_available_providers())
    packages = _installed_packages()
    common = {
        "available_providers": available,
        "onnxruntime_version": ort.__version__,
        "packages": packages,
    }
    cuda = PROVIDER_NAMES["cuda"]
    if cuda not in available:
        if "onnxruntime-gpu" not in packages:
            cpu_pkg = f"onnxruntime {packages['onnxruntime']}" if "onnxruntime" in packages else ""
            reason = (
                f"onnxruntime-gpu is not installed (only the CPU package {cpu_pkg}; "
                f"providers {list(available)}); install it with `pip install onnxruntime-gpu` "
                "(bnexport[gpu]) in place of onnxruntime"
            )
        else:
            reason = (
                f"onnxruntime-gpu {packages['onnxruntime-gpu']} is installed but the imported "
                f"onnxruntime ({ort.__file__}) offers no CUDA provider "
                f"(providers {list(available)}); if both onnxruntime and onnxruntime-gpu are "
                "installed, uninstall both and reinstall onnxruntime-gpu alone"
            )
        return ProbeResult(False, reason, **common)

    ort.set_default_logger_severity(DEFAULT_LOG_SEVERITY)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    opts = {"device_id": str(device_id), **DEFAULT_CUDA_OPTIONS}
    preloaded = ""
    for attempt in range(2):
        try:
            sess = ort.InferenceSession(
                _tiny_model_bytes(),
                sess_options=so,
                providers=[(cuda, opts), PROVIDER_NAMES["cpu"]],
            )
        except Exception as exc:
            raise_if_interrupted(exc)
            return ProbeResult(
                False, f"creating a CUDA session failed: {' '.join(str(exc).split())}", **common
            )
        got = sess.get_providers()
        if got and got[0] == cuda:
            break
        if attempt == 0 and hasattr(ort, "preload_dlls"):
            # CUDA/cuDNN from pip (nvidia-* wheels) are not on the loader path until preloaded.
            try:
                ort.preload_dlls()
                preloaded = " (CUDA libraries loaded with onnxruntime.preload_dlls())"
            except Exception:
                break
        else:
            break
    if not got or got[0] != cuda:
        return ProbeResult(False, _diagnose_fallback(), **common)
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
