"""Malformed ONNX files, each derived from one good export: the bad-input suite feeds them to every
command that reads an ONNX file (`check`, `tune`, `bench --onnx`, `bench --tuned`).

Each maker takes the good model (a ``ModelProto``, not changed) and the folder to write into, and
returns the path of the bad file. The good model's first input is ``[batch, …]`` float32.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Maker = Callable[[onnx.ModelProto, Path], Path]


def _save(model: onnx.ModelProto, folder: Path, name: str) -> Path:
    path = folder / f"{name}.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def empty(good: onnx.ModelProto, folder: Path) -> Path:
    """Zero bytes."""
    path = folder / "empty.onnx"
    path.write_bytes(b"")
    return path


def truncated(good: onnx.ModelProto, folder: Path) -> Path:
    """The first half of a good file's bytes."""
    data = good.SerializeToString()
    path = folder / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    return path


def text(good: onnx.ModelProto, folder: Path) -> Path:
    """A text file named .onnx."""
    path = folder / "notes.onnx"
    path.write_text("not a model\n")
    return path


def directory(good: onnx.ModelProto, folder: Path) -> Path:
    """A directory named x.onnx."""
    path = folder / "x.onnx"
    path.mkdir(exist_ok=True)
    return path


def custom_domain(good: onnx.ModelProto, folder: Path) -> Path:
    """The first node's op in a custom domain onnxruntime has no kernel for."""
    m = copy.deepcopy(good)
    m.graph.node[0].domain = "com.example"
    m.graph.node[0].op_type = "Frobnicate"
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    return _save(m, folder, "custom_domain")


def opset_99(good: onnx.ModelProto, folder: Path) -> Path:
    """The default domain's opset set to 99."""
    m = copy.deepcopy(good)
    for op in m.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = 99
    return _save(m, folder, "opset_99")


def cycle(good: onnx.ModelProto, folder: Path) -> Path:
    """The first node also consumes the last node's output: a cycle."""
    m = copy.deepcopy(good)
    last = m.graph.node[-1].output[0]
    first = m.graph.node[0]
    m.graph.node.append(helper.make_node("Identity", [last], ["loop"]))
    first.input[0] = "loop"
    return _save(m, folder, "cycle")


def huge_dims(good: onnx.ModelProto, folder: Path) -> Path:
    """An initializer whose dims claim 2**40 elements but whose data holds four."""
    m = copy.deepcopy(good)
    tensor = numpy_helper.from_array(np.zeros(4, np.float32), "huge")
    del tensor.dims[:]
    tensor.dims.extend([1 << 20, 1 << 20])
    m.graph.initializer.append(tensor)
    m.graph.node.append(helper.make_node("Identity", ["huge"], ["huge_out"]))
    return _save(m, folder, "huge_dims")


def wrong_shape(good: onnx.ModelProto, folder: Path) -> Path:
    """The first weight initializer (rank ≥ 2) reshaped so the graph cannot use it."""
    m = copy.deepcopy(good)
    for init in m.graph.initializer:
        if len(init.dims) >= 2:
            array = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(array.reshape(array.shape[::-1]), init.name))
            break
    return _save(m, folder, "wrong_shape")


def _external(good: onnx.ModelProto, folder: Path, name: str, location: str) -> Path:
    """The model with its largest initializer's data external at ``location`` (not written)."""
    m = copy.deepcopy(good)
    init = max(m.graph.initializer, key=lambda t: len(t.raw_data))
    size = len(init.raw_data)
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    return _save(m, folder, name)


def external_escapes(good: onnx.ModelProto, folder: Path) -> Path:
    """External data at ``../outside.data`` (the file exists: only the location is wrong)."""
    sub = folder / "escapes"
    sub.mkdir(exist_ok=True)
    (folder / "outside.data").write_bytes(b"\0" * 1024)
    return _external(good, sub, "escapes", "../outside.data")


