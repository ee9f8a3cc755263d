"""Fixtures for the serving tests: the shipped Net and a two-input dict-output model, exported
once per session with `bnexport onnx`."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from bnexport.cli.app import app

ROOT = Path(__file__).resolve().parents[2]


def export(args: list[str], out: Path) -> Path:
    result = CliRunner().invoke(app, ["onnx", *args, "-o", str(out), "--no-check"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def net_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped Net, exported as the README does."""
    out = tmp_path_factory.mktemp("net") / "net.onnx"
    return export([str(ROOT / "models" / "net.pt")], out)


@pytest.fixture(scope="session")
def pair_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two inputs (image, meta), a dict output (scores, embedding)."""
    out = tmp_path_factory.mktemp("pair") / "pair.onnx"
    spec = "serving.serving_models:two_input_dict"
    return export(["--model", spec, "--input-shape", "3,8,8", "--input-shape", "4"], out)
