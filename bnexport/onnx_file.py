"""The front door for ONNX files bnexport reads: checked before any work, external data kept safe.

`check_onnx_model` is what every command calls on an ONNX file it is given, before any work: the
path, the bytes, the graph (opsets, ops onnxruntime has kernels for, no cycle, tensors that hold
what their dims declare, consistent shapes), inputs bnexport can feed, and the external data.
`check_onnx_path` refuses a missing path, a directory, or a non-file in one line that names the
fix; `load_onnx` reads the graph without its external data (the weights stay on disk);
`external_data_files` lists the ``.data`` files a model keeps its tensors in, refusing a
location outside the model's folder or a missing file before onnxruntime reads anything, and
`check_model_bytes` refuses a model given as bytes that has external data (bytes have no folder:
onnxruntime would look in the working directory). Every refusal is an `OnnxFileError`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

from bnexport.errors import OnnxFileError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    import onnx


def check_onnx_path(path: str | os.PathLike[str], label: str = "ONNX model") -> Path:
    """``path`` as a `Path` if it is a file; else `OnnxFileError` (``label`` names it: the option,
    e.g. ``--onnx``, or "ONNX model")."""
    path = Path(path)
    if path.is_dir():
        raise OnnxFileError(
            f"{label} {path} is a directory, not an ONNX model; give the .onnx file inside it"
        )
    if not path.is_file():
        if path.exists():
            raise OnnxFileError(f"{label} {path} is not a regular file; give an .onnx file")
        raise OnnxFileError(f"{label} {path} not found; check the path")
    return path


def check_onnx_model(path: str | os.PathLike[str], label: str = "ONNX model") -> onnx.ModelProto:
    """The model at ``path`` (external data left on disk) once it passed every check a command
    makes before any work; else `OnnxFileError` naming ``label``, the path, what is wrong and the
    fix. The checks: a regular, non-empty file that parses as ONNX (`load_onnx`); a graph
    onnxruntime can load and run (`graph_problem`: opsets, ops, cycles,
    tensor sizes, shapes); inputs bnexport can feed; external data beside the model, each
    tensor's bytes inside its file (`external_data_files`)."""
    path = check_onnx_path(path, label)
    if path.stat().st_size == 0:
        raise OnnxFileError(f"{label} {path} is empty (0 bytes); give the exported .onnx file")
    model = load_onnx(path, label)
    problem = graph_problem(model)
    if problem is not None:
        raise OnnxFileError(f"{label} {path} {problem}")
    external_data_files(path)
    return model


def load_onnx(path: str | os.PathLike[str], label: str = "ONNX model") -> onnx.ModelProto:
    """The model at ``path``, its external data left on disk (`check_onnx_path` first)."""
    import onnx

    path = check_onnx_path(path, label)
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise OnnxFileError(
            f"{label} {path} is not an ONNX model ({' '.join(str(exc).split())}); give the "
            "exported .onnx file"
        ) from None


