"""`bnexport load`: a perf_analyzer-shaped load test against a v2 endpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from bnexport.cli.errors import EXIT_MISMATCH, handle_errors
from bnexport.cli.options import split_ints
from bnexport.cli.render import console, table
from bnexport.serving.defaults import (
    DEFAULT_CONCURRENCY,
    DEFAULT_LOAD_BATCH_SIZE,
    DEFAULT_MAX_WINDOWS,
    DEFAULT_TIMEOUT_S,
    DEFAULT_WINDOW_S,
)


@handle_errors
def load_cli(
    url: Annotated[str, typer.Option("--url", help="The v2 endpoint (host:port or http://…).")],
    name: Annotated[str, typer.Option("--name", help="The model's name on the endpoint.")],
    concurrency: Annotated[
        str, typer.Option("--concurrency", help="Requests in flight, one level after another.")
    ] = ",".join(str(c) for c in DEFAULT_CONCURRENCY),
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Rows per request.")
    ] = DEFAULT_LOAD_BATCH_SIZE,
    duration: Annotated[
        float, typer.Option("--duration", min=0.05, help="Seconds of one measurement window.")
    ] = DEFAULT_WINDOW_S,
    max_windows: Annotated[
        int, typer.Option("--max-windows", min=2, help="Most windows per level.")
    ] = DEFAULT_MAX_WINDOWS,
    grpc: Annotated[bool, typer.Option("--grpc", help="Use v2 gRPC instead of HTTP.")] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the server.")
    ] = DEFAULT_TIMEOUT_S,
    csv: Annotated[
        Path | None,
        typer.Option("--csv", help="Write perf_analyzer's CSV columns here.", show_default=False),
    ] = None,
    json_path: Annotated[
        Path | None,
        typer.Option(
            "--json", help="Write the result with raw latencies here.", show_default=False
        ),
    ] = None,
) -> None:
    """Load URL's model NAME at each concurrency until two windows agree within 10 %, and report
    throughput, latency percentiles, errors and the client's own CPU share."""
    from bnexport.files import check_output_paths, write_files
    from bnexport.serving.load import LoadConfig, run_load

    levels = split_ints(concurrency, "--concurrency") or DEFAULT_CONCURRENCY
    outputs = {flag: p for flag, p in (("--csv", csv), ("--json", json_path)) if p}
    if outputs:
        check_output_paths(outputs)
    config = LoadConfig(
        url, name, tuple(levels), batch_size, duration, max_windows, grpc=grpc, timeout=timeout
    )

    def progress(level: int, window: int, throughput: float) -> None:
        typer.echo(
            f"load: concurrency {level}, window {window}: {throughput:.1f} infer/s", err=True
        )

    result = run_load(config, progress)
    rows = [
        [
            lv.concurrency,
            f"{lv.throughput:.1f}",
            *(f"{lv.percentile(q) * 1e3:.2f}" for q in (50, 90, 95, 99)),
            lv.errors,
            f"{lv.client_cpu:.2f}/{result.cpus}",
            "yes" if lv.stable else "no",
        ]
        for lv in result.levels
    ]
    columns = [
        "concurrency",
        "infer/s",
        "p50 ms",
        "p90 ms",
        "p95 ms",
        "p99 ms",
        "errors",
        "client CPU",
        "stable",
    ]
    console().print(table(f"{name} at {url} (batch {batch_size})", columns, rows))
    writers = {}
    if csv:
        writers[csv] = lambda p: p.write_text(result.csv_text())
    if json_path:
        writers[json_path] = lambda p: p.write_text(json.dumps(result.to_dict(), indent=2))
    if writers:
        write_files(writers)
    saturated = [lv.concurrency for lv in result.levels if lv.client_cpu > 0.9]
    if saturated:
        typer.echo(
            f"note: the client used most of a core at concurrency {saturated}: the numbers there "
            "may measure the client, not the server",
            err=True,
        )
    failed = [lv for lv in result.levels if lv.errors]
    for lv in failed:
        typer.echo(f"errors at concurrency {lv.concurrency}: {lv.first_error}", err=True)
    if failed:
        raise typer.Exit(EXIT_MISMATCH)
