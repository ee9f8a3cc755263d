"""Options every command shares and how the CLI reports misuse: usage errors on one stderr line,
validated choices with completion, the measured opset range, the shared model options, and errors
raised by a user's ``--model`` code reported as theirs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from bnexport.cli.app import app
from bnexport.defaults import DEFAULT_OPSET, OPSET_MAX, OPSET_MIN
from bnexport.errors import ModelSpecError

runner = CliRunner()
COMMAND = typer.main.get_command(app)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["onnx", "--bogus"], "No such option: --bogus"),
        (["chek"], "No such command 'chek'. Did you mean 'check'?"),
        (["onnx"], "Missing option '-o' / '--output'."),
        (["check", "m.onnx", "--providers", "cpu,gpu"], "choose one or more, comma-separated, of"),
        (["check", "m.onnx", "--opt-levels", "fast"], "of disabled, basic, extended, all"),
        (["onnx", "x.pt", "-o", "y.onnx", "--providers", "tpu"], "of auto, cpu, cuda"),
        (["train", "--device", "gpu"], "'gpu': choose one of auto, cpu, cuda"),
        (["onnx", "x.pt", "-o", "y.onnx", "--opset", "7"], "opset 7 is outside"),
    ],
)
def test_usage_errors_are_one_line_on_stderr(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("bnexport: error: ") and message in lines[0]
    where = "bnexport" if args == ["chek"] else f"bnexport {args[0]}"
    assert lines[0].endswith(f"(see '{where} -h')")


@pytest.mark.parametrize("opset", [OPSET_MIN - 1, OPSET_MAX + 1, 99])
def test_an_opset_outside_the_measured_range_is_refused_with_the_range(opset: int) -> None:
    result = runner.invoke(app, ["onnx", "x.pt", "-o", "y.onnx", "--opset", str(opset)])
    assert result.exit_code == 2
    nearest = OPSET_MIN if opset < OPSET_MIN else OPSET_MAX
    assert (
        f"opset {opset} is outside the opsets bnexport exports to ({OPSET_MIN} to {OPSET_MAX}); "
        f"use {nearest}, or the default {DEFAULT_OPSET}"
    ) in result.stderr


def test_onnx_help_states_the_measured_opset_range_and_default() -> None:
    result = runner.invoke(app, ["onnx", "-h"], env={"COLUMNS": "200"})
    text = " ".join(result.output.replace("│", " ").split())
    assert f"to export to: {OPSET_MIN} to {OPSET_MAX}," in text
    assert re.search(rf"--opset <int> .*\[default: {DEFAULT_OPSET}\]", text)


@pytest.mark.parametrize(
    ("command", "option", "incomplete", "expected"),
    [
        ("check", "providers", "c", ["cpu", "cuda"]),
        ("onnx", "providers", "cpu,c", ["cpu,cuda"]),
        (
            "check",
            "opt_levels",
            "disabled,",
            ["disabled,basic", "disabled,extended", "disabled,all"],
        ),
        ("train", "device", "", ["auto", "cpu", "cuda"]),
    ],
)
def test_choices_complete_in_the_shell(
    command: str, option: str, incomplete: str, expected: list[str]
) -> None:
    cmd = COMMAND.commands[command]  # type: ignore[attr-defined]
    param = next(p for p in cmd.params if p.name == option)
    assert [c.value for c in param.shell_complete(typer.Context(cmd), incomplete)] == expected


@pytest.mark.parametrize("command", ["fold", "onnx", "check", "bench"])
def test_every_model_command_takes_the_shared_model_options(command: str) -> None:
    cmd = COMMAND.commands[command]  # type: ignore[attr-defined]
    flags = {opt for p in cmd.params for opt in p.opts}
    assert {"--model", "--input-shape", "--temperature"} <= flags


def test_bench_passes_temperature_to_the_model_source() -> None:
    result = runner.invoke(
        app, ["bench", "--model", "m:f", "--input-shape", "3,8,8", "--temperature", "2"]
    )
    assert result.exit_code == 2
    assert "--temperature applies to the seed Net's state dicts" in result.stderr


@pytest.mark.parametrize(
    ("args", "fix"),
    [
        (["net.onnx", "net.pt"], "bnexport check net.onnx --against net.pt"),
        (["net.pt", "net.onnx"], "bnexport check net.onnx --against net.pt"),
    ],
)
def test_check_takes_the_checkpoint_only_as_against(args: list[str], fix: str) -> None:
    result = runner.invoke(app, ["check", *args])
    assert result.exit_code == 2
    assert result.stderr.strip().endswith(fix)
    assert "[checkpoint]" not in runner.invoke(app, ["check", "-h"]).output


@pytest.fixture
def broken_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory whose ``mynets_cli_probe.py`` raises ValueError at import."""
    (tmp_path / "mynets_cli_probe.py").write_text("raise ValueError('no such width: 7')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "mynets_cli_probe", raising=False)
    return tmp_path


def test_an_error_in_the_users_module_is_reported_as_theirs(broken_module: Path) -> None:
    args = ["onnx", "--model", "mynets_cli_probe:make", "--input-shape", "3,8,8", "-o", "m.onnx"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "bnexport: error: --model mynets_cli_probe:make: error importing mynets_cli_probe: "
        "ValueError: no such width: 7 (in your code; rerun with --debug for its traceback)"
    ]
    assert not (broken_module / "m.onnx").exists()


def test_debug_shows_the_users_traceback(broken_module: Path) -> None:
    args = ["--debug", "onnx", "--model", "mynets_cli_probe:make", "--input-shape", "3,8,8"]
    result = runner.invoke(app, [*args, "-o", "m.onnx"])
    assert result.exit_code == 2  # --debug adds the traceback, the exit code stays
    lines = result.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "ValueError: no such width: 7" in result.stderr  # the user's error, the cause
    assert f"{ModelSpecError.__module__}.ModelSpecError" in result.stderr
    assert lines[-1].startswith("bnexport: error: --model mynets_cli_probe:make: error importing")


def test_bash_completion_offers_the_choices() -> None:
    """Through the installed console script, as bash asks (COMP_WORDS / COMP_CWORD)."""
    script = Path(sys.executable).parent / "bnexport"
    env = {**os.environ, "_BNEXPORT_COMPLETE": "complete_bash", "COMP_CWORD": "4"}
    env["COMP_WORDS"] = "bnexport check m.onnx --providers cpu,c"
    out = subprocess.run([script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["cpu,cuda"]