def external_data_files(path: str | os.PathLike[str]) -> tuple[Path, ...]:
    """The external-data files (``.data`` beside the ``.onnx``) the model at `path` uses.

    Every tensor's ``location`` (in subgraphs and functions too) must be a relative path inside
    the model's folder: an absolute path or one that leaves the folder through ``..`` is refused
    (`OnnxFileError`) before onnxruntime reads anything, and so is a missing file. Cached per
    file version.
    """
    check_onnx_path(path)
    st = Path(path).stat()
    return _external_data_files(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _external_data_files(path: str, _mtime_ns: int, _size: int) -> tuple[Path, ...]:
    import onnx

    proto = load_onnx(path)
    folder = Path(path).parent
    files: dict[Path, None] = {}
    for tensor in _tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = Path(os.path.normpath(folder / location))
        if not location or os.path.isabs(location) or not target.is_relative_to(folder):
            raise OnnxFileError(
                f"{path}: tensor {tensor.name!r} keeps its data at {location!r}, outside the "
                f"model's folder {folder}; bnexport reads external data only beside the model: "
                "save it with a relative location (onnx.save(..., save_as_external_data=True, "
                "location='model.onnx.data'))"
            )
        if not target.is_file():
            raise OnnxFileError(
                f"{path}: tensor {tensor.name!r} keeps its data in {target}, which is missing; "
                "copy the .data file beside the model"
            )
        _check_extent(path, tensor, target)
        files[target] = None
    return tuple(files)


def _check_extent(path: str, tensor: onnx.TensorProto, target: Path) -> None:
    """The tensor's bytes (offset, length) lie inside its .data file, and the length is what its
    dims and type need (onnxruntime would fail later, in its own log lines)."""
    info = {e.key: e.value for e in tensor.external_data}
    try:
        offset = int(info.get("offset") or 0)
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise OnnxFileError(
            f"{path}: tensor {tensor.name!r} has a malformed external-data offset or length "
            f"({info}); re-save the model with onnx.save(..., save_as_external_data=True)"
        ) from None
    size = target.stat().st_size
    needed = tensor_bytes(tensor)
    end = offset + (length if length is not None else (needed or 0))
    if length is not None and needed is not None and length != needed:
        raise OnnxFileError(
            f"{path}: tensor {tensor.name!r} declares {needed} bytes (dims "
            f"{list(tensor.dims)}) but its external data claims {length}; the model and its "
            f"{target.name} do not belong together: re-save them together"
        )
    if offset < 0 or end > size:
        raise OnnxFileError(
            f"{path}: tensor {tensor.name!r} reads bytes {offset} to {end} of {target.name}, "
            f"which holds {size}; the .data file is truncated or belongs to another model: copy "
            "the one saved with this model"
        )


def check_model_bytes(data: bytes) -> None:
    """A model given as bytes has no folder: onnxruntime would look for its external data in the
    working directory. Refuse one that has external data (`OnnxFileError`)."""
    import onnx

    if b"location" not in data:  # the key every external-data tensor serializes: none here
        return
    proto = onnx.load_model_from_string(data)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _tensors(proto)):
        raise OnnxFileError(
            "an ONNX model given as bytes uses external data, which onnxruntime would look for in "
            "the working directory; pass the model's path instead"
        )


def _tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of `model`: initializers, sparse ones, and node attributes, in subgraphs and
    functions too."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for graph in attr.graphs:
                yield from _graph_tensors(graph)


#: Op domains stock onnxruntime has kernels for (besides the model's own functions).
KNOWN_DOMAINS = frozenset(
    {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "ai.onnx.preview"}
)
#: Bytes per element of the tensor types whose size is a whole number of bytes.
ELEMENT_BYTES = {
    1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16,
    16: 2, 17: 1, 18: 1, 19: 1, 20: 1, 24: 1,
}  # fmt: skip
#: The typed field an inline tensor's values sit in without ``raw_data``, and values per element.
_VALUE_FIELDS = {1: ("float_data", 1), 14: ("float_data", 2), 11: ("double_data", 1),
                 15: ("double_data", 2), 7: ("int64_data", 1), 12: ("uint64_data", 1),
                 13: ("uint64_data", 1)}  # fmt: skip
#: Input element types bnexport cannot feed random values to.
_UNFEEDABLE = {0: "undefined", 8: "string"}


def graph_problem(model: onnx.ModelProto) -> str | None:
    """What keeps onnxruntime from loading or running ``model`` (a phrase that follows the file's
    name and ends with the fix), or None: no graph, an opset newer than onnx knows, an op in a
    domain onnxruntime has no kernels for, a cycle, an inline tensor whose bytes do not match its
    dims, no inputs or outputs, an input bnexport cannot feed, shapes that contradict each other
    (onnx's strict shape inference)."""
    checks = (_empty_problem, _opset_problem, _domain_problem, _cycle_problem, _tensor_problem,
              _io_problem, _shape_problem)  # fmt: skip
    for check in checks:
        problem = check(model)
        if problem is not None:
            return problem
    return None


def tensor_bytes(tensor: onnx.TensorProto) -> int | None:
    """The bytes ``tensor``'s dims and type need; None for a type without a whole byte size."""
    per = ELEMENT_BYTES.get(tensor.data_type)
    if per is None:
        return None
    count = 1
    for d in tensor.dims:
        count *= d
    return count * per


def _empty_problem(model: onnx.ModelProto) -> str | None:
    if not model.HasField("graph") or not (model.graph.node or model.graph.output):
        return "holds no graph (is it an ONNX model?); give the exported .onnx file"
    return None


