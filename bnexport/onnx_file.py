"""The front door for ONNX files bnexport reads: checked before any work, external data kept safe.

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


def load_onnx(path: str | os.PathLike[str], label: str = "ONNX model") -> onnx.ModelProto:
    """The model at ``path``, its external data left on disk (`check_onnx_path` first)."""
    import onnx

    path = check_onnx_path(path, label)
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise OnnxFileError(f"{path} is not an ONNX model: {' '.join(str(exc).split())}") from None


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
        files[target] = None
    return tuple(files)


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
