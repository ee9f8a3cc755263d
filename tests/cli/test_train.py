"""`bnexport train` through CliRunner: a run on the bundled sample writes a loadable checkpoint with
its metrics; bad requests exit 2 with one line and leave no file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bnexport import data
from bnexport.checkpoint import load_checkpoint
from bnexport.cli import train as train_cmd
from bnexport.cli.app import app
from bnexport.train import TrainConfig

runner = CliRunner()


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def test_train_on_the_sample_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "net.pt"
    args = ["train", "--sample", "--epochs", "2", "--batch-size", "50", "--lr", "0.01"]
    args += ["--temperature", "1.5", "--device", "cpu", "--threads", "1", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "epoch 2/2" in result.output and "test loss" in result.output
    assert f"wrote {out}" in result.output

    ckpt = load_checkpoint(out)
    assert ckpt.temperature == 1.5 and ckpt.model.bn1.temperature == 1.5
    assert ckpt.normalize == data.FASHION_MNIST_NORMALIZE
    meta = ckpt.metadata
    # The options given, in the command's canonical order (defaults are recorded separately).
    assert meta["command"] == (
        "bnexport train --epochs 2 --batch-size 50 --lr 0.01 --temperature 1.5 --device cpu "
        f"--sample --threads 1 --output {out}"
    )
    assert meta["config"]["weight_decay"] == 0.05 and meta["config"]["flip"] == 0.5
    assert meta["seed"] == 0 and meta["epochs"] == 2 and meta["batch_size"] == 50
    assert meta["device"] == "cpu" and meta["torch_version"] == torch.__version__
    assert [h["epoch"] for h in meta["history"]] == [1, 2]
    assert meta["test_size"] == 1000 and 0.5 < meta["test_accuracy"] <= 1.0
    assert f"{meta['test_accuracy']:.2%}" in result.output
    assert ckpt.sha256 in result.output
    assert list(out.parent.iterdir()) == [out]  # no temp file left beside it

    # The stored weights give the stored accuracy on the sample.
    images, labels = data.load_sample()
    with torch.no_grad():
        pred = ckpt.model(data.to_tensor(images, ckpt.normalize)).argmax(1).numpy()
    assert (pred == labels).mean() == pytest.approx(meta["test_accuracy"], abs=0.002)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_exits_2_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "net.pt"
    result = runner.invoke(app, ["train", "--sample", "--device", "cuda", "-o", str(out)])
    assert result.exit_code == 2
    lines = _error_lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("bnexport: error: --device cuda asked for")
    assert "Traceback" not in result.output
    assert not out.exists()


def test_bad_device_name(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--sample", "--device", "tpu", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (
        "bnexport: error: Invalid value for --device: 'tpu': choose one of auto, cpu, cuda "
        "(see 'bnexport train -h')\n"
    )


def test_missing_data_dir_exits_2_with_the_install_hint(tmp_path: Path) -> None:
    out = tmp_path / "net.pt"
    missing = tmp_path / "no-such-dir"
    result = runner.invoke(app, ["train", "--data-dir", str(missing), "-o", str(out)])
    assert result.exit_code == 2
    lines = _error_lines(result.output)
    assert len(lines) == 1, result.output
    assert "apt-get install dataset-fashion-mnist" in lines[0] and str(missing) in lines[0]
    assert not out.exists()


def test_cli_defaults_match_the_library_defaults() -> None:
    defaults = TrainConfig()
    assert defaults.epochs == train_cmd.DEFAULT_EPOCHS
    assert defaults.batch_size == train_cmd.DEFAULT_BATCH_SIZE
    assert defaults.lr == train_cmd.DEFAULT_LR
    assert defaults.weight_decay == train_cmd.DEFAULT_WEIGHT_DECAY
