"""A small v2 REST server (JSON only) over onnxruntime that misbehaves on request, for the
`check --url` fault tests: ``mix`` makes each row depend on the others of its request,
``reverse`` answers rows out of order, ``drop`` leaves an output out, ``shape`` declares another
input shape. Runs in a thread on a free loopback port."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from bnexport.ort import make_session
from bnexport.serving.graph_io import read_graph_io


@contextmanager
def fake_server(model: Path, name: str, mode: str) -> Iterator[str]:
    import onnx

    session = make_session(model)
    io = read_graph_io(onnx.load(str(model)), name)
    meta = {"name": name, "platform": "fake", **io.to_dict()}
    if mode == "shape":
        meta["inputs"][0]["shape"] = [-1, 3, 28, 28]
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path in ("/v2/health/ready", f"/v2/models/{name}/ready"):
                self.reply(200, {})
            elif self.path == f"/v2/models/{name}":
                self.reply(200, meta)
            else:
                self.reply(404, {"error": f"no {self.path}"})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Inference-Header-Content-Length"):
                self.reply(400, {"error": "JSON decode error"})  # JSON only, as MLServer
                return
            request = json.loads(body)
            feed = {
                i["name"]: np.asarray(i["data"], dtype=np.float32).reshape(i["shape"])
                for i in request["inputs"]
            }
            names = [o.name for o in session.get_outputs()]
            with lock:
                outs = dict(zip(names, session.run(names, feed), strict=True))
            if mode == "mix":
                outs = {k: v + 1e-2 * v.mean(axis=0, keepdims=True) for k, v in outs.items()}
            if mode == "reverse":
                outs = {k: v[::-1] for k, v in outs.items()}
            if mode == "drop":
                outs.popitem()
            self.reply(
                200,
                {
                    "model_name": name,
                    "outputs": [
                        {
                            "name": k,
                            "datatype": "FP32",
                            "shape": list(v.shape),
                            "data": v.ravel().tolist(),
                        }
                        for k, v in outs.items()
                    ],
                },
            )

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
