"""Triton's ``config.pbtxt`` for an ONNX model: built with Triton's own schema, checked as Triton
checks it at load.

The schema is ``inference.ModelConfig`` from Triton's ``model_config.proto``, as tritonclient ships
it (``tritonclient.grpc.model_config_pb2``); the text is protobuf's ``text_format``. The load-time
rules are those of Triton's ``ValidateModelConfig`` (``model_config_utils.cc``) and of the
onnxruntime backend's I/O check: the name equals the model folder, a known platform, a
non-negative ``max_batch_size``, preferred batch sizes in ``1..max_batch_size``, one instance
group or more, every input and output of the graph with its datatype and dims, and a dynamic first
dimension on every tensor when ``max_batch_size > 0`` (the batch dimension is then implicit).

Tuned settings map onto the onnxruntime backend's ``parameters`` (``intra_op_thread_count``,
``inter_op_thread_count``, ``execution_mode``, ``enable_mem_arena``,
``session.use_device_allocator_for_initializers``) and ``optimization.graph.level`` in Triton's
numbering (``-1`` basic, ``1`` extended, ``2`` disabled, ``0``/absent all). Other session config
entries have no Triton parameter; they are reported, never dropped silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnexport.ort import DEFAULT_CUDA_OPTIONS
from bnexport.serving.errors import RepositoryError, serve_extra_missing
from bnexport.serving.graph_io import GraphIO, TensorIO

if TYPE_CHECKING:
    from google.protobuf.message import Message

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
#: bnexport's graph optimization level → Triton's ``optimization.graph.level``.
TRITON_GRAPH_LEVELS: dict[str, int] = {"all": 0, "extended": 1, "basic": -1, "disabled": 2}
#: bnexport's session settings → the onnxruntime backend's ``parameters`` keys.
TRITON_PARAMETERS: dict[str, str] = {
    "intra_op_num_threads": "intra_op_thread_count",
    "inter_op_num_threads": "inter_op_thread_count",
    "execution_mode": "execution_mode",
    "enable_mem_arena": "enable_mem_arena",
}
#: Session config entries the onnxruntime backend reads from ``parameters`` under the same key.
TRITON_CONFIG_ENTRIES: tuple[str, ...] = ("session.use_device_allocator_for_initializers",)


@dataclass(frozen=True)
class Batching:
    """``max_batch_size`` (0: no batching) and the dynamic batcher's settings."""

    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...] = ()
    queue_delay_us: int = 0


@dataclass(frozen=True)
class TritonSpec:
    """What a ``config.pbtxt`` says: the model, its I/O, batching, instances and settings."""

    name: str
    io: GraphIO
    batching: Batching
    instances: int = 1
    gpu: bool = False
    settings: Mapping[str, Any] = field(default_factory=dict)
    warmup: bool = True


