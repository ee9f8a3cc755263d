"""`bnexport tune` end to end on a tiny model with a tiny time budget: file, record, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from tiny_onnx import conv_net, save
from typer.testing import CliRunner

from bnexport.cli.app import app
from bnexport.ort import make_session
from bnexport.ort_config import model_settings
from bnexport.tune import TUNE_RECORD_KEY

runner = CliRunner()
TINY = ["--budget", "2", "--screen-repeats", "3", "--repeats", "5", "--finalists", "2"]
TINY += ["--min-time", "0.001", "--warmup", "0.002", "--cooldown", "0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path, Path, dict]:
    root = tmp_path_factory.mktemp("tune_cli")
    model = save(conv_net(), root / "m.onnx")
    out, report = root / "tuned.onnx", root / "tune.json"
    args = ["tune", str(model), "-o", str(out), "--batch-size", "4", "--json", str(report)]
    result = runner.invoke(app, [*args, *TINY])
    assert result.exit_code == 0, result.output
    return result, model, out, json.loads(report.read_text())


def test_progress_line_per_stage_and_the_tables(run: tuple[object, Path, Path, dict]) -> None:
    result, _, out, _ = run
    stderr = result.stderr  # type: ignore[attr-defined]
    stages = [
        line.split(":")[1].strip() for line in stderr.splitlines() if line.startswith("tune:")
    ]
    assert stages == ["load", "screen", "confirm", "parity", "write"]
    text = result.stdout  # type: ignore[attr-defined]
    assert "vs onnxruntime defaults [p10–p90]" in text
    assert "control (defaults, carried)" in text and "picked: " in text
    assert "parity pass" in text and f"wrote {out}" in text
    assert "ORT_LOAD_CONFIG_FROM_MODEL=1" in text


def test_the_record_carries_machine_batch_and_ratio(run: tuple[object, Path, Path, dict]) -> None:
    _, _, out, data = run
    props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    record = json.loads(props[TUNE_RECORD_KEY])
    assert record == data["record"]
    assert record["batch_size"] == 4 and record["provider"] == "cpu"
    assert set(record["machine"]) >= {"cpu_model", "cpu_flags", "logical_cpus", "cpus_available"}
    assert isinstance(record["machine"]["cpu_flags"], list)
    control = record["control"]
    assert control["p10"] <= control["median"] <= control["p90"]
    if record["faster_beyond_noise"]:
        assert record["ratio"]["p10"] <= record["ratio"]["median"] <= record["ratio"]["p90"]
    else:
        assert record["ratio"] is None
    assert model_settings(out) is not None
    assert record["settings"] == model_settings(out).to_dict()  # type: ignore[union-attr]
    assert len(data["screen"]) == 20 and data["parity"]["passed"]  # 10 settings × prepacking


def test_the_tuned_file_runs_in_a_plain_session_and_only_metadata_changed(
    run: tuple[object, Path, Path, dict],
) -> None:
    _, model, out, _ = run
    src, dst = onnx.load(str(model)), onnx.load(str(out))
    assert {p.key for p in dst.metadata_props} == {"source", "ort_config", TUNE_RECORD_KEY}
    for m in (src, dst):
        del m.metadata_props[:]
    assert src.SerializeToString() == dst.SerializeToString()
    assert make_session(out, file_settings="opt_in").get_inputs()[0].name == "x"


def test_refuses_an_uncarriable_setting_with_exit_2(tmp_path: Path) -> None:
    model = save(conv_net(), tmp_path / "m.onnx")
    out = tmp_path / "t.onnx"
    result = runner.invoke(
        app, ["tune", str(model), "-o", str(out), "--fix", "enable_mem_pattern=0"]
    )
    assert result.exit_code == 2
    assert "does not read 'enable_mem_pattern'" in result.stderr
    assert "so.enable_mem_pattern" in result.stderr and not out.exists()


def test_bad_fix_and_provider_are_errors(tmp_path: Path) -> None:
    model = save(conv_net(), tmp_path / "m.onnx")
    base = ["tune", str(model), "-o", str(tmp_path / "t.onnx")]
    result = runner.invoke(app, [*base, "--fix", "intra_op_num_threads"])
    assert result.exit_code == 2 and "use KEY=VALUE" in result.stderr
    result = runner.invoke(app, [*base, "--providers", "tpu"])
    assert result.exit_code == 2 and "choose cpu or cuda" in result.stderr
    result = runner.invoke(app, [*base, "--json", str(model)])
    assert result.exit_code == 2 and "--json" in result.stderr
    assert "would destroy the input" in result.stderr
    result = runner.invoke(app, [*base, "--json", str(tmp_path / "t.onnx")])
    assert result.exit_code == 2 and "both write" in result.stderr
    result = runner.invoke(app, [*base, "--json", str(tmp_path)])
    assert result.exit_code == 2 and "is a directory" in result.stderr
    result = runner.invoke(app, ["tune", str(tmp_path / "missing.onnx"), "-o", "x.onnx"])
    assert result.exit_code == 2 and "missing.onnx not found; check the path" in result.stderr
    assert not any(tmp_path.glob("*.json"))


def test_bench_measures_the_tuned_file_beside_the_others(tmp_path: Path) -> None:
    """`bench --tuned`: one more candidate, opened with what it carries, compared with
    onnxruntime on torch's export at every batch size."""
    import torch
    from reference import randomize_net_state

    from bnexport import fold_model
    from bnexport.checkpoint import save_checkpoint
    from bnexport.data import FASHION_MNIST_NORMALIZE
    from bnexport.export import export_onnx
    from bnexport.nets import Net

    net = randomize_net_state(Net(temperature=0.5), seed=7).eval()
    ckpt = tmp_path / "net.pt"
    save_checkpoint(ckpt, net, normalize=FASHION_MNIST_NORMALIZE, metadata={})
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    exported = tmp_path / "net.onnx"
    export_onnx(fold_model(net, (x,)).module, x, exported)
    tuned = tmp_path / "net_tuned.onnx"
    result = runner.invoke(app, ["tune", str(exported), "-o", str(tuned), *TINY])
    assert result.exit_code == 0, result.output
    report = tmp_path / "bench.json"
    bench = ["bench", str(ckpt), "--onnx", str(exported), "--tuned", str(tuned), "--no-cuda"]
    bench += ["--repeats", "2", "--min-time", "0.002", "--warmup", "0.005", "--cooldown", "0.001"]
    result = runner.invoke(app, [*bench, "--batch-sizes", "1,2", "--json", str(report)])
    assert result.exit_code == 0, result.output
    label = "onnxruntime CPU, net_tuned.onnx (what it carries: "
    # Two rows of the measurements table (batch 1, 2) and its row of the comparisons table.
    assert result.stdout.count(label) == 3
    data = json.loads(report.read_text())
    name = "ort_tuned:net_tuned.onnx"
    compared = {(c["candidate"], c["reference"], c["batch_size"]) for c in data["comparisons"]}
    assert {(name, "ort_torch_export", b) for b in (1, 2)} <= compared
    info = next(c for c in data["candidates"] if c["name"] == name)
    opened = info["session_options"]["opened"]  # bnexport's factory for session config entries
    assert info["matches"] and ("apply" in opened or opened == "ORT_LOAD_CONFIG_FROM_MODEL=1")
    missing = runner.invoke(app, [*bench[:4], "--tuned", str(tmp_path / "nope.onnx")])
    assert missing.exit_code == 2 and "--tuned" in missing.stderr and "not found" in missing.stderr
