"""Serving defaults: one definition each, shared by the library and the CLI's ``--help``.

This module imports nothing, so the CLI can show them without loading onnx or MLServer.
"""

from __future__ import annotations

#: `bnexport package`: the model version folder, the largest batch the server may form, how many
#: model instances, and the dynamic batcher's queue delay (µs; MLServer's ``max_batch_time`` is the
#: same value in seconds). Measured on the shipped Net (docs/serving.md, "Performance").
DEFAULT_VERSION = 1
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_INSTANCES = 1
DEFAULT_QUEUE_DELAY_US = 2000

#: `bnexport serve`: loopback unless another host is asked for; the v2 REST, gRPC and Prometheus
#: ports (MLServer's defaults; Triton's are 8000, 8001 and 8002); the model runs in the server's
#: own process (0 workers): on the shipped Net with adaptive batching, 765 req/s at concurrency 16
#: against 524 with one worker process (docs/serving.md, "Performance").
DEFAULT_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8080
DEFAULT_GRPC_PORT = 8081
DEFAULT_METRICS_PORT = 8082
DEFAULT_WORKERS = 0
#: The largest request body `bnexport serve` reads, in MiB (Triton's --http-max-input-size: 64 MiB).
DEFAULT_MAX_BODY_MB = 64

#: `bnexport load` (perf_analyzer's shape): concurrencies, the batch size of each request, the
#: seconds of one measurement window, the most windows per concurrency, and the stability rule
#: (two consecutive windows' throughputs within this fraction of each other).
DEFAULT_CONCURRENCY: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
DEFAULT_LOAD_BATCH_SIZE = 1
DEFAULT_WINDOW_S = 2.0
DEFAULT_MAX_WINDOWS = 5
DEFAULT_STABILITY = 0.10
DEFAULT_WARMUP_REQUESTS = 20

#: Seconds a client waits for a server (connect and each request).
DEFAULT_TIMEOUT_S = 10.0
