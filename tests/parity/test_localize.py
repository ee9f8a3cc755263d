"""Localization (`bnexport check --localize`, `bnexport.parity.localize`): the first layer whose
error exceeds its budget is the one a fault was injected into, on the shipped Net through the CLI,
on a deep model that is bisected, and on a file torch exported itself; correct exports report no
failing layer; the reports carry it (JSON ``layers``, Markdown, JUnit cases only with
``--localize``, at most 10 terminal lines at width 100)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

from bnexport.cli.app import app
from bnexport.export import export_onnx
from bnexport.fold import fold_model
from bnexport.parity import CheckConfig, InputConfig, check_parity
from bnexport.parity.onnx_graph import cut_values, marked_copy, read_graph

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "models" / "net.pt"
QUICK = ["--samples", "8", "--no-bundled", "--batch-sizes", "1", "--opt-levels", "all"]


@pytest.fixture(scope="module")
def net_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("net") / "net.onnx"
    result = runner.invoke(app, ["onnx", str(CHECKPOINT), "-o", str(path), "--no-check"])
    assert result.exit_code == 0, result.output
    return path


def _edited(src: Path, dst: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    proto = onnx.load(str(src))
    edit(proto)
    onnx.save(proto, str(dst))
    return dst


def _leaky(proto: onnx.ModelProto) -> None:
    relu = next(n for n in proto.graph.node if n.op_type == "Relu")
    relu.op_type = "LeakyRelu"
    relu.attribute.append(helper.make_attribute("alpha", 0.01))


def _scale_channel(proto: onnx.ModelProto, node_index: int = 0, delta: float = 1e-3) -> None:
    conv = [n for n in proto.graph.node if n.op_type == "Conv"][node_index]
    init = next(i for i in proto.graph.initializer if i.name == conv.input[1])
    w = numpy_helper.to_array(init).copy()
    w[0] *= np.float32(1 + delta)
    init.CopyFrom(numpy_helper.from_array(w, init.name))


def _check(model: Path, tmp_path: Path, *extra: str) -> tuple[int, str, dict]:
    report = tmp_path / "report.json"
    args = ["check", str(model), "--against", str(CHECKPOINT), *QUICK, "--json", str(report)]
    result = runner.invoke(app, [*args, *extra])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, result.output, json.loads(report.read_text())


def _localize_lines(output: str) -> list[str]:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("localize "))
    return lines[start:]


def test_a_replaced_relu_is_the_first_failing_layer(net_onnx: Path, tmp_path: Path) -> None:
    """Localization runs by itself when the gate fails, names the ReLU, its ONNX node, and the
    folded chain before it as the last layer that agreed."""
    model = _edited(net_onnx, tmp_path / "leaky.onnx", _leaky)
    code, output, report = _check(model, tmp_path)
    assert code == 1
    layers = report["layers"]
    assert layers["first_failing"]["layer"] == "relu"
    assert layers["first_failing"]["onnx_nodes"][0].startswith("LeakyRelu")
    assert layers["last_agreeing"]["layer"] == "bn1"
    assert layers["last_agreeing"]["fold_chain"].startswith("conv1 → bn1")
    assert layers["mapping"]["source"] == "table"
    shown = _localize_lines(output)
    assert len(shown) <= 10 and all(len(line) <= 100 for line in shown)
    assert "first failing layer: relu (ReLU)" in output


def test_a_scaled_conv_channel_fails_at_its_fold_chain(net_onnx: Path, tmp_path: Path) -> None:
    model = _edited(net_onnx, tmp_path / "channel.onnx", _scale_channel)
    code, _, report = _check(model, tmp_path)
    assert code == 1
    first = report["layers"]["first_failing"]
    assert first["layer"] == "bn1"
    assert first["fold_chain"].startswith("conv1 → bn1")
    assert first["ratio"] > 4
    assert report["layers"]["last_agreeing"] is None  # nothing before the first conv


def test_a_correct_export_has_no_failing_layer(net_onnx: Path, tmp_path: Path) -> None:
    """--localize on a passing check compares every layer, and JUnit gets a case per layer."""
    junit = tmp_path / "check.xml"
    code, output, report = _check(net_onnx, tmp_path, "--localize", "--junit", str(junit))
    assert code == 0
    layers = report["layers"]
    assert layers["first_failing"] is None
    assert [x["verdict"] for x in layers["layers"]] == ["pass"] * len(layers["layers"])
    assert "no layer exceeds its budget" in output
    cases = ET.parse(junit).getroot().iter("testcase")
    assert {c.get("name") for c in cases} >= {"bn1", "relu", "fc1"}


def test_junit_cases_per_layer_only_with_localize(net_onnx: Path, tmp_path: Path) -> None:
    model = _edited(net_onnx, tmp_path / "leaky.onnx", _leaky)
    junit = tmp_path / "check.xml"
    _check(model, tmp_path, "--junit", str(junit))
    names = [c.get("classname") for c in ET.parse(junit).getroot().iter("testcase")]
    assert not any(n.startswith("bnexport.parity.layers") for n in names)
    markdown = tmp_path / "check.md"
    _check(model, tmp_path, "--markdown", str(markdown))
    text = markdown.read_text()
    assert "### Localization" in text and "First failing layer: `relu`" in text


def test_no_localize(net_onnx: Path, tmp_path: Path) -> None:
    model = _edited(net_onnx, tmp_path / "leaky.onnx", _leaky)
    code, output, report = _check(model, tmp_path, "--no-localize")
    assert code == 1
    assert "layers" not in report
    assert not re.search(r"^localize ", output, re.M)


def test_the_users_file_is_untouched(net_onnx: Path, tmp_path: Path) -> None:
    model = _edited(net_onnx, tmp_path / "leaky.onnx", _leaky)
    before = model.read_bytes()
    _check(model, tmp_path, "--localize")
    assert model.read_bytes() == before


# ------------------------------------------------------------------------------------------------
# A deep model (bisected) and a file torch wrote
# ------------------------------------------------------------------------------------------------


class Deep(nn.Module):
    """``n`` conv → BN → ReLU blocks and a linear head: every block output is a cut."""

    def __init__(self, n: int = 40, c: int = 4) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *[
                nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
                for _ in range(n)
            ]
        )
        self.head = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean((2, 3)))


def _deep() -> tuple[nn.Module, torch.Tensor]:
    """A seeded deep model with BatchNorm statistics of its own activations (they stay O(1))."""
    torch.manual_seed(0)
    model = Deep()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 4, 8, 8))
    return model.eval(), torch.randn(2, 4, 8, 8)


def _config(**kwargs: object) -> CheckConfig:
    return CheckConfig(
        batch_sizes=(1,),
        opt_levels=("all",),
        samples=4,
        inputs=InputConfig(bundled=False),
        **kwargs,  # type: ignore[arg-type]
    )


def test_a_deep_model_is_bisected_to_the_faulty_block(tmp_path: Path) -> None:
    model, example = _deep()
    fold = fold_model(model, example, verify=False)
    path = tmp_path / "deep.onnx"
    export_onnx(fold.module, example, path, metadata={"folded": "true"})
    proto = onnx.load(str(path))
    _scale_channel(proto, node_index=27, delta=1e-2)
    report = check_parity(
        proto.SerializeToString(),
        model,
        _config(localize="on-failure"),
        folded=fold.module,
        fold_report=fold.report,
    )
    assert not report.passed
    loc = report.layers
    assert loc.strategy == "bisect"
    assert loc.first_failing.layer.key == "blocks.27.1"
    assert loc.first_failing.layer.chain.startswith("blocks.27.0 → blocks.27.1")
    assert loc.last_agreeing.layer.key in ("blocks.26.2", "blocks.26")
    mapped = len(loc.layer_map.layers)
    assert loc.sessions <= 4 and len(loc.results) < mapped / 2  # far fewer than every layer


def test_a_file_torch_wrote_is_mapped_by_its_node_tags(tmp_path: Path) -> None:
    """torch.onnx.export keeps the modules' paths on the nodes: an unfolded file maps module by
    module (the BatchNorm has its own value), and a fault shows at its module."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    program = torch.onnx.export(model, (x,), dynamo=True, optimize=False, verbose=False)
    proto = program.model_proto
    view = read_graph(proto)
    assert view.source == "name_scopes"
    assert {r.module for r in view.table} >= {"0", "1", "2", "3"}
    _leaky(proto)
    config = CheckConfig(
        batch_sizes=(2,),
        opt_levels=("all",),
        samples=4,
        inputs=InputConfig(bundled=False),
        localize="always",
    )
    report = check_parity(proto.SerializeToString(), model, config)
    assert report.layers.first_failing.layer.key == "2"
    assert report.layers.last_agreeing.layer.key == "1"  # the BatchNorm, unfolded


