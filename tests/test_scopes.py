"""The module-output table (`bnexport.scopes`): which value each module call returns, from the
exporter's node tags, and its round trip through an exported file's metadata."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from torch import nn

from bnexport.export import export_onnx
from bnexport.fold import fold_model
from bnexport.nets import Net
from bnexport.scopes import (
    MODULE_OUTPUTS_KEY,
    ModuleOutput,
    NodeScope,
    decode_table,
    encode_table,
    module_outputs,
    parse_name_scopes,
)


def test_parse_name_scopes_drops_the_root_the_node_name_and_placeholders() -> None:
    text = "['', 'layer1', 'layer1.0', 'layer1.0.conv1', 'conv2d_1']"
    assert parse_name_scopes(text) == ("layer1", "layer1.0", "layer1.0.conv1")
    assert parse_name_scopes("['_empty_nn_module_stack_from_metadata_hook', 'sym_size']") == ()
    assert parse_name_scopes("not a list") == ()
    assert parse_name_scopes(None) == ()


def _node(inputs: str, outputs: str, scopes: str) -> NodeScope:
    return NodeScope(tuple(inputs.split()), tuple(outputs.split()), tuple(scopes.split()))


def test_a_block_and_a_module_called_twice() -> None:
    """A residual block: its ReLU is called twice (two groups), the block returns the second."""
    nodes = [
        _node("x w1", "c1", "block block.conv1"),
        _node("c1", "r1", "block block.relu"),
        _node("r1 w2", "c2", "block block.conv2"),
        _node("c2 x", "a", "block"),
        _node("a", "r2", "block block.relu"),
        _node("r2 w3", "y", "fc"),
    ]
    rows = module_outputs(nodes, ["y"])
    assert {(r.module, r.call): r.value for r in rows} == {
        ("block", 0): "r2",
        ("block.conv1", 0): "c1",
        ("block.relu", 0): "r1",
        ("block.conv2", 0): "c2",
        ("block.relu", 1): "r2",
        ("fc", 0): "y",
    }


def test_no_single_output_is_no_row_and_shape_arithmetic_is_no_call() -> None:
    nodes = [
        _node("x", "s", "split"),  # a module returning two values: no row
        _node("s", "t", "split"),
        _node("s t", "u", ""),
        _node("u", "shape", "head"),  # shape arithmetic (not data): not a call of head
        _node("u shape", "y", "head"),
    ]
    rows = module_outputs(nodes, ["y"], is_data=lambda v: v != "shape")
    assert [(r.module, r.call, r.value) for r in rows] == [("head", 0, "y")]


def test_table_round_trip_and_bad_tables() -> None:
    rows = [ModuleOutput("conv1", 0, "conv2d"), ModuleOutput("relu", 1, "relu_2")]
    assert decode_table(encode_table(rows)) == rows
    for bad in ("{", '{"format": 9}', '{"format": 1, "outputs": [["a", "0", "v"]]}'):
        with pytest.raises(ValueError):
            decode_table(bad)


class _Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x).mean((2, 3)))


def test_export_records_the_table_of_the_folded_model(tmp_path) -> None:
    """The exported file (metadata stripped) still says which value each module returns, and the
    same model exports byte-identically."""
    torch.manual_seed(0)
    model = _Wrapped().eval()
    x = torch.randn(2, 3, 8, 8)
    folded = fold_model(model, x, verify=False).module
    a = export_onnx(folded, x, tmp_path / "a.onnx")
    b = export_onnx(folded, x, tmp_path / "b.onnx")
    assert a.sha256 == b.sha256
    proto = onnx.load(str(a.path))
    assert not any(n.metadata_props for n in proto.graph.node)
    table = decode_table({p.key: p.value for p in proto.metadata_props}[MODULE_OUTPUTS_KEY])
    producers = {o: n.op_type for n in proto.graph.node for o in n.output}
    by_module = {r.module: producers.get(r.value, "output") for r in table}
    assert by_module["block.0"] == "Conv"  # the folded conv computes conv → BN
    assert by_module["block.2"] == "Relu"
    assert by_module["block"] == "Relu"
    assert json.loads(a.metadata[MODULE_OUTPUTS_KEY])["format"] == 1


def test_the_shipped_net_table(tmp_path) -> None:
    model = Net(temperature=1.5).eval()
    x = torch.randn(2, 1, 28, 28)
    result = export_onnx(fold_model(model, x, verify=False).module, x, tmp_path / "net.onnx")
    rows = decode_table(result.metadata[MODULE_OUTPUTS_KEY])
    assert [(r.module, r.value) for r in rows] == [
        ("conv1", "conv2d"),
        ("relu", "relu"),
        ("fc1", "output"),
    ]
