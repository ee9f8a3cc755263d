"""`bnexport check` on an ONNX model whose weights sit in a .data file beside it (torch's layout
for big models): it works from any working directory, and a location outside the model's folder
is refused by bnexport with one line."""

from __future__ import annotations

import sys
from pathlib import Path

import onnx
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))
from parity_helpers import artifacts

from bnexport.cli.app import app

runner = CliRunner()
QUICK = ["--providers", "cpu", "--batch-sizes", "7", "--no-folded"]


@pytest.fixture
def external(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The parity artifacts' ONNX re-saved as models/net.onnx + models/net.onnx.data."""
    made = artifacts(tmp_path_factory.getbasetemp())
    path = tmp_path / "models" / "net.onnx"
    path.parent.mkdir()
    proto = onnx.load(made["onnx"])
    onnx.save(proto, path, save_as_external_data=True, location="net.onnx.data")
    return path, made["checkpoint"]


def test_check_reads_external_data_from_another_directory(
    external: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, ckpt = external
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(app, ["check", str(path), "--against", str(ckpt), *QUICK])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.stdout


def test_check_refuses_external_data_outside_the_models_folder(
    external: tuple[Path, Path], tmp_path: Path
) -> None:
    path, ckpt = external
    (path.parent / "net.onnx.data").rename(tmp_path / "net.onnx.data")
    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../net.onnx.data"
    path.write_bytes(proto.SerializeToString())
    result = runner.invoke(app, ["check", str(path), "--against", str(ckpt), *QUICK])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "'../net.onnx.data', outside the model's folder" in lines[0]
