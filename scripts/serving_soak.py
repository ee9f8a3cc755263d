"""A soak test of a v2 endpoint: N requests (default 10,000) at a fixed concurrency (default 32),
batch 1, HTTP JSON (every v2 server takes it), tritonclient's asyncio client, as `bnexport load`.

Counts the errors and samples the server's resident memory (its process and every descendant,
from /proc) after each thousand answered requests, so the growth from the first thousand to the
last is measured, not guessed. Loopback endpoints only; bounded by the request count and a
per-request timeout.

    .venv/bin/python scripts/serving_soak.py --url 127.0.0.1:8080 --name net --pid SERVER_PID
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

STEP = 1000


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (/proc/PID/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            todo += [int(c) for c in task.read_text().split()]
    return found


def rss_kib(pid: int) -> int:
    """The resident memory of ``pid`` and its descendants, in KiB."""
    total = 0
    for p in descendants(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        total += next((int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS")), 0)
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants (/proc/PID/stat)."""
    import os

    ticks = 0
    for p in descendants(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


async def soak(url: str, name: str, pid: int, requests: int, concurrency: int) -> dict[str, Any]:
    import numpy as np
    import tritonclient.http.aio as client_module
    from tritonclient.utils import np_to_triton_dtype

    client = client_module.InferenceServerClient(url, conn_timeout=30)  # per request, in s
    meta = await client.get_model_metadata(name)
    rng = np.random.default_rng(0)
    inputs = []
    for t in meta["inputs"]:
        shape = [1 if d == -1 else int(d) for d in t["shape"]]
        array = rng.standard_normal(shape).astype(np.float32)
        item = client_module.InferInput(t["name"], shape, np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array, binary_data=False)
        inputs.append(item)
    outputs = [
        client_module.InferRequestedOutput(t["name"], binary_data=False) for t in meta["outputs"]
    ]
    headers = {"Content-Type": "application/json"}
    state = {"sent": 0, "done": 0, "errors": 0, "first_error": ""}
    samples = [(0, rss_kib(pid))]

    async def worker() -> None:
        while state["sent"] < requests:
            state["sent"] += 1
            try:
                await client.infer(name, inputs, outputs=outputs, headers=headers)
            except Exception as exc:
                state["errors"] += 1
                state["first_error"] = state["first_error"] or " ".join(str(exc).split())[:200]
            state["done"] += 1
            if state["done"] % STEP == 0:
                samples.append((state["done"], rss_kib(pid)))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    await client.close()
    first, last = samples[1][1], samples[-1][1]
    return {
        "requests": state["done"],
        "errors": state["errors"],
        "first_error": state["first_error"],
        "seconds": seconds,
        "throughput": state["done"] / seconds,
        "rss_kib": samples,
        "growth": (last - first) / first,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--pid", type=int, required=True, help="the server's process id")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    result = asyncio.run(soak(args.url, args.name, args.pid, args.requests, args.concurrency))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    rss = result["rss_kib"]
    print(
        f"soak: {result['requests']} requests at concurrency {args.concurrency}, "
        f"{result['errors']} errors, {result['throughput']:.0f} req/s; server RSS "
        f"{rss[1][1] / 1024:.0f} MiB after the first {STEP}, {rss[-1][1] / 1024:.0f} MiB after "
        f"the last ({100 * result['growth']:+.1f} %; {rss[0][1] / 1024:.0f} MiB before)"
    )
    if result["first_error"]:
        print(f"first error: {result['first_error']}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
