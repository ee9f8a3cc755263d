"""The comparison table of docs/fold-comparison.md, bnexport's column: every row measured.

`scripts/compare_tools.py` measures each tool on each row (what is left, error vs float64,
whether a left BN is reported). Here bnexport's cells must be: folded with nothing left and
within 1e-5 of output scale, or — for the unfoldable row — left *and reported* with a reason.
The exported-graph half of the acceptance (no BatchNormalization, no folded Mul/Div/Add) is
checked on the same zoo models by tests/fold/test_zoo.py. The harness itself is tested against
deliberately bad "tools", so a broken measurement can't make every tool look good.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn
from zoo import REL_TOL

ROOT = Path(__file__).resolve().parents[2]


def _load_script() -> ModuleType:
    name = "bnexport_compare_tools"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "compare_tools.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


ct = _load_script()
ROWS = ct.ROWS
_IDS = [r.case_name for r in ROWS]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("row", ROWS, ids=_IDS)
def test_bnexport_row(row) -> None:
    """bnexport folds every foldable row exactly; the unfoldable row is left and reported."""
    cell = ct.measure(row, "bnexport")
    assert cell.error is None, f"{row.label}: {cell.error}"
    assert cell.rel_err <= REL_TOL, f"{row.label}: error {cell.rel_err:.2e} of output scale"
    if row.foldable:
        left = {k: v for k, v in cell.ops_left.items() if v}
        assert not left, f"{row.label}: left {left}"
        assert cell.render().startswith("folded")
    else:
        assert cell.bn_left == 1 and cell.reported, f"{row.label}: {cell.render()}"
        assert "untracked_stats" in cell.render()


def test_rows_cover_the_issue_table() -> None:
    """The table's rows are all there, and each foldable row's model is ONNX-checked in the zoo."""
    labels = " ".join(r.label for r in ROWS)
    for needle in ("`* T`", "`/ T`", "buffer", "groups 2", "depthwise", "Linear → BatchNorm1d"):
        assert needle in labels
    for needle in ("BN → Linear", "BN → Conv (pad 0)", "called twice", "cannot fold"):
        assert needle in labels
    for row in ROWS:
        if row.foldable:
            assert row.case.onnx_arith == {}, f"{row.case_name}: not in test_zoo's ONNX checks"


def test_doc_table_lists_every_row() -> None:
    """docs/fold-comparison.md shows the measured table for the current rows."""
    doc = (ROOT / "docs" / "fold-comparison.md").read_text(encoding="utf-8")
    for row in ROWS:
        assert f"| {row.label} |" in doc, f"regenerate docs/fold-comparison.md: {row.label}"


# ---- the harness can tell good from bad ---------------------------------------------------


def _drop_batchnorms(row, model: nn.Module, x, ref, tmp) -> object:
    """A wrong 'fold': BNs replaced by Identity (what a bad fold's output looks like)."""
    bad = copy.deepcopy(model)
    for name, m in list(bad.named_modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            ct._set(bad, name, nn.Identity())
    return ct._torch_cell(bad, x, ref)


def _identity(row, model: nn.Module, x, ref, tmp) -> object:
    return ct._torch_cell(copy.deepcopy(model), x, ref)


def _raises(row, model, x, ref, tmp) -> object:
    raise RuntimeError("tool exploded")


def test_harness_flags_wrong_output() -> None:
    row = next(r for r in ROWS if r.case_name == "conv_bn_div_t")
    cell = ct.measure(row, _drop_batchnorms)
    assert cell.wrong and "**wrong output**" in cell.render()


def test_harness_flags_what_is_left_and_silence() -> None:
    row = next(r for r in ROWS if r.case_name == "conv_bn_mul_buffer")
    cell = ct.measure(row, _identity)
    assert cell.ops_left == {"BN": 1, "Mul": 1, "Add": 1}
    assert cell.render().startswith("BN, Mul, Add left; silent")
    assert not cell.wrong


def test_harness_records_tool_errors() -> None:
    cell = ct.measure(ROWS[0], _raises)
    assert cell.render() == "error: RuntimeError: tool exploded"


def test_onnx_activation_ops_ignore_weight_arithmetic() -> None:
    """Mul/Add on initializers (weights computed in-graph) are not 'left on the activations'."""
    import onnx
    from onnx import helper

    w = helper.make_tensor("w", onnx.TensorProto.FLOAT, [1], [2.0])
    nodes = [
        helper.make_node("Mul", ["w", "w"], ["w2"]),  # constant arithmetic
        helper.make_node("Mul", ["x", "w2"], ["y"]),  # on the activation path
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        [w],
    )
    assert ct.activation_ops(graph) == {"Mul": 1}
