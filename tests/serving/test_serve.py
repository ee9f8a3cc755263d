"""`bnexport serve`: v2 REST and gRPC on MLServer through bnexport's runtime — health, metadata
with the real I/O, answers equal to onnxruntime's, metrics, bad input answered with a v2 error
body while the server keeps serving, one-line start failures, a graceful SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from servers import Server, free_ports, serve_command, start_server

from bnexport.ort import make_session
from bnexport.serving.client import V2Client
from bnexport.serving.server import is_loopback

INPUT_SHAPE = (1, 28, 28)


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    if len(body) > 1 << 20:
        return post_large(url, body)
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def post_large(url: str, body: bytes) -> tuple[int, dict]:
    """POST a large body in pieces; a server may answer (413) and close before it has all."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.putrequest("POST", parts.path)
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    try:
        for start in range(0, len(body), 1 << 20):
            conn.send(body[start : start + (1 << 20)])
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered early
    response = conn.getresponse()
    try:
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def infer_body(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> bytes:
    return json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": list(x.shape),
                    "data": x.ravel().tolist(),
                }
            ]
        }
    ).encode()


def reference(path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = make_session(path)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def test_health_ready_and_metadata_with_the_real_io(server: Server) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/net/ready"):
        with urllib.request.urlopen(server.url + path, timeout=5) as response:
            assert response.status == 200, path
    with urllib.request.urlopen(server.url + "/v2/models/pair", timeout=5) as response:
        meta = json.loads(response.read())
    assert meta["inputs"] == [
        {"name": "image", "datatype": "FP32", "shape": [-1, 3, 8, 8]},
        {"name": "meta", "datatype": "FP32", "shape": [-1, 4]},
    ]
    assert [o["name"] for o in meta["outputs"]] == ["scores", "embedding"]
    io = V2Client(server.grpc_url, grpc=True).metadata("net")
    assert [t.describe() for t in io.inputs] == ["input [-1,1,28,28] FP32"]


@pytest.mark.parametrize("grpc", [False, True])
def test_answers_equal_onnxruntime(server: Server, repo: Path, grpc: bool) -> None:
    rng = np.random.default_rng(0)
    client = V2Client(server.grpc_url if grpc else server.url, grpc=grpc)
    for name, feed in (
        ("net", {"input": rng.standard_normal((3, *INPUT_SHAPE), dtype=np.float32)}),
        (
            "pair",
            {
                "image": rng.standard_normal((2, 3, 8, 8), dtype=np.float32),
                "meta": rng.standard_normal((2, 4), dtype=np.float32),
            },
        ),
    ):
        want = reference(repo / name / "1" / "model.onnx", feed)
        got = client.infer(name, feed, list(want))
        for key, value in want.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6)
    assert client.binary is grpc  # MLServer's REST refuses binary tensors: JSON


def test_prometheus_metrics(server: Server) -> None:
    status, _ = post(f"{server.url}/v2/models/net/infer", infer_body(np.zeros((1, *INPUT_SHAPE))))
    assert status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'model_infer_request_success_total{model="net"' in text or "model_infer" in text
    assert "rest_server_requests" in text


BAD = {
    "unknown model": ("/v2/models/nope/infer", infer_body(np.zeros((1, *INPUT_SHAPE))), {}, 404),
    "wrong input name": ("", infer_body(np.zeros((1, *INPUT_SHAPE)), name="x"), {}, 400),
    "wrong dtype": ("", infer_body(np.zeros((1, *INPUT_SHAPE)), datatype="INT64"), {}, 400),
    "wrong shape": ("", infer_body(np.zeros((1, 2, 28, 28))), {}, 400),
    "truncated binary payload": (
        "",
        b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,28,28],'
        b'"parameters":{"binary_data_size":3136}}]}' + b"\0" * 100,
        {"Inference-Header-Content-Length": "96"},
        400,
    ),
    "malformed JSON": ("", b'{"inputs": [{"name": "input"', {}, 400),
    "100 MB body": ("", b" " * (100 << 20), {}, 413),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_v2_error_and_the_server_keeps_serving(
    server: Server, repo: Path, case: str
) -> None:
    path, body, headers, status = BAD[case]
    got, answer = post(server.url + (path or "/v2/models/net/infer"), body, headers)
    assert got == status, answer
    assert isinstance(answer.get("error"), str) and answer["error"], answer
    x = np.full((1, *INPUT_SHAPE), 0.5, dtype=np.float32)
    got, answer = post(f"{server.url}/v2/models/net/infer", infer_body(x))
    assert got == 200
    want = reference(repo / "net" / "1" / "model.onnx", {"input": x})["logits"]
    np.testing.assert_allclose(answer["outputs"][0]["data"], want.ravel(), rtol=1e-5, atol=1e-6)


def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bnexport", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_taken_port_is_one_line(repo: Path) -> None:
    ports = free_ports(3)
    with socket.socket() as held:
        held.bind(("127.0.0.1", ports[0]))
        held.listen()
        done = subprocess.run(
            serve_command(repo, ports), capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"bnexport: error: HTTP port 127.0.0.1:{ports[0]} is taken; pick another with --port"
    ]


def test_invalid_repository_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model-settings.json").write_text("{not json")
    for target, message in ((tmp_path / "none", "is not a folder"), (tmp_path, "not a JSON file")):
        done = run_serve(str(target), "--port", str(free_ports(1)[0]))
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines


def test_non_loopback_hosts_warn() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.3.2.1", "localhost", "::1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "10.0.0.1", "::", "example.org"]))


def test_sigterm_finishes_in_flight_requests(repo: Path, tmp_path: Path) -> None:
    import threading

    server = start_server(repo, tmp_path / "serve.log", "--workers", "0")
    results: list[int] = []
    x = np.zeros((512, *INPUT_SHAPE), dtype=np.float32)  # ~2 MB of JSON: still in flight

    def send() -> None:
        try:
            results.append(post(f"{server.url}/v2/models/net/infer", infer_body(x))[0])
        except urllib.error.URLError:
            results.append(-1)  # connected after the server stopped accepting

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    server.process.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert server.stop() == 0
    assert results.count(200) >= 1 and set(results) <= {200, -1}, results


def test_the_served_session_carries_every_tuned_setting(tmp_path: Path) -> None:
    """The runtime's session (`open_model_session`) has the file's ort_config keys and its
    session config entries, which onnxruntime alone would not read from the file."""
    from tiny_onnx import conv_net, save

    from bnexport.ort_config import OrtSettings, effective_settings
    from bnexport.serving.repository import open_model_session
    from bnexport.tune import with_ort_config

    off = {"session.disable_prepacking": "1"}
    tuned = OrtSettings(intra_op_num_threads=1, session_config_entries=off)  # type: ignore[arg-type]
    path = save(with_ort_config(conv_net(), tuned), tmp_path / "tuned.onnx")
    assert effective_settings(open_model_session(path), off) == tuned
