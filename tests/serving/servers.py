"""Start and stop `bnexport serve`, or PyTriton serving a packaged model, in a subprocess on free
loopback ports, for the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT_S = 60.0
ROOT = Path(__file__).resolve().parents[2]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1."""
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


@dataclass
class Server:
    process: subprocess.Popen
    http: int
    grpc: int
    metrics: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def serve_command(repository: Path, ports: list[int], *extra: str) -> list[str]:
    http, grpc, metrics = ports
    return [
        sys.executable,
        "-m",
        "bnexport",
        "serve",
        str(repository),
        "--port",
        str(http),
        "--grpc-port",
        str(grpc),
        "--metrics-port",
        str(metrics),
        *extra,
    ]


def start_server(repository: Path, log: Path, *extra: str, model: str = "net") -> Server:
    """`bnexport serve` on free ports; returns once ``model`` is ready (or fails the test)."""
    ports = free_ports(3)
    return launch(serve_command(repository, ports, *extra), ports, log, model, "bnexport serve")


def start_pytriton(python: Path, repository: Path, log: Path, model: str = "net") -> Server:
    """Every model of ``repository`` on a real Triton front end: `scripts/pytriton_server.py` run
    by ``python``, the interpreter of the environment `scripts/pytriton_env.sh` builds; returns
    once ``model`` is ready."""
    http, grpc, metrics = ports = free_ports(3)
    command = [
        str(python), str(ROOT / "scripts" / "pytriton_server.py"), str(repository),
        "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
    ]  # fmt: skip
    return launch(command, ports, log, model, "PyTriton")


def launch(command: list[str], ports: list[int], log: Path, model: str, what: str) -> Server:
    """Run ``command`` (a v2 server on ``ports``); return once ``model`` is ready."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(process, *ports, log)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited {process.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(f"{server.url}/v2/models/{model}/ready", timeout=1) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.2)
    server.stop(signal.SIGKILL)
    raise AssertionError(f"{what} not ready in {READY_TIMEOUT_S} s: {log.read_text()}")
