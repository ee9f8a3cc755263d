"""ONNX and torch.export output of the (folded) seed Net, checked against an independent reference.

The reference is `reference.net_forward_f64`: the seed Net written in float64 from the raw
state_dict with torch.nn.functional, never through bnexport. The ONNX files run on onnxruntime.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from reference import net_forward_f64, randomize_net_state

from bnexport import fold_model
from bnexport.data import load_sample, to_tensor
from bnexport.errors import ExportError
from bnexport.export import export_onnx, save_program
from bnexport.nets import Net

TEMPERATURE = 1.5
METADATA = {"source_sha256": "ab" * 32, "temperature": TEMPERATURE, "folded_layers": ["bn1"]}
ORT_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _inputs(batch: int, seed: int) -> torch.Tensor:
    """Bundled Fashion-MNIST images, then seeded random ones: `batch` samples in all."""
    images, _ = load_sample()
    real = to_tensor(images[: batch // 2 + 1])
    noise = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    return torch.cat([real, noise])[:batch]


def _run(path: Path, x: torch.Tensor, level: str = "all") -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ORT_LEVELS[level]
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x.numpy()})[0]


def _assert_close_to_reference(got: np.ndarray, state_dict: dict, x: torch.Tensor) -> None:
    ref = net_forward_f64(state_dict, x, TEMPERATURE).numpy()
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got.astype(np.float64) - ref).max())
    assert err <= 1e-5 * scale, f"max abs err {err:.3g} > 1e-5·{scale:.3g}"
    assert (got.argmax(1) == ref.argmax(1)).all()


@pytest.fixture(scope="module")
def net() -> Net:
    return randomize_net_state(Net(temperature=TEMPERATURE), seed=11).eval()


@pytest.fixture(scope="module")
def exported(net: Net, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The folded Net exported twice (determinism) into empty dirs, and the unfolded one once."""
    example = _inputs(2, seed=0)
    folded = fold_model(net, example).module
    out = {}
    for key, model in (("folded", folded), ("again", folded), ("unfolded", net)):
        d = tmp_path_factory.mktemp(key)
        result = export_onnx(model, example, d / "net.onnx", metadata=METADATA)
        out[key] = result
    out["folded_module"] = folded
    return out


def test_folded_graph_holds_only_conv_relu_reshape_gemm(exported: dict) -> None:
    result = exported["folded"]
    ops = [node.op_type for node in onnx.load(result.path).graph.node]
    assert sorted(ops) == ["Conv", "Gemm", "Relu", "Reshape"]
    assert result.op_counts == {"Conv": 1, "Gemm": 1, "Relu": 1, "Reshape": 1}
    assert result.num_nodes == 4


def test_unfolded_graph_keeps_batchnorm_and_temperature(exported: dict) -> None:
    """The exporter's own BN fusion is off: `--no-fold` means the model as it is."""
    counts = exported["unfolded"].op_counts
    assert counts.get("BatchNormalization") == 1
    assert counts.get("Mul") == 1  # temperature · BN(x)


@pytest.mark.parametrize("key", ["folded", "unfolded"])
@pytest.mark.parametrize("level", ["disabled", "all"])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_onnxruntime_matches_float64_reference(
    exported: dict, net: Net, key: str, level: str, batch: int
) -> None:
    x = _inputs(batch, seed=batch)
    got = _run(exported[key].path, x, level)
    assert got.shape == (batch, 10)
    _assert_close_to_reference(got, net.state_dict(), x)


def test_io_names_and_dynamic_batch(exported: dict) -> None:
    graph = onnx.load(exported["folded"].path).graph

    def dims(value: onnx.ValueInfoProto) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert [v.name for v in graph.input] == ["input"]
    assert [v.name for v in graph.output] == ["logits"]
    assert dims(graph.input[0]) == ["batch", 1, 28, 28]
    assert dims(graph.output[0]) == ["batch", 10]


