"""`bnexport.onnx_file`: an ONNX path is checked before any work, in one line that names the fix,
and external data is found wherever a model keeps tensors (subgraphs and functions too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import convert_model_to_external_data
from tiny_onnx import conv_net, save

from bnexport.errors import OnnxFileError
from bnexport.onnx_file import check_model_bytes, check_onnx_path, external_data_files, load_onnx


def test_a_missing_path_a_directory_and_a_non_onnx_file_are_named(tmp_path: Path) -> None:
    with pytest.raises(OnnxFileError, match=r"^ONNX model .*nope\.onnx not found; check the path"):
        check_onnx_path(tmp_path / "nope.onnx")
    with pytest.raises(OnnxFileError, match=r"^--tuned .*nope\.onnx not found"):
        check_onnx_path(tmp_path / "nope.onnx", "--tuned")
    with pytest.raises(OnnxFileError, match="is a directory, not an ONNX model"):
        load_onnx(tmp_path)
    text = tmp_path / "notes.onnx"
    text.write_text("hello\nworld\n")
    with pytest.raises(OnnxFileError, match=r"notes\.onnx is not an ONNX model") as info:
        load_onnx(text)
    assert "\n" not in str(info.value)
    good = save(conv_net(), tmp_path / "m.onnx")
    assert check_onnx_path(good) == good and load_onnx(good).graph.name == "conv_net"
    assert external_data_files(good) == ()


def _if_model_with_external_branch(folder: Path) -> Path:
    """``y = If(cond, then: y = c, else: y = -c)``, the constant ``c`` inside the then-branch,
    its data saved to ``m.onnx.data``."""
    c = numpy_helper.from_array(np.arange(1024, dtype=np.float32), "c")
    then = helper.make_graph(
        [helper.make_node("Constant", [], ["t"], value=c)],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1024])],
    )
    other = helper.make_graph(
        [helper.make_node("Constant", [], ["e"], value_float=0.0)],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
        "if",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    convert_model_to_external_data(
        model, location="m.onnx.data", size_threshold=0, convert_attribute=True
    )
    path = folder / "m.onnx"
    onnx.save(model, path)
    return path


def test_external_data_inside_a_subgraph_is_found_and_checked(tmp_path: Path) -> None:
    path = _if_model_with_external_branch(tmp_path)
    assert external_data_files(path) == (tmp_path / "m.onnx.data",)
    with pytest.raises(OnnxFileError, match="pass the model's path"):
        check_model_bytes(path.read_bytes())
    (tmp_path / "m.onnx.data").unlink()
    path.touch()  # a new file version: the scan is not served from its cache
    with pytest.raises(OnnxFileError, match="which is missing"):
        external_data_files(path)
