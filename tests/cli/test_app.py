"""CLI conventions shared by every command: help, version, start-up cost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bnexport import __version__
from bnexport.cli.app import app

COMMANDS = ["train", "fold", "onnx", "check", "bench", "tune"]
runner = CliRunner()


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"bnexport {__version__}"


def test_help_lists_every_command() -> None:
    """The Commands section's rows name every command (the names also occur in descriptions)."""
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    section = result.output.split("Commands")[1].split("╰")[0]
    listed = [line.strip("│ ").split()[0] for line in section.splitlines()[1:] if line.strip("│ ")]
    assert set(COMMANDS) <= set(listed) and len(listed) == len(set(listed))


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_has_help(name: str) -> None:
    result = runner.invoke(app, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and len(result.output.splitlines()) > 5


def test_help_does_not_import_heavy_libraries() -> None:
    """`bnexport --help` must stay fast: torch, onnx and onnxruntime load inside commands only."""
    code = (
        "import sys; from bnexport.cli.app import app; "
        "print(','.join(m for m in ('torch', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bnexport", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == f"bnexport {__version__}"


def test_python_dash_m_imports_nothing_from_the_working_directory(tmp_path: Path) -> None:
    """`python -m` puts the working directory first on sys.path: a stray typer.py must not load."""
    (tmp_path / "typer.py").write_text("raise ImportError('the stray typer.py was imported')\n")
    out = subprocess.run(
        [sys.executable, "-m", "bnexport", "--version"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"bnexport {__version__}"


def test_ctrl_c_while_the_options_are_parsed_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    """Click turns a Ctrl-C during option parsing into "Aborted!" and exit 1; bnexport reports
    it as the interrupt it is."""
    from typer.core import TyperCommand

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(TyperCommand, "parse_args", interrupted)
    result = runner.invoke(app, ["onnx", "models/net.pt", "-o", "x.onnx"])
    assert result.exit_code == 130
    assert "bnexport: interrupted" in result.stderr
