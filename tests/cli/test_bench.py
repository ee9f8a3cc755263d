"""`bnexport bench`: a real (tiny) run through the CLI, its table, its JSON and its exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import randomize_net_state
from typer.testing import CliRunner

from bnexport import fold_model
from bnexport.checkpoint import save_checkpoint
from bnexport.cli.app import app
from bnexport.data import FASHION_MNIST_NORMALIZE
from bnexport.export import export_onnx
from bnexport.nets import Net
from bnexport.ort import probe_cuda

runner = CliRunner()
CANDIDATES = ["torch_eager", "torch_eager_folded", "ort_torch_export", "ort_bnexport"]
TINY = ["--repeats", "2", "--min-time", "0.002", "--warmup", "0.005", "--cooldown", "0.001"]
TINY += ["--batch-sizes", "1,2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A checkpoint of a Net with non-trivial BN statistics, and bnexport's export of it."""
    root = tmp_path_factory.mktemp("bench_cli")
    model = randomize_net_state(Net(temperature=0.5), seed=7).eval()
    ckpt = root / "net.pt"
    save_checkpoint(ckpt, model, normalize=FASHION_MNIST_NORMALIZE, metadata={})
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    onnx_path = root / "net.onnx"
    export_onnx(fold_model(model, (x,)).module, x, onnx_path)
    return ckpt, onnx_path


@pytest.fixture(scope="module")
def run(files: tuple[Path, Path]) -> tuple[object, dict]:
    ckpt, onnx_path = files
    out = ckpt.parent / "bench.json"
    args = ["bench", str(ckpt), "--onnx", str(onnx_path), "--json", str(out)]
    result = runner.invoke(app, [*args, *TINY, "--threads", "1"])
    assert result.exit_code == 0, result.output
    return result, json.loads(out.read_text())


def test_table_has_every_candidate_and_ratios(run: tuple[object, dict]) -> None:
    result, _ = run
    text = result.stdout  # type: ignore[attr-defined]
    for label in (
        "PyTorch eager, unfolded",
        "PyTorch eager, folded",
        "onnxruntime CPU, torch default export",
        "onnxruntime CPU, bnexport folded export",
    ):
        assert text.count(label) >= 2, label  # one row per batch size
    assert "1.00× (baseline)" in text and "MFLOP/image" in text and "GFLOP/s" in text
    # The acceptance comparison: one row of the paired-speedup table, a cell per batch size.
    assert "paired speedup" in text
    row = next(
        line
        for line in text.splitlines()
        if line.lstrip().startswith("onnxruntime CPU, bnexport folded export")
        and line.count("×") == 2
    )
    assert "onnxruntime CPU, torch default export" in row
    cuda = probe_cuda()
    if (
        not cuda.available
    ):  # the probe's reason, verbatim (e.g. "bnexport[gpu]" not eaten as markup)
        assert f"not run: onnxruntime CUDA, bnexport folded export: {cuda.reason}" in text


def test_json_has_every_figure_versions_threads_and_cpu(
    run: tuple[object, dict], files: tuple[Path, Path]
) -> None:
    _, data = run
    _, onnx_path = files
    pairs = {(m["candidate"], m["batch_size"]) for m in data["measurements"]}
    cuda = ["ort_bnexport_cuda"] if probe_cuda().available else []
    assert pairs == {(c, b) for c in CANDIDATES + cuda for b in (1, 2)}
    for m in data["measurements"]:
        assert len(m["times_s"]) == 2
        assert m["images_per_s"] == pytest.approx(m["batch_size"] / np.median(m["times_s"]))
        assert {"median", "p10", "p90"} <= set(m["speedup"])
    bn = next(c for c in data["candidates"] if c["name"] == "ort_bnexport")
    assert bn["model_path"] == str(onnx_path)  # --onnx is what was measured
    assert bn["session_options"]["provider"] == "cpu"
    env = data["environment"]
    assert env["cpu_model"] and env["versions"]["onnxruntime"] and env["versions"]["torch"]
    assert env["threads"]["torch_intra_op"] >= 1 and "date" in env
    assert data["flops"]["per_image"] == 953_344 and data["peak"]["gflops"] > 0


def test_threads_option_reaches_every_backend(run: tuple[object, dict]) -> None:
    _, data = run
    assert data["config"]["threads"] == 1
    assert data["environment"]["threads"]["torch_intra_op"] == 1
    assert data["peak"]["threads"] == 1
    options = {c["name"]: c["session_options"] for c in data["candidates"] if c["available"]}
    assert options["ort_bnexport"]["intra_op_num_threads"] == 1
    assert options["ort_torch_export"]["intra_op_num_threads"] == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch-sizes", "1,x"], "--batch-sizes"),
        (["--batch-sizes", "0"], "--batch-sizes 0: give a whole number from 1"),
        (["--onnx", "missing.onnx"], "not found"),
    ],
)
def test_bad_options_exit_2_with_one_line(
    files: tuple[Path, Path], extra: list[str], message: str
) -> None:
    ckpt, _ = files
    result = runner.invoke(app, ["bench", str(ckpt), *extra])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_missing_checkpoint_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", str(tmp_path / "nope.pt")])
    assert result.exit_code == 2 and "not found" in result.output


def test_an_onnx_file_of_another_model_is_flagged(files: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = files
    other = randomize_net_state(Net(temperature=2.0), seed=99).eval()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    wrong = tmp_path / "other.onnx"
    export_onnx(other, x, wrong)
    fast = ["--repeats", "1", "--min-time", "0.001", "--warmup", "0", "--cooldown", "0"]
    result = runner.invoke(
        app, ["bench", str(ckpt), "--onnx", str(wrong), "--no-cuda", "--batch-sizes", "1", *fast]
    )
    assert result.exit_code == 1, result.output  # a candidate that disagrees fails the run
    assert "MISMATCH: onnxruntime CPU, bnexport folded export" in result.stdout
    assert "computes something else than the PyTorch model" in result.stdout
