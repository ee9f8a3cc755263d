"""ONNX and torch.export output of the (folded) seed Net, checked against an independent reference.

The reference is `reference.net_forward_f64`: the seed Net written in float64 from the raw
state_dict with torch.nn.functional, never through bnexport. The ONNX files run on onnxruntime.
Then models with several inputs (float and int64) and dict/tuple outputs: names and batch dims read
from the ONNX graph, numbers against the eager model; and the second stage (onnxscript's BatchNorm
fusions) on BatchNorms left in the graph, positive and negative.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from collections import Counter
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
NET_NAMES = {"input_names": ("input",), "output_names": ("logits",)}  # as `bnexport onnx` passes
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
        result = export_onnx(model, example, d / "net.onnx", metadata=METADATA, **NET_NAMES)
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
    result = export_onnx(model, _inputs(2, 0), tmp_path / "t.onnx", **NET_NAMES)
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


@pytest.mark.parametrize(
    ("opset", "advice"),
    [(7, "use 16, or"), (13, "use 16, or"), (99, "use 28, or")],
)
def test_an_opset_outside_the_measured_range_is_refused_up_front(
    net: Net, tmp_path: Path, opset: int, advice: str
) -> None:
    with pytest.raises(
        ExportError, match=rf"opset {opset} is outside .* \(16 to 28\); {advice} the default 20"
    ):
        export_onnx(net, _inputs(2, 0), tmp_path / "old.onnx", opset=opset)
    assert list(tmp_path.iterdir()) == []


def test_an_opset_the_exporter_cannot_convert_this_model_to_is_refused(
    net: Net, tmp_path: Path
) -> None:
    """Below the range's floor is the case: opset 15 converts a folded Net, not a BatchNorm."""
    import bnexport.export.to_onnx as export

    with (
        pytest.MonkeyPatch.context() as mp,
        pytest.raises(
            ExportError, match=r"cannot convert this model from opset 18, .* to 15; use --opset 18"
        ),
    ):
        mp.setattr(export, "opset_problem", lambda opset: None)
        export_onnx(net, _inputs(2, 0), tmp_path / "old.onnx", opset=15)
    assert list(tmp_path.iterdir()) == []


def test_the_measured_opset_range_exports(net: Net, tmp_path: Path) -> None:
    """Both ends of `OPSET_MIN`..`OPSET_MAX` export the unfolded Net (its BatchNormalization)."""
    from bnexport.defaults import OPSET_MAX, OPSET_MIN

    for opset in (OPSET_MIN, OPSET_MAX):
        result = export_onnx(
            net, _inputs(2, 0), tmp_path / f"{opset}.onnx", opset=opset, **NET_NAMES
        )
        assert result.opset == opset
        _assert_close_to_reference(
            _run(result.path, _inputs(8, 1)), net.state_dict(), _inputs(8, 1)
        )


def test_check_program_explains_a_mismatch(exported: dict, net: Net, tmp_path: Path) -> None:
    """A program that is not the model (one weight nudged) fails, saying where and by how much."""
    from bnexport.parity.inputs import InputConfig
    from bnexport.parity.program import check_program

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
    assert out.worst is not None and out.worst.index == (3,)
    assert out.noise_ratio > out.tolerance.factor  # E/F, above the limit, reported
    assert out.min_atol_scale > 0  # the fixed tolerance that would have passed


class _Offset(torch.nn.Module):
    """Conv → BN → ReLU, three times, with a 1e4 offset each BN removes: the fp32 model rounds
    at 1e4 (its own error 1e-3 of the output here, 2.5e-5 with a 1e3 offset: too close to the
    fixed tolerance on some CPUs); the folded one never sees the offset."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = []
        for c in (3, 16, 16):
            conv, bn = torch.nn.Conv2d(c, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
            with torch.no_grad():
                conv.bias.fill_(1e4)
                bn.running_mean.fill_(1e4)
            layers += [conv, bn, torch.nn.ReLU()]
        self.body = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(16, 10)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_check_program_judges_by_the_noise_floor(tmp_path: Path) -> None:
    """A correct program of an ill-conditioned model passes `check`'s noise rule (its error
    against float64 is far below fp32's own), where the fixed tolerance blames the program for
    the fp32 reference's rounding."""
    from bnexport.fold import fold_model
    from bnexport.noise import NoiseTolerance
    from bnexport.parity.inputs import InputConfig
    from bnexport.parity.program import check_program
    from bnexport.parity.tolerance import DEFAULT_TOLERANCES

    model, x = _Offset(), torch.randn(2, 3, 16, 16)
    path = tmp_path / "offset.pt2"
    save_program(fold_model(model, x).module, x, path)
    few = InputConfig(bundled=False, random_count=16)
    noise = check_program(path, model, input_shape=(3, 16, 16), inputs=few)
    assert isinstance(noise.tolerance, NoiseTolerance) and noise.passed
    (out,) = noise.outputs
    assert out.noise_ratio < 1.0 and out.noise > 1e-5  # fp32's own error is the large one
    fixed = check_program(
        path, model, input_shape=(3, 16, 16), inputs=few, tolerance=DEFAULT_TOLERANCES["torch"]
    )
    assert not fixed.passed


