"""`bnexport onnx` through CliRunner: the folded file's graph, metadata and numbers against an
independent float64 reference; `--no-fold`, `--model`, `--strict`; every bad input exits 2 with one
line and leaves no file."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from reference import net_forward_f64, randomize_net_state
from seed_models import SeedNetMyBN
from typer.testing import CliRunner

from bnexport.checkpoint import save_checkpoint
from bnexport.cli.app import app
from bnexport.data import Normalize
from bnexport.nets import Net

runner = CliRunner()
TEMPERATURE = 1.5
NORMALIZE = Normalize(mean=0.25, std=0.5)

USER_MODELS = '''
import torch
from torch import nn


def _stats(bn, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.3)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.3)
    return bn


class ConvBnDiv(nn.Module):
    """Conv → BN → / 2 + 0.5 → ReLU → pool → Linear: the whole chain folds into the conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = _stats(nn.BatchNorm2d(8), 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.bn(self.conv(x)) / 2.0 + 0.5
        return self.head(torch.relu(y).mean((2, 3)))


class BnAfterRelu(nn.Module):
    """A BN between a ReLU and a pooling: nothing adjacent to fold into, so it stays."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = _stats(nn.BatchNorm2d(8), 2)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.bn(torch.relu(self.conv(x)))
        return self.head(torch.relu(y).amax((2, 3)))


class ComputedWeight(nn.Module):
    """A conv whose weight is computed in forward: the fold leaves its BN (no conv module), the
    exporter folds the weight to a constant and fuses the BN into the Conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.bn = _stats(nn.BatchNorm2d(8), 3)

    def forward(self, x):
        return self.bn(torch.nn.functional.conv2d(x, self.weight * 0.5)).mean((2, 3))
'''


def _ops(path: Path) -> list[str]:
    return sorted(node.op_type for node in onnx.load(path).graph.node)


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(path).metadata_props}


def _ort(path: Path, x: np.ndarray, names: tuple[str, str] = ("input", "logits")) -> np.ndarray:
    """Run on onnxruntime, feeding and fetching by name (the seed Net's by default)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([names[1]], {names[0]: x})[0]


def _assert_matches(got: np.ndarray, ref: torch.Tensor) -> None:
    ref_np = ref.numpy()
    scale = max(1.0, float(np.abs(ref_np).max()))
    assert float(np.abs(got - ref_np).max()) <= 1e-5 * scale
    assert (got.argmax(1) == ref_np.argmax(1)).all()


def _error_line(result) -> str:
    """The single stderr line of a failed command (and nothing like a traceback anywhere)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("bnexport: error: ")
    assert "Traceback" not in result.output
    return lines[0]


X7 = torch.randn(7, 1, 28, 28, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict]:
    net = randomize_net_state(Net(temperature=TEMPERATURE), seed=5)
    path = tmp_path_factory.mktemp("ckpt") / "net.pt"
    sha = save_checkpoint(path, net, normalize=NORMALIZE, metadata={"seed": 5})
    return path, sha, net.state_dict()


@pytest.fixture(scope="module")
def user_models(tmp_path_factory: pytest.TempPathFactory):
    """A module of user models, importable as `bnx_cli_onnx_models`."""
    root = tmp_path_factory.mktemp("user")
    (root / "bnx_cli_onnx_models.py").write_text(USER_MODELS)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        yield "bnx_cli_onnx_models"


@pytest.fixture(scope="module")
def folded_run(ckpt: tuple[Path, str, dict], tmp_path_factory: pytest.TempPathFactory):
    out_dir = tmp_path_factory.mktemp("onnx")
    out, report = out_dir / "net.onnx", out_dir / "report.json"
    result = runner.invoke(
        app, ["onnx", str(ckpt[0]), "-o", str(out), "--report-json", str(report)]
    )
    return result, out, report


def test_folded_export_holds_only_conv_relu_reshape_gemm_and_passes(folded_run, ckpt) -> None:
    result, out, _ = folded_run
    assert result.exit_code == 0, result.output
    assert _ops(out) == ["Conv", "Gemm", "Relu", "Reshape"]
    assert "Fold report: 1 folded, 0 left" in result.stdout
    assert "(TemperatureBatchNorm2d)" in result.stdout and "into conv1" in result.stdout
    assert "PASS" in result.stdout and "FAIL" not in result.stdout
    _assert_matches(_ort(out, X7.numpy()), net_forward_f64(ckpt[2], X7, TEMPERATURE))


def test_metadata_records_the_source(folded_run, ckpt) -> None:
    _, out, _ = folded_run
    props = _props(out)
    assert props["source_sha256"] == ckpt[1]
    assert props["temperature"] == "1.5"
    assert props["folded_layers"] == '["bn1"]'
    assert float(props["normalize_mean"]) == NORMALIZE.mean
    assert float(props["normalize_std"]) == NORMALIZE.std
    assert props["torch_version"] == torch.__version__ and props["bnexport_version"]


def test_report_json_has_fold_export_and_parity(folded_run, ckpt) -> None:
    _, out, report_path = folded_run
    report = json.loads(report_path.read_text())
    assert report["source"]["sha256"] == ckpt[1]
    (entry,) = report["fold"]["entries"]
    assert entry["bn"] == "bn1" and entry["status"] == "folded" and entry["into"] == "conv1"
    assert report["export"]["op_counts"] == {"Conv": 1, "Gemm": 1, "Relu": 1, "Reshape": 1}
    assert report["export"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert report["parity"]["passed"] is True


def test_no_fold_keeps_batchnorm_and_temperature(ckpt, tmp_path: Path) -> None:
    out = tmp_path / "raw.onnx"
    result = runner.invoke(app, ["onnx", str(ckpt[0]), "-o", str(out), "--no-fold", "--no-check"])
    assert result.exit_code == 0, result.output
    assert _ops(out) == ["BatchNormalization", "Conv", "Gemm", "Mul", "Relu", "Reshape"]
    assert _props(out)["folded"] == "false"
    _assert_matches(_ort(out, X7.numpy()), net_forward_f64(ckpt[2], X7, TEMPERATURE))


def test_seed_mybn_state_dict_exports_with_temperature(tmp_path: Path) -> None:
    seed = randomize_net_state(SeedNetMyBN(temperature=2.0), seed=9)
    path, out = tmp_path / "seed.pt", tmp_path / "seed.onnx"
    torch.save(seed.state_dict(), path)
    args = ["onnx", str(path), "-o", str(out), "--temperature", "2", "--no-check"]
    result = runner.invoke(app, args)  # the parity check itself is covered by `folded_run`
    assert result.exit_code == 0, result.output
    assert _ops(out) == ["Conv", "Gemm", "Relu", "Reshape"]
    assert _props(out)["temperature"] == "2.0"
    _assert_matches(_ort(out, X7.numpy()), net_forward_f64(seed.state_dict(), X7, 2.0))


def test_user_model_chain_folds_away(user_models: str, tmp_path: Path) -> None:
    from importlib import import_module

    out = tmp_path / "user.onnx"
    args = [
        "onnx",
        "--model",
        f"{user_models}:ConvBnDiv",
        "--input-shape",
        "3,12,12",
        "-o",
        str(out),
    ]
    result = runner.invoke(app, [*args, "--strict"])
    assert result.exit_code == 0, result.output
    ops = _ops(out)
    assert "BatchNormalization" not in ops
    assert not {"Div", "Add", "Mul", "Sub"} & set(ops), ops
    model = import_module(user_models).ConvBnDiv().eval()
    x = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        conv = model.conv.double()
        bn = model.bn.double()
        y = torch.nn.functional.conv2d(x.double(), conv.weight, conv.bias, padding=1)
        y = (y - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + 1e-5)
        y = (y * bn.weight[:, None, None] + bn.bias[:, None, None]) / 2.0 + 0.5
        ref = torch.relu(y).mean((2, 3)) @ model.head.weight.double().T + model.head.bias.double()
    _assert_matches(_ort(out, x.numpy(), ("x", "output")), ref)  # forward(self, x) → output


def test_strict_refuses_a_left_batchnorm_and_writes_nothing(
    user_models: str, tmp_path: Path
) -> None:
    out = tmp_path / "left.onnx"
    args = ["onnx", "--model", f"{user_models}:BnAfterRelu", "--input-shape", "3,12,12"]
    result = runner.invoke(app, [*args, "-o", str(out), "--strict"])
    assert result.exit_code == 1, result.output
    assert (
        "--strict judges the file's graph: it keeps 1 BatchNormalization node(s) (the fold left "
        "bn); no file written"
    ) in result.stdout
    assert "left" in result.stdout  # the report row says why
    assert list(tmp_path.iterdir()) == []


def test_strict_passes_a_batchnorm_the_exporter_fused_and_says_so(
    user_models: str, tmp_path: Path
) -> None:
    out = tmp_path / "fused.onnx"
    args = ["onnx", "--model", f"{user_models}:ComputedWeight", "--input-shape", "3,12,12"]
    result = runner.invoke(app, [*args, "-o", str(out), "--strict"])
    assert result.exit_code == 0, result.output
    assert "BatchNormalization" not in _ops(out)
    assert (
        "--strict judges the file's graph, which has no BatchNormalization: the exporter fused "
        "the BatchNorm(s) the fold left (bn)"
    ) in " ".join(result.stdout.split())


def _bad_checkpoint(kind: str, path: Path) -> None:
    net = randomize_net_state(Net(), seed=1)
    if kind == "corrupt":
        path.write_bytes(b"PK\x03\x04 not really a zip" * 10)
    elif kind == "wrong-shapes":
        state = net.state_dict()
        state["conv1.weight"] = torch.zeros(16, 1, 3, 3)
        torch.save(state, path)
    elif kind == "missing-keys":
        state = net.state_dict()
        del state["fc1.weight"]
        torch.save(state, path)


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("missing", "not found"),
        ("corrupt", "cannot read"),
        ("wrong-shapes", "conv1.weight"),
        ("missing-keys", "missing keys: fc1.weight"),
    ],
)
def test_bad_checkpoint_exits_2_with_one_line_and_no_file(
    kind: str, needle: str, tmp_path: Path
) -> None:
    ckpt_path = tmp_path / "in" / "bad.pt"
    ckpt_path.parent.mkdir()
    _bad_checkpoint(kind, ckpt_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = runner.invoke(app, ["onnx", str(ckpt_path), "-o", str(out_dir / "x.onnx")])
    assert result.exit_code == 2, result.output
    assert needle in _error_line(result)
    assert list(out_dir.iterdir()) == []


def test_unavailable_provider_exits_2_and_removes_the_file(ckpt, tmp_path: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime has a CUDA provider here; this checks the refusal without one")
    out = tmp_path / "net.onnx"
    result = runner.invoke(app, ["onnx", str(ckpt[0]), "-o", str(out), "--providers", "cuda"])
    assert result.exit_code == 2, result.output
    assert "CUDA does not run here" in _error_line(result)
    assert list(tmp_path.iterdir()) == []


def test_console_shows_no_exporter_noise(ckpt, tmp_path: Path) -> None:
    """A real process (not CliRunner): torch's log handlers write to the real stderr."""
    out = tmp_path / "net.onnx"
    env = {**os.environ, "COLUMNS": "200"}
    run = subprocess.run(
        [sys.executable, "-m", "bnexport", "onnx", str(ckpt[0]), "-o", str(out), "--no-check"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    for noise in ("torch.onnx", "Warning", "warn", "✅", "torchvision"):
        assert noise not in run.stdout
    assert run.stdout.startswith("Model: net.pt")


# --------------------------------------------------------------------------------------------
# Several inputs, a dict output, integer inputs, --output-names

TWO_INPUTS = '''
import torch
from torch import nn


class TwoInputs(nn.Module):
    """A conv-BN branch on an image and a Linear-BN1d branch on a feature vector; a dict out."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc, self.bn1d = nn.Linear(8, 16), nn.BatchNorm1d(16)
        self.head = nn.Linear(24, 10)
        for bn in (self.bn, self.bn1d):
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.5, 0.5)
            nn.init.uniform_(bn.running_var, 0.5, 2.0)
            nn.init.normal_(bn.running_mean, 0.0, 0.3)

    def forward(self, image, features):
        a = torch.relu(self.bn(self.conv(image))).mean((2, 3))
        b = torch.relu(self.bn1d(self.fc(features)))
        embedding = torch.cat([a, b], 1)
        return {"logits": self.head(embedding), "embedding": embedding}


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.fc, self.bn = nn.Embedding(10, 6), nn.Linear(6, 4), nn.BatchNorm1d(4)

    def forward(self, ids):
        return self.bn(self.fc(self.embed(ids).mean(1)))


def build():
    torch.manual_seed(0)
    return TwoInputs().eval()


def tokens():
    torch.manual_seed(1)
    return Tokens().eval()
'''
TWO_SHAPES = ["--input-shape", "3,16,16", "--input-shape", "8"]


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory: pytest.TempPathFactory):
    """A module with the two-input model, importable as `bnx_cli_two_inputs`."""
    root = tmp_path_factory.mktemp("two")
    (root / "bnx_cli_two_inputs.py").write_text(TWO_INPUTS)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        yield "bnx_cli_two_inputs"


def test_two_inputs_and_a_dict_output_end_to_end(two_inputs: str, tmp_path: Path) -> None:
    from importlib import import_module

    from bnexport.fingerprint import weights_sha256

    out = tmp_path / "two.onnx"
    args = ["onnx", "--model", f"{two_inputs}:build", *TWO_SHAPES, "-o", str(out)]
    result = runner.invoke(app, [*args, "--strict"])
    assert result.exit_code == 0, result.output
    assert "inputs image [N,3,16,16], features [N,8]" in result.stdout
    assert "image, features [batch, …] → logits, embedding [batch, …]" in result.stdout
    assert "PASS" in result.stdout and "FAIL" not in result.stdout
    proto = onnx.load(out)
    assert [v.name for v in proto.graph.input] == ["image", "features"]
    assert [v.name for v in proto.graph.output] == ["logits", "embedding"]
    for value in [*proto.graph.input, *proto.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert "BatchNormalization" not in _ops(out)
    model = import_module(two_inputs).build()
    assert _props(out)["weights_sha256"] == weights_sha256(model)
    gen = torch.Generator().manual_seed(3)
    image, features = torch.randn(7, 3, 16, 16, generator=gen), torch.randn(7, 8, generator=gen)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(
        ["embedding", "logits"], {"image": image.numpy(), "features": features.numpy()}
    )
    with torch.no_grad():
        want = model(image, features)
    _assert_matches(got[0], want["embedding"])
    _assert_matches(got[1], want["logits"])


def test_output_names_rename_the_outputs(two_inputs: str, tmp_path: Path) -> None:
    out = tmp_path / "named.onnx"
    args = ["onnx", "--model", f"{two_inputs}:build", *TWO_SHAPES, "-o", str(out), "--no-check"]
    result = runner.invoke(app, [*args, "--output-names", "scores,emb"])
    assert result.exit_code == 0, result.output
    assert [v.name for v in onnx.load(out).graph.output] == ["scores", "emb"]
    result = runner.invoke(app, [*args, "--output-names", "scores"])
    assert result.exit_code == 2
    assert "2 output(s) but 1 output names" in _error_line(result)
    assert not out.exists() or [v.name for v in onnx.load(out).graph.output] == ["scores", "emb"]


def test_integer_inputs_export_and_check(two_inputs: str, tmp_path: Path) -> None:
    out = tmp_path / "tokens.onnx"
    args = ["onnx", "--model", f"{two_inputs}:tokens", "--input-shape", "5:int64", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (ids,) = onnx.load(out).graph.input
    assert ids.name == "ids" and ids.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert "PASS" in result.stdout


@pytest.mark.parametrize("shapes", [["--input-shape", "3,16,16"], [*TWO_SHAPES, *TWO_SHAPES[:2]]])
def test_a_wrong_number_of_input_shapes_names_the_forward(
    two_inputs: str, shapes: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "x.onnx"
    result = runner.invoke(app, ["onnx", "--model", f"{two_inputs}:build", *shapes, "-o", str(out)])
    assert result.exit_code == 2
    line = _error_line(result)
    assert "forward(image, features) takes 2 input(s)" in line
    assert "one --input-shape per input" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["fold", "bench"])
def test_fold_takes_two_inputs_and_bench_refuses_them(
    command: str, two_inputs: str, tmp_path: Path
) -> None:
    args = [command, "--model", f"{two_inputs}:build", *TWO_SHAPES]
    if command == "fold":
        result = runner.invoke(app, [*args, "-o", str(tmp_path / "two.pt2")])
        assert result.exit_code == 0, result.output
        assert "Parity: PASS" in result.stdout
        assert "logits" in result.stdout and "embedding" in result.stdout
    else:
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        assert "one float32 input" in _error_line(result)


@pytest.mark.parametrize("fused", [0, 1, 3])
def test_the_second_stage_is_reported_only_when_it_fused(fused: int, tmp_path: Path) -> None:
    from rich.console import Console

    from bnexport.cli.onnx import render_export
    from bnexport.export import ExportResult

    exported = ExportResult(
        path=tmp_path / "m.onnx",
        op_counts={"Conv": 1},
        sha256="0" * 64,
        opset=20,
        num_nodes=1,
        input_names=("x",),
        output_names=("output",),
        bn_fused_by_onnxscript=fused,
    )
    console = Console(record=True, width=200)
    render_export(console, exported)
    text = console.export_text()
    line = f"onnxscript fused {fused} BatchNormalization node{'s' if fused > 1 else ''} bnexport's"
    assert (line in text) == (fused > 0)
    assert ("onnxscript fused" in text) == (fused > 0)


def test_onnx_takes_the_checks_parity_options(tmp_path: Path) -> None:
    """--samples, --batch-sizes, --opt-levels, --tolerance/--rtol/--atol mean what they mean for
    `bnexport check`; --no-verify skips the fold self-check and says so."""
    root = Path(__file__).resolve().parents[2]
    out, rep = tmp_path / "n.onnx", tmp_path / "r.json"
    args = ["onnx", str(root / "models" / "net.pt"), "-o", str(out), "--report-json", str(rep)]
    res = runner.invoke(
        app,
        [
            *args,
            "--providers",
            "cpu",
            "--samples",
            "3",
            "--batch-sizes",
            "1,5",
            "--opt-levels",
            "basic",
            "--tolerance",
            "fixed",
            "--rtol",
            "1e-3",
            "--atol",
            "1e-4",
            "--no-verify",
        ],
    )
    assert res.exit_code == 0, res.output
    parity = json.loads(rep.read_text())["parity"]
    assert parity["batch_sizes"] == [1, 5] and parity["tolerance_mode"] == "fixed"
    assert {r["runner"] for r in parity["results"]} >= {"ort-cpu-basic"}
    assert next(s for s in parity["inputs"]["sets"] if s["name"] == "random")["samples"] == 3
    assert parity["tolerances"]["cpu"] == {"rtol": 1e-3, "atol_scale": 1e-4}
    assert "self-check was skipped" in res.stdout
