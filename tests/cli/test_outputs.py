"""What every command writes, through the CLI: no output may destroy an input, every output is
checked before the work, report sets are all or nothing, Ctrl-C is exit 130 with no unverified
file, and a closed stdout does not cost the artifact."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest
import torch
from reference import randomize_net_state
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))
from parity_helpers import artifacts

import bnexport.train
from bnexport.checkpoint import save_checkpoint
from bnexport.cli.app import app
from bnexport.data import Normalize
from bnexport.nets import Net

runner = CliRunner()
UNWRITABLE = "/proc/bnexport-test/out"  # /proc takes no new files, not even root's


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _error_line(result) -> str:
    """The single stderr line of a failed command (and no traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def net_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "net.pt"
    net = randomize_net_state(Net(temperature=1.5), seed=3)
    save_checkpoint(path, net, normalize=Normalize(mean=0.25, std=0.5))
    return path


@pytest.fixture
def parity_pair(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A passing (ONNX, checkpoint) pair, copied where a test may lose it."""
    made = artifacts(tmp_path_factory.getbasetemp())
    onnx_path, ckpt = tmp_path / "m.onnx", tmp_path / "net.pt"
    shutil.copy(made["onnx"], onnx_path)
    shutil.copy(made["checkpoint"], ckpt)
    return onnx_path, ckpt


@pytest.mark.parametrize("command", ["onnx", "fold"])
@pytest.mark.parametrize("alias", ["same", "hardlink"])
def test_writing_over_the_input_checkpoint_is_refused(
    command: str, alias: str, net_pt: Path, tmp_path: Path
) -> None:
    source = tmp_path / "net.pt"
    shutil.copy(net_pt, source)
    out = source if alias == "same" else tmp_path / "copy.pt"
    if alias == "hardlink":
        out.hardlink_to(source)
    before = _sha(source)
    result = runner.invoke(app, [command, str(source), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert _error_line(result) == (
        f"bnexport: error: -o {out} is the input {source}: writing it would destroy the input; "
        "choose another output path"
    )
    assert _sha(source) == before


@pytest.mark.parametrize(
    ("option", "victim"), [("--json", "onnx"), ("--junit", "checkpoint"), ("--markdown", "onnx")]
)
def test_check_reports_never_overwrite_the_models(
    option: str, victim: str, parity_pair: tuple[Path, Path]
) -> None:
    onnx_path, ckpt = parity_pair
    target = onnx_path if victim == "onnx" else ckpt
    before = _sha(target)
    result = runner.invoke(
        app, ["check", str(onnx_path), "--against", str(ckpt), option, str(target)]
    )
    assert result.exit_code == 2, result.output
    assert f"{option} {target} is the input" in _error_line(result)
    assert _sha(target) == before


def test_a_report_set_with_one_unwritable_file_writes_none(
    parity_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    onnx_path, ckpt = parity_pair
    j, x = tmp_path / "r.json", tmp_path / "r.xml"
    reports = ["--json", str(j), "--junit", str(x), "--markdown", UNWRITABLE]
    quick = ["--providers", "cpu", "--batch-sizes", "7", "--no-folded"]
    result = runner.invoke(app, ["check", str(onnx_path), "--against", str(ckpt), *reports, *quick])
    assert result.exit_code == 2, result.output
    assert f"cannot write {UNWRITABLE}" in _error_line(result)
    assert not j.exists() and not x.exists()


def test_train_to_an_unwritable_path_fails_before_training(monkeypatch, tmp_path: Path) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("trained although the output cannot be written")

    monkeypatch.setattr(bnexport.train, "train", no_training)
    result = runner.invoke(app, ["train", "--sample", "--epochs", "1", "-o", UNWRITABLE])
    assert result.exit_code == 2, result.output
    assert f"cannot write {UNWRITABLE}" in _error_line(result)


def test_train_without_o_never_overwrites_models_net_pt(monkeypatch, tmp_path: Path) -> None:
    """Run from a repo root holding the shipped model: refused before training, file untouched."""
    shipped = tmp_path / "models" / "net.pt"
    shipped.parent.mkdir()
    shipped.write_bytes(b"the shipped model")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bnexport.train, "train", lambda *a, **k: pytest.fail("trained"))
    result = runner.invoke(app, ["train", "--sample", "--epochs", "1"])
    assert result.exit_code == 2, result.output
    assert "models/net.pt exists" in _error_line(result)
    assert "--force" in _error_line(result)
    assert shipped.read_bytes() == b"the shipped model"


def _interrupt_wrapped_by_the_library(*args, **kwargs):
    """What torch does to a Ctrl-C that lands in its cleanup: another exception, raised while
    handling the KeyboardInterrupt."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise RuntimeError("tracing state left inconsistent") from None


def test_ctrl_c_inside_torch_export_is_an_interrupt(monkeypatch, net_pt, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.export, "export", _interrupt_wrapped_by_the_library)
    out = tmp_path / "net.pt2"
    result = runner.invoke(app, ["fold", str(net_pt), "-o", str(out), "--no-verify"])
    assert result.exit_code == 130, result.output
    assert result.stderr.strip() == "bnexport: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_after_the_onnx_file_is_written_removes_it(
    monkeypatch, net_pt: Path, tmp_path: Path
) -> None:
    """The file is in place but not yet reported nor checked: an interrupt leaves nothing."""
    import bnexport.cli.onnx

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(bnexport.cli.onnx, "render_export", interrupted)
    out = tmp_path / "net.onnx"
    result = runner.invoke(app, ["onnx", str(net_pt), "-o", str(out), "--no-check"])
    assert result.exit_code == 130, result.output
    assert result.stderr.strip() == "bnexport: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_keeps_the_earlier_file_it_did_not_replace(
    monkeypatch, net_pt: Path, tmp_path: Path
) -> None:
    import bnexport.export
    from bnexport.errors import ExportError

    def fails(*args, **kwargs):
        raise ExportError("the exporter cannot convert this model")

    monkeypatch.setattr(bnexport.export, "export_onnx", fails)
    out = tmp_path / "net.onnx"
    out.write_bytes(b"yesterday's export")
    result = runner.invoke(app, ["onnx", str(net_pt), "-o", str(out), "--no-check"])
    assert result.exit_code == 2, result.output
    assert out.read_bytes() == b"yesterday's export"


class _ClosedPipe:
    """A stdout whose reader has gone (`bnexport onnx … | head` after head exits)."""

    encoding = "utf-8"
    errors = "strict"

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    def isatty(self) -> bool:
        return False


def test_a_closed_stdout_keeps_the_finished_onnx_file(
    monkeypatch, net_pt: Path, tmp_path: Path
) -> None:
    out = tmp_path / "net.onnx"
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    code = app(["onnx", str(net_pt), "-o", str(out), "--no-check"], standalone_mode=False)
    assert code == 0
    assert out.is_file() and out.stat().st_size > 0