# --------------------------------------------------------------------------------------------
# Several inputs, any outputs: names from the forward and the output structure, batch everywhere


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


class _ImageAndIds(torch.nn.Module):
    """A float image and int64 token ids in, a dict out (the order of the keys is not sorted)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.embed = torch.nn.Embedding(10, 4)

    def forward(self, image: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self.conv(image).mean((2, 3))
        b = self.embed(ids).mean(1)
        return {"score": (a * b).sum(1, keepdim=True), "aux": a - b}


def _image_and_ids(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 6, 6, generator=gen), torch.randint(
        0, 10, (batch, 5), generator=gen
    )


def test_several_inputs_are_named_after_the_forward_and_outputs_after_the_dict(
    tmp_path: Path,
) -> None:
    model = _ImageAndIds().eval()
    result = export_onnx(model, _image_and_ids(2, 0), tmp_path / "m.onnx")
    graph = onnx.load(result.path).graph
    assert [v.name for v in graph.input] == ["image", "ids"] == list(result.input_names)
    assert [v.name for v in graph.output] == ["score", "aux"] == list(result.output_names)
    assert graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [_dims(v) for v in graph.input] == [["batch", 3, 6, 6], ["batch", 5]]
    assert [_dims(v) for v in graph.output] == [["batch", 1], ["batch", 4]]
    for batch in (1, 7):
        image, ids = _image_and_ids(batch, seed=batch)
        got = _session(result.path).run(None, {"image": image.numpy(), "ids": ids.numpy()})
        with torch.no_grad():
            want = model(image, ids)
        for name, arr in zip(["score", "aux"], got, strict=True):
            np.testing.assert_allclose(arr, want[name].numpy(), rtol=1e-5, atol=1e-6)


class _Tuple(torch.nn.Module):
    """Two outputs whose natural names clash with the graph's own values, and an input passed
    straight through."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.fc(x).relu(), self.fc(x), x


@pytest.mark.parametrize(
    ("names", "want"),
    [
        (None, ["output_0", "output_1", "output_2"]),
        (("relu", "linear", "x_out"), ["relu", "linear", "x_out"]),
        (("linear", "relu", "same"), ["linear", "relu", "same"]),  # names the graph also uses
    ],
)
def test_tuple_outputs_get_numbered_or_given_names(
    names: tuple[str, ...] | None, want: list[str], tmp_path: Path
) -> None:
    model = _Tuple().eval()
    result = export_onnx(model, torch.randn(2, 4), tmp_path / "t.onnx", output_names=names)
    graph = onnx.load(result.path).graph
    assert [v.name for v in graph.output] == want
    assert all(_dims(v)[0] == "batch" for v in graph.output)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    got = dict(zip(want, _session(result.path).run(want, {"x": x.numpy()}), strict=True))
    with torch.no_grad():
        ref = model(x)
    for name, tensor in zip(want, ref, strict=True):
        np.testing.assert_allclose(got[name], tensor.numpy(), rtol=1e-6, atol=1e-6)


