"""Fixtures for the serving tests: the shipped Net and a two-input dict-output model, exported
once per session with `bnexport onnx`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import Server, start_server
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


@pytest.fixture(scope="session")
def repo(net_onnx: Path, pair_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    for model, name in ((net_onnx, "net"), (pair_onnx, "pair")):
        result = CliRunner().invoke(app, ["package", str(model), "-r", str(root), "--name", name])
        assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="session")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("log") / "serve.log"
    server = start_server(repo, log)
    yield server
    assert server.stop() == 0, log.read_text()
    assert "bnexport serve: stopped" in log.read_text()


def pytest_configure(config: pytest.Config) -> None:
    """``xdist_group`` is pytest-xdist's mark; known without it too (``-p no:xdist``)."""
    config.addinivalue_line("markers", "xdist_group(name): run on one pytest-xdist worker")
