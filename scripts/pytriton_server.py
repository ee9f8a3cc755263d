"""Serve one model of a bnexport-packaged repository on a real Triton front end (PyTriton).

Runs in the environment `scripts/pytriton_env.sh` builds (nvidia-pytriton 0.7.0 bundles Triton
2.51 with its Python backend only, and needs numpy < 2), not in bnexport's: it imports neither
bnexport nor torch. The model runs in onnxruntime inside PyTriton's inference callable, set up as
Triton's onnxruntime backend would read ``REPOSITORY/NAME/config.pbtxt`` (parsed with Triton's
schema from tritonclient): ``max_batch_size``, ``dynamic_batching`` (preferred sizes, queue
delay), the onnxruntime ``parameters`` and ``optimization.graph.level``. Loopback only.

    .venv-triton/bin/python scripts/pytriton_server.py out/repo [NAME ...] --http-port 8000

Serves every model of the repository unless NAMEs are given; ready when
``/v2/models/NAME/ready`` answers 200; SIGTERM or Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import sysconfig
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
#: config.pbtxt's ``optimization.graph.level`` (Triton's numbering) → onnxruntime's level name.
#: The session config entries Triton's onnxruntime backend reads from ``parameters`` (others: none).
BACKEND_CONFIG_ENTRIES = ("session.use_device_allocator_for_initializers",)
GRAPH_LEVELS = {
    0: "ORT_ENABLE_ALL",
    1: "ORT_ENABLE_EXTENDED",
    -1: "ORT_ENABLE_BASIC",
    2: "ORT_DISABLE_ALL",
}


def read_config(folder: Path) -> Any:
    """``folder/config.pbtxt`` parsed with Triton's own schema."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def session_options(config: Any) -> Any:
    """onnxruntime options from the config, as Triton's onnxruntime backend maps them."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    params = {k: v.string_value for k, v in config.parameters.items()}
    if "intra_op_thread_count" in params:
        so.intra_op_num_threads = int(params.pop("intra_op_thread_count"))
    if "inter_op_thread_count" in params:
        so.inter_op_num_threads = int(params.pop("inter_op_thread_count"))
    if params.pop("execution_mode", "0") == "1":
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    if "enable_mem_arena" in params:
        so.enable_cpu_mem_arena = params.pop("enable_mem_arena") in ("1", "true")
    if "enable_mem_pattern" in params:
        so.enable_mem_pattern = params.pop("enable_mem_pattern") in ("1", "true")
    for key in BACKEND_CONFIG_ENTRIES:  # the only session config entries the backend reads
        if key in params:
            so.add_session_config_entry(key, params.pop(key))
    level = GRAPH_LEVELS[config.optimization.graph.level]
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.log_severity_level = 3
    return so


def bind(triton: Any, name: str, model_file: Path, config: Any) -> None:
    """Bind ``model_file`` under ``name`` with the config's I/O and batching."""
    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from tritonclient.grpc import model_config_pb2
    from tritonclient.utils import triton_to_np_dtype

    session = ort.InferenceSession(
        str(model_file), session_options(config), ["CPUExecutionProvider"]
    )
    outputs = [o.name for o in config.output]

    def tensor(entry: Any) -> Tensor:
        datatype = model_config_pb2.DataType.Name(entry.data_type).removeprefix("TYPE_")
        dtype = np.dtype(triton_to_np_dtype("BYTES" if datatype == "STRING" else datatype))
        return Tensor(name=entry.name, dtype=dtype, shape=tuple(entry.dims))

    def run(**feed: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(outputs, session.run(outputs, feed), strict=True))

    batched = config.max_batch_size > 0
    model_config = ModelConfig(
        batching=batched,
        max_batch_size=max(config.max_batch_size, 1),
        batcher=DynamicBatcher(
            max_queue_delay_microseconds=config.dynamic_batching.max_queue_delay_microseconds,
            preferred_batch_size=list(config.dynamic_batching.preferred_batch_size) or None,
        ),
    )
    triton.bind(
        model_name=name,
        infer_func=batch(run) if batched else run,
        inputs=[tensor(t) for t in config.input],
        outputs=[tensor(t) for t in config.output],
        config=model_config,
        strict=True,
    )


def model_file(folder: Path) -> Path | None:
    """The newest ``VERSION/model.onnx`` of a model folder (Triton's default version policy)."""
    versions = sorted((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    found = versions[-1] / "model.onnx" if versions else None
    return found if found is not None and found.is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repository", type=Path)
    parser.add_argument("names", nargs="*", help="models to serve (default: every one)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    args = parser.parse_args(argv)
    names = args.names or sorted(p.parent.name for p in args.repository.glob("*/config.pbtxt"))
    models = {name: model_file(args.repository / name) for name in names}
    missing = [name for name, path in models.items() if path is None]
    if not models or missing:
        print(
            f"pytriton_server: no VERSION/model.onnx for {missing or 'any model'}", file=sys.stderr
        )
        return 2
    # Triton's Python-backend stub links the interpreter's libpython; a pyenv build keeps it
    # outside the loader's path (else: AttributeError RLock._recursion_count in the stub).
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if p
    )
    from pytriton.triton import Triton, TritonConfig

    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # serve() stops on KeyboardInterrupt
    triton_config = TritonConfig(
        http_address=HOST,
        http_port=args.http_port,
        grpc_address=HOST,
        grpc_port=args.grpc_port,
        metrics_address=HOST,
        metrics_port=args.metrics_port,
        exit_timeout_secs=10,
    )
    with Triton(config=triton_config) as triton:
        for name, path in models.items():
            bind(triton, name, path, read_config(args.repository / name))
        url = f"http://{HOST}:{args.http_port}"
        print(f"pytriton_server: serving {', '.join(models)} at {url}", flush=True)
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
