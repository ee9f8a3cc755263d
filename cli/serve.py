"""`bnexport serve`: serve a model repository over KServe v2 (REST and gRPC) on MLServer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnexport.cli.errors import handle_errors
from bnexport.serving import defaults


@handle_errors
def serve_cli(
    repository: Annotated[
        Path,
        typer.Argument(help="A model repository written by bnexport package.", show_default=False),
    ],
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (another than loopback warns).")
    ] = defaults.DEFAULT_HOST,
    port: Annotated[int, typer.Option("--port", help="v2 REST port.")] = defaults.DEFAULT_HTTP_PORT,
    grpc_port: Annotated[
        int, typer.Option("--grpc-port", help="v2 gRPC port.")
    ] = defaults.DEFAULT_GRPC_PORT,
    metrics_port: Annotated[
        int, typer.Option("--metrics-port", help="Prometheus metrics port (/metrics).")
    ] = defaults.DEFAULT_METRICS_PORT,
    workers: Annotated[
        int,
        typer.Option(
            "--workers", min=0, help="Inference worker processes (0: in the server process)."
        ),
    ] = defaults.DEFAULT_WORKERS,
    max_body_mb: Annotated[
        int, typer.Option("--max-body-mb", min=1, help="Largest request body read, in MiB.")
    ] = defaults.DEFAULT_MAX_BODY_MB,
) -> None:
    """Serve every model of REPOSITORY (v2 REST + gRPC, health, metadata, metrics) until Ctrl-C
    or SIGTERM; requests in flight finish first."""
    from bnexport.serving.server import ServeConfig, plan_server, run_server

    plan = plan_server(
        ServeConfig(repository, host, port, grpc_port, metrics_port, workers, max_body_mb)
    )
    for warning in plan.warnings:
        typer.echo(f"bnexport: warning: {warning}", err=True)
    names = ", ".join(m.name for m in plan.models)
    typer.echo(f"serving {names} at {plan.http_url} (gRPC {plan.grpc_url}); Ctrl-C stops", err=True)
    typer.echo(f"metrics at {plan.metrics_url}", err=True)
    run_server(plan)
    typer.echo("bnexport serve: stopped", err=True)
