"""The 28 models nobody had run before, through the CLI as a user runs them (marker ``real``):
``bnexport onnx`` then ``bnexport check`` with default options exit 0 (no false alarm), and the
reports read at 100 columns (resnet50, levit_128s, and a failing check). The 20 slower models (17
min here, one process) are the ``real_cli`` lane, ``make test-real-cli``, which CI runs after ``make
test``.

Each model is exported once (``onnx``, which checks its parity too) and checked once, in process
(``CliRunner``); the models are the zoo's (`real.zoo.UNSEEN_MODELS`), as ``real.cli_models``
factories.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from real.cli_models import attribute
from real.zoo import UNSEEN_MODELS, input_shapes, requirement
from typer.testing import CliRunner

from bnexport.cli.app import app

pytestmark = pytest.mark.real

runner = CliRunner()
WIDTH = 100


def _source(name: str) -> list[str]:
    shapes = [opt for s in input_shapes(name) for opt in ("--input-shape", ",".join(map(str, s)))]
    return ["--model", f"real.cli_models:{attribute(name)}", *shapes]


@functools.cache
def _exported(name: str, folder: Path) -> tuple[Path, str]:
    """``bnexport onnx`` of zoo model ``name`` (with its default parity check): the file and
    the command's output; its exit code must be 0."""
    needs = requirement(name)
    if needs:
        pytest.importorskip(needs)
    path = folder / f"{attribute(name)}.onnx"
    res = runner.invoke(app, ["onnx", *_source(name), "-o", str(path)], env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    return path, res.stdout


def _check(name: str, folder: Path, *extra: str) -> object:
    path, _ = _exported(name, folder)
    return runner.invoke(
        app, ["check", str(path), *_source(name), *extra], env={"COLUMNS": str(WIDTH)}
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("issue18")


#: The models `make test` runs (under 15 s each here); the others are the ``real_cli`` lane.
FAST = frozenset(
    {
        "timm/tinynet_e",
        "timm/rexnetr_100",
        "timm/nf_resnet26",
        *[n for n in UNSEEN_MODELS if "handmade" in n],
    }
)


def _lane(name: str) -> list[pytest.MarkDecorator]:
    return [] if name in FAST else [pytest.mark.real_cli]


@pytest.mark.parametrize("name", [pytest.param(n, marks=_lane(n)) for n in UNSEEN_MODELS])
def test_onnx_then_check_with_defaults_pass(name: str, folder: Path) -> None:
    _, exported = _exported(name, folder)
    assert "PASS: every gating runner is within tolerance" in exported
    res = _check(name, folder)
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    assert "note: plan: " in res.stdout  # type: ignore[attr-defined]


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("parity [")]


@pytest.mark.parametrize("name", ["torchvision/resnet50", "timm/levit_128s"])
def test_check_report_fits_100_columns(name: str, folder: Path) -> None:
    res = _check(name, folder)
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    lines = _lines(res.stdout)  # type: ignore[attr-defined]
    assert max(map(len, lines)) <= WIDTH, "\n".join(ln for ln in lines if len(ln) > WIDTH)
    assert lines[0].startswith(f"{attribute(name)}.onnx vs real.cli_models:{attribute(name)}: ")


def test_a_failing_check_fits_100_columns_one_line_per_output(folder: Path) -> None:
    # a limit below fp32's own error fails every runner on every output: the worst case to print
    name = "handmade/two_input_net"
    res = _check(name, folder, "--noise-factor", "0.01")
    assert res.exit_code == 1, res.output  # type: ignore[attr-defined]
    lines = _lines(res.stdout)  # type: ignore[attr-defined]
    assert max(map(len, lines)) <= WIDTH, "\n".join(ln for ln in lines if len(ln) > WIDTH)
    starts = [ln for ln in lines if ln.startswith("  ort-cpu-all batch ")]
    assert [ln.split("output ")[1].split()[0] for ln in starts] == ["'logits'", "'embedding'"]