def test_a_single_tensor_output_is_named_output_by_default(net: Net, tmp_path: Path) -> None:
    graph = onnx.load(export_onnx(net, _inputs(2, 0), tmp_path / "n.onnx").path).graph
    assert [v.name for v in graph.input] == ["x"]  # Net.forward(self, x)
    assert [v.name for v in graph.output] == ["output"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"output_names": ("a", "b")}, "3 output.* but 2 output names"),
        ({"input_names": ("a", "b")}, "1 input.* but 2 input names"),
        ({"output_names": ("x", "b", "c")}, "must all differ"),
    ],
)
def test_wrong_names_are_refused_and_leave_no_file(
    kwargs: dict, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match=message):
        export_onnx(_Tuple().eval(), torch.randn(2, 4), tmp_path / "bad.onnx", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_example_inputs_of_different_batch_sizes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="different batch sizes"):
        export_onnx(_ImageAndIds(), (torch.randn(2, 3, 6, 6), torch.zeros(3, 5)), tmp_path / "b")


def test_saved_program_takes_several_inputs(tmp_path: Path) -> None:
    from bnexport.parity.inputs import InputConfig
    from bnexport.parity.program import check_program

    model = _ImageAndIds().eval()
    path = tmp_path / "m.pt2"
    save_program(model, _image_and_ids(2, 0), path)
    loaded = torch.export.load(str(path)).module()
    image, ids = _image_and_ids(7, seed=1)
    with torch.no_grad():
        want, got = model(image, ids), loaded(image, ids)
    for key in ("score", "aux"):
        torch.testing.assert_close(got[key], want[key])
    few = InputConfig(bundled=False, random_count=8)
    check = check_program(
        path, model, input_shape=[(3, 6, 6), (5,)], input_dtypes=["float32", "int64"], inputs=few
    )
    assert check.passed and [o.name for o in check.outputs] == ["score", "aux"]


# --------------------------------------------------------------------------------------------
# The second stage: onnxscript's BatchNorm fusions, for what bnexport's fold left


def _bn_stats(bn: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(n, generator=gen) * 0.3)
        bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
        bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return bn


class _LayerThenFunctionalBN(torch.nn.Module):
    """A layer, then `F.batch_norm` on its output (what timm's BatchNormAct2d traces to)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.layer, bn = {
            "conv": (torch.nn.Conv2d(4, 6, 3), torch.nn.BatchNorm2d(6)),
            "conv_transpose": (
                torch.nn.ConvTranspose2d(4, 6, 3, groups=2),
                torch.nn.BatchNorm2d(6),
            ),
            "linear": (torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6)),
        }[kind]
        self.bn = _bn_stats(bn, 6)
        self.shape = (4, 5, 5) if kind != "linear" else (4,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        y = torch.nn.functional.batch_norm(
            self.layer(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
        )
        return torch.relu(y)


class _SharedConvOutput(torch.nn.Module):
    """The conv's output feeds the BN and the sum: the BN can't be fused (a negative case)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.conv = torch.nn.Conv2d(4, 6, 3)
        self.bn = _bn_stats(torch.nn.BatchNorm2d(6), 8)
        self.shape = (4, 5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def _ops_and_error(model: torch.nn.Module, path: Path, fuse: bool) -> tuple[Counter, int, float]:
    x = torch.randn(2, *model.shape, generator=torch.Generator().manual_seed(0))
    result = export_onnx(model, x, path, fuse_batchnorm=fuse)
    ops = Counter(n.op_type for n in onnx.load(result.path).graph.node)
    x7 = torch.randn(7, *model.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.double()(x7.double()).numpy()
    model.float()
    (got,) = _session(result.path).run(None, {"x": x7.numpy()})
    return ops, result.bn_fused_by_onnxscript, float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("kind", ["conv", "conv_transpose", "linear"])
def test_second_stage_fuses_a_batchnorm_the_fold_left(kind: str, tmp_path: Path) -> None:
    model = _LayerThenFunctionalBN(kind).eval()
    ops, fused, err = _ops_and_error(model, tmp_path / "off.onnx", fuse=False)
    assert ops["BatchNormalization"] == 1 and fused == 0 and err < 1e-5  # --no-fold: as it is
    ops, fused, err = _ops_and_error(model, tmp_path / "on.onnx", fuse=True)
    assert ops["BatchNormalization"] == 0, dict(ops)
    assert fused == 1 and err < 1e-5


def test_second_stage_leaves_a_batchnorm_whose_layer_output_has_other_users(
    tmp_path: Path,
) -> None:
    ops, fused, err = _ops_and_error(_SharedConvOutput().eval(), tmp_path / "s.onnx", fuse=True)
    assert ops["BatchNormalization"] == 1 and fused == 0 and err < 1e-5
