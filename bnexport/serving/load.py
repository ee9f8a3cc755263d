"""`bnexport load`: a load test shaped like perf_analyzer, against any KServe-v2 endpoint.

Per concurrency level: a warm-up, then measurement windows of ``window_s`` until two consecutive
windows' throughputs agree within ``stability`` (perf_analyzer's 10 %), at most ``max_windows``;
the two agreeing windows (or the last two) are the result — throughput, latency percentiles, errors
— with the client's own CPU share, so a saturated client is visible. ``concurrency`` requests are
kept in flight by as many coroutines on tritonclient's asyncio client (aiohttp for HTTP, grpc.aio
for gRPC). Every loop is bounded by time: the test stops by itself.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bnexport.limits import check_seconds
from bnexport.serving.client import split_url
from bnexport.serving.defaults import (
    DEFAULT_CONCURRENCY,
    DEFAULT_LOAD_BATCH_SIZE,
    DEFAULT_MAX_WINDOWS,
    DEFAULT_STABILITY,
    DEFAULT_TIMEOUT_S,
    DEFAULT_WARMUP_REQUESTS,
    DEFAULT_WINDOW_S,
)
from bnexport.serving.errors import EndpointError, serve_extra_missing
from bnexport.serving.graph_io import V2_TO_NUMPY, GraphIO

#: perf_analyzer's CSV columns (``-f``), in its order; bnexport measures on the client only, so
#: the server-side breakdown columns are left empty.
CSV_COLUMNS: tuple[str, ...] = (
    "Concurrency", "Inferences/Second", "Client Send", "Network+Server Send/Recv",
    "Server Queue", "Server Compute Input", "Server Compute Infer", "Server Compute Output",
    "Client Recv", "p50 latency", "p90 latency", "p95 latency", "p99 latency", "Avg latency",
    "request/response", "response wait",
)  # fmt: skip


@dataclass(frozen=True)
class LoadConfig:
    """What to load, how hard and for how long."""

    url: str
    name: str
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    batch_size: int = DEFAULT_LOAD_BATCH_SIZE
    window_s: float = DEFAULT_WINDOW_S
    max_windows: int = DEFAULT_MAX_WINDOWS
    stability: float = DEFAULT_STABILITY
    warmup_requests: int = DEFAULT_WARMUP_REQUESTS
    grpc: bool = False
    timeout: float = DEFAULT_TIMEOUT_S
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise EndpointError(f"--concurrency {self.concurrency}: each level must be >= 1")
        if self.batch_size < 1 or self.window_s <= 0 or self.max_windows < 2:
            raise EndpointError("--batch-size >= 1, --duration > 0 and at least 2 windows")
        check_seconds(self.window_s, "--duration", positive=True)  # finite: no endless window
        check_seconds(self.timeout, "--timeout", positive=True)


@dataclass
class LevelResult:
    """One concurrency level: the two windows that count, and what it cost the client."""

    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies_s: list[float]
    batch_size: int
    windows: int
    stable: bool
    client_cpu: float  # the client process's CPU seconds per wall second (1.0 = one core)
    first_error: str = ""

    @property
    def throughput(self) -> float:
        """Inferences (rows) per second."""
        return self.requests * self.batch_size / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """Latency percentile ``q`` (0–100) in seconds, nearest rank as perf_analyzer reports."""
        if not self.latencies_s:
            return math.nan
        ordered = sorted(self.latencies_s)
        rank = max(1, math.ceil(q / 100 * len(ordered)))
        return ordered[rank - 1]

    @property
    def mean(self) -> float:
        return sum(self.latencies_s) / len(self.latencies_s) if self.latencies_s else math.nan

    def to_dict(self, raw: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "concurrency": self.concurrency,
            "throughput_infer_per_s": self.throughput,
            "requests": self.requests,
            "errors": self.errors,
            "seconds": self.seconds,
            "batch_size": self.batch_size,
            "latency_s": {f"p{q}": self.percentile(q) for q in (50, 90, 95, 99)}
            | {"mean": self.mean},
            "windows": self.windows,
            "stable": self.stable,
            "client_cpu": self.client_cpu,
            "first_error": self.first_error,
        }
        if raw:
            data["latencies_s"] = list(self.latencies_s)
        return data

    def csv_row(self) -> list[str]:
        us = [f"{self.percentile(q) * 1e6:.0f}" for q in (50, 90, 95, 99)]
        return [
            str(self.concurrency), f"{self.throughput:.2f}", "", "", "", "", "", "", "",
            *us, f"{self.mean * 1e6:.0f}", "", "",
        ]  # fmt: skip


@dataclass
class LoadResult:
    config: LoadConfig
    levels: list[LevelResult] = field(default_factory=list)
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.config.url,
            "model": self.config.name,
            "protocol": "grpc" if self.config.grpc else "http",
            "batch_size": self.config.batch_size,
            "window_s": self.config.window_s,
            "client_cpus": self.cpus,
            "levels": [level.to_dict() for level in self.levels],
        }

    def csv_text(self) -> str:
        rows = [",".join(CSV_COLUMNS)] + [",".join(level.csv_row()) for level in self.levels]
        return "\n".join(rows) + "\n"


Progress = Callable[[int, int, float], None]  # concurrency, window number, its throughput


def run_load(config: LoadConfig, progress: Progress | None = None) -> LoadResult:
    """Measure every concurrency level of ``config`` (`EndpointError`: the endpoint is unusable)."""
    from bnexport.serving.client import V2Client

    client = V2Client(config.url, grpc=config.grpc, timeout=config.timeout)
    try:
        client.wait_ready(config.name)
        io = client.metadata(config.name)
    finally:
        client.close()
    return asyncio.run(_run(config, io, progress or (lambda *_: None)))


async def _run(config: LoadConfig, io: GraphIO, progress: Progress) -> LoadResult:
    result = LoadResult(config)
    request = _Request(config, io)
    await request.open()
    try:
        for level in config.concurrency:
            result.levels.append(await _level(request, config, level, progress))
    finally:
        await request.close()
    return result


async def _level(request: _Request, config: LoadConfig, level: int, progress: Progress):
    warmup = await _window(request, level, math.inf, config.warmup_requests)
    if warmup.errors and not warmup.ok:
        raise EndpointError(
            f"{config.url}: every warm-up request to model {config.name!r} failed: "
            f"{warmup.first_error}"
        )
    windows: list[_Window] = []
    stable = False
    while len(windows) < config.max_windows:
        windows.append(await _window(request, level, config.window_s, None))
        progress(level, len(windows), windows[-1].throughput(config.batch_size))
        if len(windows) >= 2 and _agree(windows[-2:], config):
            stable = True
            break
    last = windows[-2:]
    latencies = [x for w in last for x in w.latencies]
    return LevelResult(
        level, sum(w.ok for w in last), sum(w.errors for w in last),
        sum(w.seconds for w in last), latencies, config.batch_size, len(windows), stable,
        sum(w.cpu for w in last) / max(1e-9, sum(w.seconds for w in last)),
        next((w.first_error for w in windows if w.first_error), ""),
    )  # fmt: skip


def _agree(pair: Sequence[_Window], config: LoadConfig) -> bool:
    a, b = (w.throughput(config.batch_size) for w in pair)
    return max(a, b) > 0 and abs(a - b) <= config.stability * max(a, b)


@dataclass
class _Window:
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    cpu: float = 0.0
    latencies: list[float] = field(default_factory=list)
    first_error: str = ""

    def throughput(self, batch: int) -> float:
        return self.ok * batch / self.seconds if self.seconds else 0.0


async def _window(request: _Request, level: int, seconds: float, count: int | None) -> _Window:
    """``level`` coroutines send requests back to back for ``seconds`` (or ``count`` in all)."""
    window = _Window()
    start, cpu0 = time.perf_counter(), time.process_time()
    end = start + seconds
    budget = [count if count is not None else math.inf]

    async def worker() -> None:
        while time.perf_counter() < end and budget[0] > 0:
            budget[0] -= 1
            t0 = time.perf_counter()
            error = await request.send()
            if error is None:
                window.ok += 1
                window.latencies.append(time.perf_counter() - t0)
            else:
                window.errors += 1
                window.first_error = window.first_error or error

    await asyncio.gather(*(worker() for _ in range(level)))
    window.seconds = time.perf_counter() - start
    window.cpu = time.process_time() - cpu0
    return window


class _Request:
    """One prepared request (random inputs of the batch size) on tritonclient's asyncio client."""

    def __init__(self, config: LoadConfig, io: GraphIO) -> None:
        self.config = config
        self.io = io

    async def open(self) -> None:
        import numpy as np

        try:
            if self.config.grpc:
                import tritonclient.grpc.aio as module
            else:
                import tritonclient.http.aio as module
        except ImportError as exc:
            raise serve_extra_missing("bnexport load", exc) from None
        from tritonclient.utils import np_to_triton_dtype

        # MLServer reads a body without this header as a string, not JSON
        self.headers = None if self.config.grpc else {"Content-Type": "application/json"}
        address, ssl = split_url(self.config.url)
        self.client = module.InferenceServerClient(address, ssl=ssl)
        rng = np.random.default_rng(self.config.seed)
        self.inputs = []
        for tensor in self.io.inputs:
            shape = [self.config.batch_size if i == 0 and d == -1 else max(d, 1)
                     for i, d in enumerate(tensor.shape)]  # fmt: skip
            array = rng.standard_normal(shape).astype(V2_TO_NUMPY[tensor.datatype])
            item = module.InferInput(tensor.name, shape, np_to_triton_dtype(array.dtype))
            if self.config.grpc:
                item.set_data_from_numpy(array)
            else:
                item.set_data_from_numpy(array, binary_data=False)  # JSON: every v2 server
            self.inputs.append(item)
        self.outputs = [
            module.InferRequestedOutput(t.name)
            if self.config.grpc
            else module.InferRequestedOutput(t.name, binary_data=False)
            for t in self.io.outputs
        ]

    async def send(self) -> str | None:
        """One request; None on success, else the error's first line."""
        try:
            await self.client.infer(
                self.config.name, self.inputs, outputs=self.outputs, headers=self.headers
            )
        except Exception as exc:
            return " ".join(str(exc).split())[:300] or type(exc).__name__
        return None

    async def close(self) -> None:
        await self.client.close()
