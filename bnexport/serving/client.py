"""A KServe-v2 client over tritonclient (HTTP or gRPC) and the runner that puts an endpoint in
bnexport's runner family, so `bnexport check --url` compares a live server like any backend.

tritonclient is the only protocol code: binary tensors where the server takes them (Triton over
HTTP, every gRPC server), JSON otherwise (MLServer's REST refuses the binary extension; the client
notices once and stays on JSON). Every failure to reach or use the endpoint is one `EndpointError`
line that names the URL and the fix.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from bnexport.runners import Runner
from bnexport.serving.defaults import DEFAULT_TIMEOUT_S
from bnexport.serving.errors import EndpointError, serve_extra_missing
from bnexport.serving.graph_io import V2_TO_NUMPY, GraphIO, TensorIO

if TYPE_CHECKING:
    import numpy as np


class ResponseError(Exception):
    """The server answered, but not with what was asked (an error status, a missing output, rows
    missing): a failing result of the check, not a usage error."""


def split_url(url: str) -> tuple[str, bool]:
    """``host:port`` as tritonclient wants it, and whether the URL asks for TLS."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https", "grpc", "grpcs") or not parts.hostname:
        raise EndpointError(f"--url {url!r}: give host:port or http://host:port")
    if parts.path not in ("", "/"):
        raise EndpointError(f"--url {url!r}: give the server's root, without a path")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = parts.port or (443 if parts.scheme in ("https", "grpcs") else 80)
    return f"{host}:{port}", parts.scheme in ("https", "grpcs")