def _opset_problem(model: onnx.ModelProto) -> str | None:
    import onnx.defs

    newest = onnx.defs.onnx_opset_version()
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version > newest:
            return (
                f"imports opset {op.version} of the default ONNX domain; onnx {onnx.__version__} "
                f"knows opsets up to {newest}: re-export it at an opset from 16 to {newest} "
                "(bnexport onnx --opset)"
            )
    return None


def _domain_problem(model: onnx.ModelProto) -> str | None:
    local = {(f.domain, f.name) for f in model.functions}
    for node in _all_nodes(model.graph):
        if node.domain not in KNOWN_DOMAINS and (node.domain, node.op_type) not in local:
            return (
                f"uses the custom op {node.domain}:{node.op_type} (node {node.name!r}), which "
                "stock onnxruntime has no kernel for; export the model without it (a standard "
                "op or an ONNX function)"
            )
    return None


def _cycle_problem(model: onnx.ModelProto) -> str | None:
    """A node input nothing produces, or a cycle, in the main graph (Kahn's algorithm)."""
    graph = model.graph
    known = {""} | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    known |= {t.values.name for t in graph.sparse_initializer}
    producers = {out: n for n in graph.node for out in n.output}
    for node in graph.node:
        for name in node.input:
            if name not in known and name not in producers:
                return (
                    f"is broken: node {node.name or node.op_type!r} reads {name!r}, which no "
                    "input, initializer or node provides; re-export the model"
                )
    left = list(graph.node)
    while left:
        ready = [n for n in left if all(i in known for i in n.input)]
        if not ready:
            names = ", ".join(repr(n.name or n.op_type) for n in left[:3])
            return f"is broken: its graph has a cycle (through {names}); re-export the model"
        for n in ready:
            known.update(n.output)
        left = [n for n in left if n not in ready]
    return None


def _tensor_problem(model: onnx.ModelProto) -> str | None:
    """An inline tensor whose data is not what its dims and type declare."""
    import onnx

    for tensor in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.HasField("segment"):
            continue
        needed = tensor_bytes(tensor)
        if needed is None:
            continue
        count = needed // ELEMENT_BYTES[tensor.data_type]
        if tensor.raw_data:
            have, unit = len(tensor.raw_data), "bytes"
            want = needed
        else:
            field, per = _VALUE_FIELDS.get(tensor.data_type, ("int32_data", 1))
            have, unit, want = len(getattr(tensor, field)), "values", count * per
        if have != want:
            return (
                f"is broken: tensor {tensor.name!r} declares dims {list(tensor.dims)} "
                f"({want} {unit}) but holds {have}; re-export the model"
            )
    return None


def _io_problem(model: onnx.ModelProto) -> str | None:
    """No inputs (nothing to feed), no outputs, or an input that is not a numeric tensor."""
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in constants]
    if not inputs:
        return (
            "takes no inputs, so there is nothing to feed it; bnexport compares a model's "
            "outputs on the inputs it feeds: export the model with its inputs"
        )
    if not graph.output:
        return "has no outputs; export the model with its outputs"
    for value in inputs:
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type":
            return (
                f"has input {value.name!r} of type {kind or 'undefined'}; bnexport feeds "
                "numeric tensors only: give a model whose inputs are numeric tensors"
            )
        elem = value.type.tensor_type.elem_type
        if elem in _UNFEEDABLE:
            return (
                f"has input {value.name!r} of type tensor({_UNFEEDABLE[elem]}); bnexport feeds "
                "numeric tensors only: give a model whose inputs are numeric tensors (convert "
                "strings before the graph)"
            )
    return None


def _shape_problem(model: onnx.ModelProto) -> str | None:
    """onnx's strict shape inference, for graphs of standard ops only (its rules for other
    domains are not onnxruntime's)."""
    import onnx.shape_inference

    if model.functions or any(
        n.domain not in ("", "ai.onnx", "ai.onnx.ml") for n in _all_nodes(model.graph)
    ):
        return None
    try:
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        detail = " ".join(str(exc).split())
        return (
            f"is inconsistent: onnx's shape inference fails ({detail}); a weight or a shape "
            "does not fit the graph: re-export the model"
        )
    return None


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph`` and of its subgraphs."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)
