"""The shipped model, end to end: `bnexport onnx models/net.pt` against an independent float64
forward of the seed's Net on the full Fashion-MNIST test set (skipped, with the install hint, where
the Debian package is absent)."""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from reference import net_forward_f64
from typer.testing import CliRunner

from bnexport.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "net.pt"
CARD = ROOT / "models" / "net.md"
FASHION = Path("/usr/share/datasets/fashion-mnist")


def _idx(path: Path) -> np.ndarray:
    """A minimal IDX reader, independent of bnexport.data."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.fixture(scope="module")
def payload() -> dict:
    return torch.load(MODEL, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shipped") / "net.onnx"
    result = CliRunner().invoke(app, ["onnx", str(MODEL), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    return out


def test_model_card_matches_the_file(payload: dict) -> None:
    card = CARD.read_text()
    digest = hashlib.sha256(MODEL.read_bytes()).hexdigest()
    assert digest in card
    assert payload["config"]["temperature"] == 1.5
    assert re.search(r"bnexport train .*--temperature 1\.5", card)


def test_folded_graph_holds_only_conv_relu_reshape_gemm(onnx_path: Path) -> None:
    ops = {node.op_type for node in onnx.load(str(onnx_path)).graph.node}
    assert ops in ({"Conv", "Relu", "Reshape", "Gemm"}, {"Conv", "Relu", "Flatten", "Gemm"})


@pytest.mark.dataset
@pytest.mark.skipif(
    not (FASHION / "t10k-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist",
)
def test_full_test_set_parity_and_accuracy(payload: dict, onnx_path: Path) -> None:
    images = _idx(FASHION / "t10k-images-idx3-ubyte.gz")
    labels = _idx(FASHION / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    norm = payload["config"]["normalize"]
    x = (torch.from_numpy(images.copy()).double() / 255 - norm["mean"]) / norm["std"]
    x = x.unsqueeze(1)
    ref = torch.cat([net_forward_f64(payload["state_dict"], c, 1.5) for c in x.split(2000)]).numpy()
    accuracy = float((ref.argmax(1) == labels).mean())
    assert accuracy >= 0.905, accuracy

    scale = np.abs(ref).max()
    for level in (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    ):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        got = session.run(["logits"], {"input": x.float().numpy()})[0]
        assert np.abs(got - ref).max() <= 1e-5 * scale, (level, np.abs(got - ref).max() / scale)
        assert (got.argmax(1) == ref.argmax(1)).all()