def test_cut_values_and_the_marked_copy() -> None:
    """In a residual block only the block's output is a cut; marking adds outputs to a copy."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Neg", ["a"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["c"]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    view = read_graph(proto)
    assert cut_values(view) == ["a", "c", "y"]
    data = marked_copy(proto, ["b", "y"], view.dtypes)
    assert [o.name for o in proto.graph.output] == ["y"]
    assert [o.name for o in onnx.load_model_from_string(data).graph.output] == ["y", "b"]


def test_fixed_tolerances_localize_too(net_onnx: Path, tmp_path: Path) -> None:
    """With --tolerance fixed there is no truth: each layer is judged by the fixed tolerance."""
    model = _edited(net_onnx, tmp_path / "leaky.onnx", _leaky)
    code, output, report = _check(model, tmp_path, "--tolerance", "fixed", "--no-fp64")
    assert code == 1
    assert report["layers"]["first_failing"]["layer"] == "relu"
    assert report["layers"]["first_failing"]["error"] is None  # no truth, no noise ratio
    assert "first failing layer: relu (ReLU)" in output


def test_a_localization_that_fails_is_a_note(
    net_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The verdict stands; the report says why there is no localization."""
    import bnexport.parity.localize as localize_module

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no session")

    monkeypatch.setattr(localize_module, "localize", broken)
    model = _edited(net_onnx, tmp_path / "leaky.onnx", _leaky)
    code, _, report = _check(model, tmp_path)
    assert code == 1
    assert "layers" not in report
    assert "localization failed: RuntimeError: no session" in report["notes"]