def external_missing(good: onnx.ModelProto, folder: Path) -> Path:
    """External data in a .data file that is not there."""
    sub = folder / "missing"
    sub.mkdir(exist_ok=True)
    return _external(good, sub, "missing", "missing.onnx.data")


def external_huge_claim(good: onnx.ModelProto, folder: Path) -> Path:
    """External data whose length claims far more than the .data file holds."""
    sub = folder / "claim"
    sub.mkdir(exist_ok=True)
    (sub / "claim.onnx.data").write_bytes(b"\0" * 64)
    path = _external(good, sub, "claim", "claim.onnx.data")
    m = onnx.load(str(path), load_external_data=False)
    for init in m.graph.initializer:
        for entry in init.external_data:
            if entry.key == "length":
                entry.value = str(1 << 40)
    path.write_bytes(m.SerializeToString())
    return path


def no_inputs(good: onnx.ModelProto, folder: Path) -> Path:
    """The input replaced by a constant initializer: a model that takes nothing."""
    m = copy.deepcopy(good)
    x = m.graph.input[0]
    dims = [d.dim_value or 1 for d in x.type.tensor_type.shape.dim]
    m.graph.initializer.append(numpy_helper.from_array(np.zeros(dims, np.float32), x.name))
    del m.graph.input[:]
    return _save(m, folder, "no_inputs")


def extra_input(good: onnx.ModelProto, folder: Path) -> Path:
    """A second input, ``extra [batch, 4]``, that the PyTorch model does not take."""
    m = copy.deepcopy(good)
    m.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["batch", 4]))
    m.graph.node.append(helper.make_node("Identity", ["extra"], ["extra_out"]))
    return _save(m, folder, "extra_input")


def fixed_batch_3(good: onnx.ModelProto, folder: Path) -> Path:
    """The batch axis of every input and output fixed at 3."""
    m = copy.deepcopy(good)
    for value in [*m.graph.input, *m.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = 3
    return _save(m, folder, "fixed_batch_3")


def string_input(good: onnx.ModelProto, folder: Path) -> Path:
    """The input is a string tensor, cast to float inside the graph."""
    m = copy.deepcopy(good)
    x = m.graph.input[0]
    x.type.tensor_type.elem_type = TensorProto.STRING
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            if name == x.name:
                node.input[i] = "as_float"
    m.graph.node.insert(0, helper.make_node("Cast", [x.name], ["as_float"], to=TensorProto.FLOAT))
    return _save(m, folder, "string_input")


def runtime_failure(good: onnx.ModelProto, folder: Path) -> Path:
    """Passes every static check but fails when run: the input first goes through a Gather
    whose index is past the end of axis 1 (onnxruntime fails at run time, in its own log)."""
    m = copy.deepcopy(good)
    x = m.graph.input[0].name
    for node in m.graph.node:
        for i, name in enumerate(node.input):
            if name == x:
                node.input[i] = "gathered"
    m.graph.initializer.append(numpy_helper.from_array(np.array([5], np.int64), "index"))
    m.graph.node.insert(0, helper.make_node("Gather", [x, "index"], ["gathered"], axis=1))
    return _save(m, folder, "runtime_failure")


#: Every maker, by the name the suite's case ids use.
MAKERS: dict[str, Maker] = {
    "empty": empty,
    "truncated": truncated,
    "text": text,
    "directory": directory,
    "custom_domain": custom_domain,
    "opset_99": opset_99,
    "cycle": cycle,
    "huge_dims": huge_dims,
    "wrong_shape": wrong_shape,
    "external_escapes": external_escapes,
    "external_missing": external_missing,
    "external_huge_claim": external_huge_claim,
    "no_inputs": no_inputs,
    "extra_input": extra_input,
    "fixed_batch_3": fixed_batch_3,
    "string_input": string_input,
    "runtime_failure": runtime_failure,
}


def make_all(good: onnx.ModelProto, folder: Path) -> dict[str, Path]:
    """Every malformed file, written under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return {name: make(good, folder) for name, make in MAKERS.items()}