def test_metadata_producer_and_opset(exported: dict) -> None:
    result = exported["folded"]
    model = onnx.load(result.path)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["source_sha256"] == "ab" * 32
    assert props["temperature"] == "1.5"
    assert props["folded_layers"] == '["bn1"]'
    assert props["bnexport_version"]
    assert props["torch_version"] == torch.__version__
    assert props == result.metadata
    assert model.producer_name == "bnexport"
    assert [(o.domain, o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")] == [
        ("", 20)
    ]
    assert result.opset == 20


def test_same_model_gives_byte_identical_file(exported: dict) -> None:
    first, again = exported["folded"], exported["again"]
    assert first.path.read_bytes() == again.path.read_bytes()
    assert first.sha256 == again.sha256


def test_file_is_self_contained_and_free_of_local_paths(exported: dict) -> None:
    result = exported["folded"]
    assert [p.name for p in result.path.parent.iterdir()] == ["net.onnx"]  # no .data, no temp
    model = onnx.load(result.path, load_external_data=False)
    assert all(init.data_location != onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    onnx.checker.check_model(model, full_check=True)
    raw = result.path.read_bytes()
    for needle in (str(Path(__file__).parent.parent).encode(), b"stack_trace", b"site-packages"):
        assert needle not in raw


def test_export_leaves_the_model_in_its_training_mode(net: Net, tmp_path: Path) -> None:
    model = copy.deepcopy(net).train()
    result = export_onnx(model, _inputs(2, 0), tmp_path / "t.onnx")
    assert model.training and model.bn1.bn.training
    x = _inputs(7, seed=3)
    _assert_close_to_reference(_run(result.path, x), net.state_dict(), x)  # eval semantics


class _FixedBatch(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(2, -1).sum(1)


class _DataDependent(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x - 1


@pytest.mark.parametrize(
    ("model", "message"),
    [(_FixedBatch(), "batch"), (_DataDependent(), "data-dependent")],
    ids=["fixed-batch", "branch"],
)
@pytest.mark.parametrize("kind", ["onnx", "pt2"])
def test_failed_export_raises_quietly_and_leaves_no_file(
    model: torch.nn.Module,
    message: str,
    kind: str,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    export = export_onnx if kind == "onnx" else save_program
    with pytest.raises(ExportError, match=message):
        export(model, torch.randn(2, 3), tmp_path / f"bad.{kind}")
    assert list(tmp_path.iterdir()) == []
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_saved_program_runs_where_bnexport_is_not_importable(
    exported: dict, net: Net, tmp_path: Path
) -> None:
    folded = exported["folded_module"]
    result = save_program(folded, _inputs(2, 0), tmp_path / "net.pt2")
    again = save_program(folded, _inputs(2, 0), tmp_path / "again.pt2")
    assert result.sha256 == again.sha256  # deterministic
    assert "aten.batch_norm" not in " ".join(result.op_counts)
    inputs = {b: _inputs(b, seed=100 + b) for b in (1, 7, 64)}
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        """
        import sys
        sys.modules["bnexport"] = None  # any import of bnexport now fails
        try:
            import bnexport  # noqa: F401
        except ImportError:
            pass
        else:
            raise SystemExit("bnexport is importable")
        import torch
        module = torch.export.load("net.pt2").module()
        inputs = torch.load("inputs.pt", weights_only=True)
        torch.save({b: module(x) for b, x in inputs.items()}, "outputs.pt")
        """
    )
    run = subprocess.run(
        [sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    outputs = torch.load(tmp_path / "outputs.pt", weights_only=True)
    for batch, x in inputs.items():
        got = outputs[batch].detach().numpy()
        assert got.shape == (batch, 10)
        _assert_close_to_reference(got, net.state_dict(), x)


def test_an_opset_the_exporter_cannot_produce_is_refused(exported: dict, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"opset 13 was asked for .* use --opset 18"):
        export_onnx(exported["folded_module"], _inputs(2, 0), tmp_path / "old.onnx", opset=13)
    assert list(tmp_path.iterdir()) == []


def test_check_program_explains_a_mismatch(exported: dict, net: Net, tmp_path: Path) -> None:
    """A program that is not the model (one weight nudged) fails, saying where and by how much."""
    from bnexport.export import check_program
    from bnexport.parity.inputs import InputConfig

    path = tmp_path / "net.pt2"
    save_program(exported["folded_module"], _inputs(2, 0), path)
    few = InputConfig(bundled=False, random_count=32, edge_cases=False)
    same = check_program(path, net, input_shape=(1, 28, 28), inputs=few)
    assert same.passed and same.samples == 32
    other = copy.deepcopy(net)
    with torch.no_grad():
        other.fc1.weight[3] *= 1.01
    check = check_program(path, other, input_shape=(1, 28, 28), inputs=few)
    assert not check.passed
    (out,) = check.outputs
    assert out.violations > 0 and out.worst is not None and out.worst.index == (3,)
    assert out.min_atol_scale > out.tolerance.atol_scale  # the tolerance that would have passed
