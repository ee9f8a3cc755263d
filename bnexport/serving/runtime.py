"""bnexport's MLServer runtime: a small class over one onnxruntime session (MLServer's
``MLModel.load/predict``).

``load`` opens ``VERSION/model.onnx`` through bnexport's one session factory
(`bnexport.ort.make_session`) with every tuned setting the file carries, so the served model is
the tuned model; the v2 metadata is the graph's real inputs and outputs. ``predict`` checks each
request against the graph (names, datatypes, shapes) and answers a bad one with HTTP 400 and a
v2 error body naming the fix; the session runs in a worker thread (onnxruntime releases the GIL),
so the event loop keeps accepting requests. MLServer imports this module: it needs the serve
extra.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import InferenceError, MLServerError
from mlserver.types import (
    InferenceRequest,
    InferenceResponse,
    MetadataTensor,
    RequestInput,
    ResponseOutput,
)

from bnexport.serving.graph_io import V2_TO_NUMPY, GraphIO, TensorIO, read_graph_io
from bnexport.serving.repository import MODEL_FILE, open_model_session


class OnnxModel(MLModel):
    """Serves one ONNX file of a bnexport model repository."""

    async def load(self) -> bool:
        from bnexport.onnx_file import load_onnx

        parameters = self.settings.parameters
        folder = Path(parameters.uri if parameters and parameters.uri else ".")
        path = folder / str(self.version or "") / MODEL_FILE
        self._io: GraphIO = read_graph_io(load_onnx(path), str(path))
        self._session = open_model_session(path)
        self._inputs_by_name = {t.name: t for t in self._io.inputs}
        self._output_names = [t.name for t in self._io.outputs]
        self.inputs = [MetadataTensor(**t.to_dict()) for t in self._io.inputs]
        self.outputs = [MetadataTensor(**t.to_dict()) for t in self._io.outputs]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = self.decode_feed(payload.inputs)
        wanted = [o.name for o in payload.outputs or ()] or self._output_names
        unknown = [name for name in wanted if name not in self._output_names]
        if unknown:
            raise InferenceError(
                f"unknown output {unknown[0]!r}; model {self.name} has outputs "
                f"{', '.join(self._output_names)}"
            )
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(None, self._session.run, wanted, feed)
        except Exception as exc:  # onnxruntime's own refusal of an input
            raise InferenceError(f"model {self.name}: {' '.join(str(exc).split())}") from None
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[_encode(name, array) for name, array in zip(wanted, results, strict=True)],
        )

    def decode_feed(self, inputs: list[RequestInput]) -> dict[str, np.ndarray]:
        """The request's inputs as arrays, each checked against the graph (HTTP 400 otherwise)."""
        feed: dict[str, np.ndarray] = {}
        for item in inputs:
            spec = self._inputs_by_name.get(item.name)
            if spec is None:
                raise InferenceError(
                    f"unknown input {item.name!r}; model {self.name} takes "
                    f"{'; '.join(t.describe() for t in self._io.inputs)}"
                )
            feed[item.name] = _decode(item, spec, self.name)
        missing = [name for name in self._inputs_by_name if name not in feed]
        if missing:
            raise InferenceError(f"missing input {missing[0]!r} for model {self.name}")
        batch = {a.shape[0] for a in feed.values() if a.ndim and len(feed) > 1}
        if len(batch) > 1 and all(t.batch_dynamic for t in self._io.inputs):
            raise InferenceError(f"inputs of one request differ in batch size: {sorted(batch)}")
        return feed


def _decode(item: RequestInput, spec: TensorIO, model: str) -> np.ndarray:
    if item.datatype != spec.datatype:
        raise InferenceError(
            f"input {item.name!r} of model {model} is {spec.datatype}, got {item.datatype}"
        )
    shape = tuple(item.shape)
    if len(shape) != len(spec.shape) or any(
        want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
    ):
        raise InferenceError(
            f"input {item.name!r} of model {model} has shape "
            f"[{','.join(str(d) for d in spec.shape)}] (-1: any), got {list(shape)}"
        )
    try:
        array = NumpyCodec.decode_input(item)
        array = np.asarray(array, dtype=V2_TO_NUMPY[spec.datatype]).reshape(shape)
    except (ValueError, TypeError, MLServerError) as exc:
        raise InferenceError(
            f"input {item.name!r}: its data does not fill shape {list(shape)} as "
            f"{spec.datatype} ({' '.join(str(exc).split())})"
        ) from None
    return array


def _encode(name: str, array: np.ndarray) -> ResponseOutput:
    output = NumpyCodec.encode_output(name, np.ascontiguousarray(array))
    output.shape = list(array.shape)
    output.parameters = None
    return output