class V2Client:
    """One endpoint, one protocol: readiness, metadata and inference with numpy arrays."""

    def __init__(self, url: str, *, grpc: bool = False, timeout: float = DEFAULT_TIMEOUT_S):
        self.url = url
        self.grpc = grpc
        self.timeout = timeout
        self.binary = True  # until an HTTP server refuses the binary extension
        address, ssl = split_url(url)
        try:
            if grpc:
                import tritonclient.grpc as module
            else:
                import tritonclient.http as module
        except ImportError as exc:
            raise serve_extra_missing("a v2 client", exc) from None
        self._module = module
        try:
            if grpc:
                self._client = module.InferenceServerClient(address, ssl=ssl)
            else:
                self._client = module.InferenceServerClient(
                    address, ssl=ssl, connection_timeout=timeout, network_timeout=timeout
                )
        except Exception as exc:
            raise self._error("cannot open a client", exc) from None

    @property
    def protocol(self) -> str:
        return "gRPC" if self.grpc else "HTTP"

    def wait_ready(self, name: str) -> None:
        """Return when ``name`` is ready; `EndpointError` when the server or model is not, by
        the timeout."""
        deadline = time.monotonic() + self.timeout
        last: Exception | None = None
        while True:
            try:
                if self._call("is_model_ready", name):
                    return
                last = None
            except Exception as exc:
                last = exc
            if time.monotonic() >= deadline:
                break
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        if last is not None:
            raise self._error(f"no v2 server answers (within {self.timeout:g} s)", last)
        raise EndpointError(self._unready(name))

    def _unready(self, name: str) -> str:
        try:
            index = self._call("get_model_repository_index")
            names = sorted({m["name"] if isinstance(m, dict) else m.name for m in _models(index)})
        except Exception:
            names = []
        known = f"; it serves {', '.join(names)}" if names else ""
        return (
            f"model {name!r} is not ready at {self.url} ({self.protocol}) within "
            f"{self.timeout:g} s{known}; check --name"
        )

    def metadata(self, name: str) -> GraphIO:
        """The model's inputs and outputs as the endpoint declares them."""
        try:
            data = self._call("get_model_metadata", name)
        except Exception as exc:
            raise self._error(f"no metadata for model {name!r}", exc) from None

        def tensors(key: str) -> tuple[TensorIO, ...]:
            return tuple(
                TensorIO(t["name"], t["datatype"], tuple(int(d) for d in t["shape"]))
                for t in data.get(key, ())
            )

        return GraphIO(tensors("inputs"), tensors("outputs"))

    def infer(
        self, name: str, feed: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """One request: ``feed`` in, the named ``outputs`` back as arrays."""
        try:
            result = self._infer(name, feed, outputs)
        except Exception as exc:
            if self.grpc or not self.binary or not _refuses_binary(exc):
                raise self._infer_error(name, exc) from None
            self.binary = False  # MLServer's REST: JSON only
            try:
                result = self._infer(name, feed, outputs)
            except Exception as exc2:
                raise self._infer_error(name, exc2) from None
        arrays = {}
        rows = {len(a) for a in feed.values() if getattr(a, "ndim", 0)}
        for output in outputs:
            array = result.as_numpy(output)
            if array is None:
                raise ResponseError(f"the response of model {name!r} lacks output {output!r}")
            if rows and array.ndim and len(array) not in rows:
                raise ResponseError(
                    f"model {name!r} answered {len(array)} rows of {output!r} for {min(rows)}"
                )
            arrays[output] = array
        return arrays

    def _infer_error(self, name: str, exc: BaseException) -> Exception:
        """A server's error answer is a `ResponseError`; no answer is an `EndpointError`."""
        status = getattr(exc, "status", lambda: None)
        code = status() if callable(status) else status
        if code and not any(w in str(code) for w in ("UNAVAILABLE", "DEADLINE_EXCEEDED")):
            detail = " ".join(str(exc).split())
            return ResponseError(f"model {name!r} answered with an error: {detail}")
        return self._error(f"inference on model {name!r} failed", exc)

    def _infer(self, name: str, feed: Mapping[str, np.ndarray], outputs: Sequence[str]) -> Any:
        from tritonclient.utils import np_to_triton_dtype

        module = self._module
        inputs = []
        for key, array in feed.items():
            tensor = module.InferInput(key, list(array.shape), np_to_triton_dtype(array.dtype))
            if self.grpc:
                tensor.set_data_from_numpy(array)
            else:
                tensor.set_data_from_numpy(array, binary_data=self.binary)
            inputs.append(tensor)
        if self.grpc:
            wanted = [module.InferRequestedOutput(o) for o in outputs]
            return self._client.infer(name, inputs, outputs=wanted, client_timeout=self.timeout)
        wanted = [module.InferRequestedOutput(o, binary_data=self.binary) for o in outputs]
        return self._client.infer(name, inputs, outputs=wanted)

    def _call(self, method: str, *args: Any) -> Any:
        func = getattr(self._client, method)
        if not self.grpc:
            return func(*args)
        if method == "is_model_ready":
            return func(*args, client_timeout=self.timeout)
        return func(*args, as_json=True, client_timeout=self.timeout)

    def _error(self, what: str, exc: BaseException) -> EndpointError:
        from bnexport.errors import raise_if_interrupted

        raise_if_interrupted(exc)
        detail = " ".join(str(exc).split()) or type(exc).__name__
        return EndpointError(f"{self.url} ({self.protocol}): {what}: {detail}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()


def _refuses_binary(exc: BaseException) -> bool:
    """MLServer's REST answers the binary extension with 4xx "JSON decode error"."""
    text = str(exc).lower()
    return "json" in text and ("decode" in text or "invalid" in text)


def _models(index: Any) -> list[Any]:
    if isinstance(index, dict):
        return list(index.get("models", ()))
    return list(index)


class RemoteRunner(Runner):
    """A model behind a v2 endpoint, in bnexport's runner family (``infer(feed) -> outputs``).

    Inputs are cast to the dtype the endpoint declares; outputs come back by name. Its tolerance
    kind is the CPU's (the server runs onnxruntime; a GPU server is checked with ``kind``).
    """

    def __init__(
        self,
        client: V2Client,
        model: str,
        io: GraphIO,
        *,
        name: str = "",
        kind: str = "cpu",
    ) -> None:
        self.client = client
        self.model = model
        self.io = io
        self.name = name or f"v2-{client.protocol.lower()}"
        self.kind = kind
        self.gating = True
        self.description = f"model {model!r} at {client.url} over v2 {client.protocol}"
        self.output_names = [t.name for t in io.outputs]

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np

        cast = {
            t.name: np.ascontiguousarray(feed[t.name], dtype=V2_TO_NUMPY[t.datatype])
            for t in self.io.inputs
        }
        return self.client.infer(self.model, cast, self.output_names)
