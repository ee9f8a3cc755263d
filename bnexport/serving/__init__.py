"""Serving: a model repository Triton and MLServer both load (`package_model`), `bnexport serve`
on MLServer through bnexport's runtime class (`plan_server`, `run_server`), the v2 client and the
endpoint runner (`V2Client`, `RemoteRunner`), and the load test.

Nothing heavy is imported here: MLServer, tritonclient, onnx and numpy load inside the functions
that need them (the runtime module, which MLServer imports, is the exception).
"""

from __future__ import annotations

from bnexport.serving.errors import EndpointError, RepositoryError, ServeError
from bnexport.serving.graph_io import GraphIO, TensorIO, read_graph_io
from bnexport.serving.package import PackageConfig, PackageResult, package_model
from bnexport.serving.repository import ModelEntry, read_repository
from bnexport.serving.server import ServeConfig, ServePlan, plan_server, run_server

__all__ = [
    "EndpointError",
    "GraphIO",
    "ModelEntry",
    "PackageConfig",
    "PackageResult",
    "RepositoryError",
    "ServeConfig",
    "ServeError",
    "ServePlan",
    "TensorIO",
    "package_model",
    "plan_server",
    "read_graph_io",
    "read_repository",
    "run_server",
]
