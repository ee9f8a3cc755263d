"""A model's inputs and outputs as a KServe-v2 server sees them: names, v2 datatypes, dims.

Read from the ONNX graph (never from a session): a dimension the graph leaves symbolic is ``-1``,
as Triton's ``config.pbtxt`` and the v2 metadata write it. Initializers that old exporters also
list as graph inputs are not inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bnexport.serving.errors import RepositoryError

if TYPE_CHECKING:
    import onnx

#: ONNX ``TensorProto`` element types → the v2 protocol's datatype names.
ONNX_TO_V2: dict[int, str] = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "BYTES",
    9: "BOOL",
    10: "FP16",
    11: "FP64",
    12: "UINT32",
    13: "UINT64",
    16: "BF16",
}
#: v2 datatype → numpy dtype name (BF16 has none in numpy).
V2_TO_NUMPY: dict[str, str] = {
    "FP32": "float32",
    "FP64": "float64",
    "FP16": "float16",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "BYTES": "object",
}


@dataclass(frozen=True)
class TensorIO:
    """One input or output: name, v2 datatype (``FP32``) and dims (``-1`` where symbolic)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def triton_type(self) -> str:
        """Triton's ``DataType`` name (``TYPE_FP32``; v2 ``BYTES`` is ``TYPE_STRING``)."""
        return "TYPE_STRING" if self.datatype == "BYTES" else f"TYPE_{self.datatype}"

    @property
    def batch_dynamic(self) -> bool:
        """True when the first dimension is symbolic (a server may batch along it)."""
        return bool(self.shape) and self.shape[0] == -1

    def describe(self) -> str:
        return f"{self.name} [{','.join(str(d) for d in self.shape)}] {self.datatype}"

    def to_dict(self) -> dict[str, Any]:
        """The v2 metadata form: ``{"name", "datatype", "shape"}``."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphIO:
    """A graph's inputs and outputs, in the graph's order."""

    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]

    @property
    def tensors(self) -> tuple[TensorIO, ...]:
        return self.inputs + self.outputs

    def fixed_first_dimension(self) -> tuple[TensorIO, ...]:
        """The tensors whose first dimension is fixed (or that have none): they forbid batching."""
        return tuple(t for t in self.tensors if not t.batch_dynamic)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }


def read_graph_io(model: onnx.ModelProto, where: str) -> GraphIO:
    """The inputs and outputs of ``model`` (`RepositoryError` for a type v2 cannot carry)."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = tuple(_tensor(v, where) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_tensor(v, where) for v in model.graph.output)
    if not inputs or not outputs:
        raise RepositoryError(f"{where}: a served model needs at least one input and one output")
    return GraphIO(inputs, outputs)


def _tensor(value: Any, where: str) -> TensorIO:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        raise RepositoryError(
            f"{where}: {value.name!r} is a {kind}, not a tensor; v2 servers carry tensors only"
        )
    tensor = value.type.tensor_type
    datatype = ONNX_TO_V2.get(tensor.elem_type)
    if datatype is None:
        raise RepositoryError(
            f"{where}: {value.name!r} has ONNX element type {tensor.elem_type}, which the v2 "
            f"protocol cannot carry (it carries {', '.join(sorted(set(ONNX_TO_V2.values())))})"
        )
    if not tensor.HasField("shape"):
        raise RepositoryError(
            f"{where}: {value.name!r} has no shape in the graph; Triton needs its rank"
        )
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    return TensorIO(value.name, datatype, dims)