def model_config_pb2() -> Any:
    """tritonclient's copy of Triton's ``model_config_pb2`` (the serve extra), loaded on its own.

    ``import tritonclient.grpc`` would also register Triton's service protos, whose ``inference``
    package MLServer's gRPC protos register too: one process could not hold both. The schema file
    depends on nothing else, so it is loaded by path, once.
    """
    import importlib.util
    import sys

    name = "bnexport_triton_model_config_pb2"
    if name in sys.modules:
        return sys.modules[name]
    if "tritonclient.grpc.model_config_pb2" in sys.modules:  # already registered by tritonclient
        return sys.modules["tritonclient.grpc.model_config_pb2"]
    found = importlib.util.find_spec("tritonclient")
    if found is None or not found.submodule_search_locations:
        raise serve_extra_missing("Triton's model config schema", ImportError(name="tritonclient"))
    path = Path(next(iter(found.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise serve_extra_missing("Triton's model config schema", ImportError(name=str(path)))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def build_config(spec: TritonSpec) -> tuple[Message, list[str]]:
    """The ``ModelConfig`` message for ``spec`` and the settings Triton cannot carry."""
    pb2 = model_config_pb2()
    config = pb2.ModelConfig(
        name=spec.name,
        platform=PLATFORM,
        backend=BACKEND,
        max_batch_size=spec.batching.max_batch_size,
    )
    config.version_policy.latest.num_versions = 1
    batched = spec.batching.max_batch_size > 0
    for tensor, target in [(t, config.input) for t in spec.io.inputs] + [
        (t, config.output) for t in spec.io.outputs
    ]:
        entry = target.add(name=tensor.name, data_type=pb2.DataType.Value(tensor.triton_type))
        entry.dims.extend(tensor.shape[1:] if batched else tensor.shape)
    if batched:
        dyn = config.dynamic_batching
        dyn.preferred_batch_size.extend(spec.batching.preferred_batch_sizes)
        dyn.max_queue_delay_microseconds = spec.batching.queue_delay_us
    kind = pb2.ModelInstanceGroup.KIND_GPU if spec.gpu else pb2.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(count=spec.instances, kind=kind)
    if spec.gpu:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name="cuda"
        )
        # bnexport's CUDA provider options (TF32 off for fp32 parity, no run-to-run algorithm
        # changes), which the backend hands to onnxruntime's CUDA provider as they are.
        accelerator.parameters.update(DEFAULT_CUDA_OPTIONS)
    left_out = _apply_settings(config, spec.settings)
    if spec.warmup:
        _add_warmup(config, spec.io, pb2, batched)
    return config, left_out


def _apply_settings(config: Any, settings: Mapping[str, Any]) -> list[str]:
    """Write the tuned settings Triton can carry; return the ones it cannot, as ``key=value``."""
    left_out: list[str] = []
    for key, value in settings.items():
        if key == "graph_optimization_level":
            level = TRITON_GRAPH_LEVELS[value]
            if level:
                config.optimization.graph.level = level
        elif key == "session_config_entries":
            for entry, text in dict(value).items():
                if entry in TRITON_CONFIG_ENTRIES:
                    config.parameters[entry].string_value = str(text)
                else:
                    left_out.append(f"{entry}={text}")
        elif key in TRITON_PARAMETERS:
            config.parameters[TRITON_PARAMETERS[key]].string_value = _parameter_text(key, value)
        else:
            left_out.append(f"{key}={value}")
    return left_out


def _parameter_text(key: str, value: Any) -> str:
    if key == "execution_mode":
        return "1" if value == "parallel" else "0"
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _add_warmup(config: Any, io: GraphIO, pb2: Any, batched: bool) -> None:
    """One zero-filled warm-up request of batch 1 (none when a non-batch dim is symbolic: Triton
    needs concrete warm-up dims)."""
    dims = {t.name: t.shape[1:] if batched else t.shape for t in io.inputs}
    if any(d < 0 for shape in dims.values() for d in shape):
        return
    warmup = config.model_warmup.add(name="zeros", batch_size=1)
    for tensor in io.inputs:
        data = warmup.inputs[tensor.name]
        data.data_type = pb2.DataType.Value(tensor.triton_type)
        data.dims.extend(dims[tensor.name])
        data.zero_data = True


def config_text(config: Message) -> str:
    """The ``config.pbtxt`` text of ``config`` (protobuf text format)."""
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def parse_config(text: str, where: str) -> Message:
    """``text`` parsed with Triton's schema; `RepositoryError` names protobuf's complaint."""
    from google.protobuf import text_format

    pb2 = model_config_pb2()
    try:
        return text_format.Parse(text, pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise RepositoryError(f"{where}: Triton's schema refuses it: {exc}") from None


def validate_config(config: Any, folder_name: str, io: GraphIO, where: str) -> None:
    """Triton's load-time checks on ``config`` against the graph's I/O (`RepositoryError`)."""
    problems = list(_config_problems(config, folder_name)) + list(_io_problems(config, io))
    if problems:
        raise RepositoryError(f"{where}: Triton would refuse it: {'; '.join(problems)}")


def _config_problems(config: Any, folder_name: str) -> Sequence[str]:
    problems = []
    if config.name != folder_name:
        problems.append(f"name {config.name!r} differs from its folder {folder_name!r}")
    if config.platform != PLATFORM or config.backend not in ("", BACKEND):
        problems.append(f"platform {config.platform!r} / backend {config.backend!r}")
    if config.max_batch_size < 0:
        problems.append(f"max_batch_size {config.max_batch_size} is negative")
    for size in config.dynamic_batching.preferred_batch_size:
        if not 0 < size <= config.max_batch_size:
            problems.append(
                f"dynamic batching preferred size {size} outside 1..{config.max_batch_size}"
            )
    if config.HasField("dynamic_batching") and config.max_batch_size == 0:
        problems.append("dynamic batching with max_batch_size 0")
    if not config.instance_group or any(g.count < 1 for g in config.instance_group):
        problems.append("needs one or more instance groups of count >= 1")
    return problems


def _io_problems(config: Any, io: GraphIO) -> Sequence[str]:
    pb2 = model_config_pb2()
    batched = config.max_batch_size > 0
    problems = []
    for label, entries, tensors in (
        ("input", config.input, io.inputs),
        ("output", config.output, io.outputs),
    ):
        by_name = {e.name: e for e in entries}
        graph = {t.name: t for t in tensors}
        for name in sorted(set(by_name) - set(graph)):
            problems.append(f"{label} {name!r} is not in the graph")
        for name, tensor in graph.items():
            entry = by_name.get(name)
            if entry is None:
                problems.append(f"the graph's {label} {name!r} is missing")
                continue
            problems.extend(_tensor_problems(label, entry, tensor, batched, pb2))
    return problems


def _tensor_problems(label: str, entry: Any, tensor: TensorIO, batched: bool, pb2: Any) -> list:
    problems = []
    dtype = pb2.DataType.Name(entry.data_type)
    if dtype != tensor.triton_type:
        problems.append(f"{label} {tensor.name!r} is {dtype}, the graph has {tensor.triton_type}")
    if batched and not tensor.batch_dynamic:
        problems.append(
            f"{label} {tensor.name!r} has a fixed first dimension {tensor.shape[:1]} in the graph,"
            " so the model cannot batch (max_batch_size must be 0)"
        )
    graph_dims = tensor.shape[1:] if batched else tensor.shape
    dims = tuple(entry.dims)
    if len(dims) != len(graph_dims) or any(
        g != -1 and d != g for d, g in zip(dims, graph_dims, strict=False)
    ):
        problems.append(
            f"{label} {tensor.name!r} dims {list(dims)}, the graph has {list(graph_dims)}"
        )
    return problems
