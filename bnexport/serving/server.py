"""`bnexport serve`: every model of a repository on MLServer, through bnexport's runtime class.

`plan_server` checks everything that can fail before anything listens — the repository (each
``model-settings.json`` parsed by MLServer's own settings class, each file opened by bnexport's
session factory), the ports (bound once to see they are free) and the host (a non-loopback host is
served, with a warning) — and returns a `ServePlan`; `run_server` runs MLServer until SIGINT or
SIGTERM, on which MLServer stops accepting, finishes the requests in flight and returns.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnexport.serving.defaults import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HOST,
    DEFAULT_HTTP_PORT,
    DEFAULT_MAX_BODY_MB,
    DEFAULT_METRICS_PORT,
    DEFAULT_WORKERS,
)
from bnexport.serving.errors import RepositoryError, ServeError, serve_extra_missing
from bnexport.serving.http_guard import harden_app
from bnexport.serving.repository import ModelEntry, read_repository

MIB = 1 << 20


@dataclass(frozen=True)
class ServeConfig:
    """Where to serve a repository and with how many worker processes (0: in the server's own)."""

    repository: Path
    host: str = DEFAULT_HOST
    http_port: int = DEFAULT_HTTP_PORT
    grpc_port: int = DEFAULT_GRPC_PORT
    metrics_port: int = DEFAULT_METRICS_PORT
    workers: int = DEFAULT_WORKERS
    max_body_mb: int = DEFAULT_MAX_BODY_MB

    def __post_init__(self) -> None:
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if any(not 0 < p < 65536 for p in ports):
            raise ServeError(f"ports {ports}: each must be in 1..65535")
        if len(set(ports)) != 3:
            raise ServeError(f"the HTTP, gRPC and metrics ports must differ, got {ports}")
        if self.max_body_mb < 1:
            raise ServeError(f"--max-body-mb {self.max_body_mb} must be >= 1")
        if self.workers < 0:
            raise ServeError(f"--workers {self.workers} must be >= 0")


@dataclass
class ServePlan:
    """A checked configuration: the models to load, the URLs, and warnings for the user."""

    config: ServeConfig
    models: list[ModelEntry]
    warnings: list[str] = field(default_factory=list)

    @property
    def http_url(self) -> str:
        return f"http://{_url_host(self.config.host)}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{_url_host(self.config.host)}:{self.config.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_url_host(self.config.host)}:{self.config.metrics_port}/metrics"


def plan_server(config: ServeConfig) -> ServePlan:
    """Check the repository, the files, the ports and the host; nothing listens yet."""
    try:
        import mlserver  # noqa: F401
    except ImportError as exc:
        raise serve_extra_missing("bnexport serve", exc) from None
    models = read_repository(config.repository)
    for entry in models:
        _check_settings(entry)
        _check_session(entry)
    warnings = []
    if not is_loopback(config.host):
        warnings.append(
            f"serving on {config.host}, reachable from other machines: the v2 endpoints have no "
            "authentication; use --host 127.0.0.1 unless a gateway guards this one"
        )
    for label, port in (
        ("HTTP", config.http_port),
        ("gRPC", config.grpc_port),
        ("metrics", config.metrics_port),
    ):
        check_port_free(config.host, port, label)
    return ServePlan(config, models, warnings)


def run_server(plan: ServePlan) -> None:
    """Run MLServer on ``plan`` until SIGINT/SIGTERM (in-flight requests finish first), on uvloop's
    event loop as ``mlserver start`` runs it."""
    import asyncio

    from mlserver.utils import install_uvloop_event_loop

    install_uvloop_event_loop()
    with tempfile.TemporaryDirectory(prefix="bnexport-serve-") as scratch:
        asyncio.run(_serve(plan, Path(scratch)))


async def _serve(plan: ServePlan, scratch: Path) -> None:
    from mlserver import MLServer
    from mlserver.repository.load import load_model_settings
    from mlserver.settings import Settings

    config = plan.config
    settings = Settings(
        debug=False,
        host=config.host,
        http_port=config.http_port,
        grpc_port=config.grpc_port,
        metrics_port=config.metrics_port,
        metrics_endpoint="/metrics",
        metrics_dir=str(scratch / "metrics"),
        environments_dir=str(scratch / "envs"),
        parallel_workers=config.workers,
        model_repository_root=str(Path(config.repository).resolve()),
        load_models_at_startup=False,
    )
    os.makedirs(settings.metrics_dir, exist_ok=True)
    models = [
        load_model_settings(str(m.folder.resolve() / "model-settings.json")) for m in plan.models
    ]
    quiet = QuietLog()
    for name in ("mlserver", "mlserver.metrics", "mlserver.grpc", "uvicorn.error"):
        logging.getLogger(name).addFilter(quiet)
    server = MLServer(settings)  # installs its SIGINT/SIGTERM handlers on this loop
    # MLServer keeps its FastAPI app private; the guard needs it before the first request.
    harden_app(server._rest_server._app, config.max_body_mb * MIB)
    await server.start(models)


#: MLServer's lines `QuietLog` drops: a note that adaptive batching does not cover streaming
#: (bnexport serves no stream), the metrics URL (bnexport prints it), and the gRPC server's
#: shutdown notes (logged once per stop call, six times over; bnexport says "stopped").
QUIET_NOTES: tuple[str, ...] = (
    "not supported for inference streaming",
    "Prometheus scraping endpoint",
    "gRPC server shutdown",
)


class QuietLog(logging.Filter):
    """Drops the lines that tell a ``bnexport serve`` user nothing: uvicorn's start-up notes
    (MLServer runs two uvicorn servers, so each came twice; bnexport prints the URLs once) and
    `QUIET_NOTES`. Warnings and errors of uvicorn, and MLServer's other lines, stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("uvicorn"):
            return record.levelno >= logging.WARNING
        message = record.getMessage()
        return not any(note in message for note in QUIET_NOTES)


def _check_settings(entry: ModelEntry) -> None:
    """MLServer's own parser accepts the model's settings."""
    from mlserver.repository.load import load_model_settings

    path = entry.folder / "model-settings.json"
    try:
        load_model_settings(str(path))
    except Exception as exc:
        message = " ".join(str(exc).split())
        raise RepositoryError(f"{path}: MLServer refuses it: {message}") from None


def _check_session(entry: ModelEntry) -> None:
    """bnexport's session factory opens the file the runtime will serve."""
    from bnexport.serving.repository import open_model_session

    open_model_session(entry.model_file)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ``::1``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int, label: str) -> None:
    """`ServeError` when ``host:port`` cannot be bound (taken, or no such address here)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = "is taken" if exc.errno in (98, 48) else f"cannot be bound ({exc.strerror})"
            raise ServeError(
                f"{label} port {host}:{port} {reason}; pick another with --{_flag(label)}"
            ) from None


def _flag(label: str) -> str:
    return {"HTTP": "port", "gRPC": "grpc-port", "metrics": "metrics-port"}[label]


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def describe(plan: ServePlan) -> dict[str, Any]:
    """The plan as data (for ``--json``-style rendering and tests)."""
    return {
        "models": [m.name for m in plan.models],
        "http": plan.http_url,
        "grpc": plan.grpc_url,
        "metrics": plan.metrics_url,
        "warnings": list(plan.warnings),
    }
