"""`bnexport check` through the CLI: pass, injected faults, reproducible inputs, bad input, CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parity"))
from parity_helpers import FAULTS, artifacts, cuda, cuda_or_skip, inject, make_net

from bnexport.cli.app import app
from bnexport.ort import probe_cuda

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return artifacts(tmp_path_factory.getbasetemp())["checkpoint"]


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return artifacts(tmp_path_factory.getbasetemp())["onnx"]


QUICK = ["--batch-sizes", "7,64", "--no-folded"]


def check(*args: str | Path) -> object:
    return runner.invoke(app, ["check", *map(str, args)])


def test_correct_export_passes_and_writes_reports(
    onnx_path: Path, checkpoint: Path, tmp_path: Path
) -> None:
    j, x, m = tmp_path / "r.json", tmp_path / "r.xml", tmp_path / "r.md"
    res = check(
        onnx_path,
        "--against",
        checkpoint,
        "--providers",
        "cpu",
        "--batch-sizes",  # the default adapts to the machine's speed at the time
        "1,7,64",
        "--json",
        j,
        "--junit",
        x,
        "--markdown",
        m,
    )
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output and "ort-cpu-disabled" in res.output and "ort-cpu-all" in res.output
    data = json.loads(j.read_text())
    assert data["passed"] and data["model"]["sha256"]
    ort = [r for r in data["results"] if r["runner"].startswith("ort-cpu")]
    assert {(r["runner"], r["batch_size"]) for r in ort} == {
        (f"ort-cpu-{lvl}", b) for lvl in ("disabled", "all") for b in (1, 7, 64)
    }
    for r in ort:
        assert isinstance(r["max_abs_err"], float) and r["outputs"][0]["rel_err"] < 1e-4
        assert r["tolerance"] == {"rule": "noise", "factor": 4.0, "floor_ulps": 4.0}
    suite = ET.parse(x).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0"
    assert len(suite.findall("testcase")) == len(data["results"]) + len(data["skipped"])
    assert "bnexport check: ✅ PASS" in m.read_text()


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_injected_fault_gives_exit_1_naming_the_runner(
    fault: str, onnx_path: Path, checkpoint: Path, tmp_path: Path
) -> None:
    bad = inject(onnx_path, tmp_path / f"{fault}.onnx", fault)
    j = tmp_path / "r.json"
    res = check(bad, "--against", checkpoint, "--providers", "cpu", "--json", j, *QUICK)
    assert res.exit_code == 1, res.output
    fail_line = next(line for line in res.output.splitlines() if line.startswith("FAIL:"))
    assert "ort-cpu-disabled" in fail_line and "ort-cpu-all" in fail_line
    assert "the noise floor" in res.output and "--atol" in res.output
    data = json.loads(j.read_text())
    assert not data["passed"] and set(data["failing_runners"]) == {
        "ort-cpu-disabled",
        "ort-cpu-all",
    }


def test_save_inputs_then_inputs_reproduces_identical_figures(
    onnx_path: Path, checkpoint: Path, tmp_path: Path
) -> None:
    fed, j1, j2 = tmp_path / "fed.npz", tmp_path / "1.json", tmp_path / "2.json"
    first = check(
        onnx_path,
        "--against",
        checkpoint,
        "--providers",
        "cpu",
        "--seed",
        "7",
        "--save-inputs",
        fed,
        "--json",
        j1,
        *QUICK,
    )
    assert first.exit_code == 0, first.output
    again = check(
        onnx_path,
        "--against",
        checkpoint,
        "--providers",
        "cpu",
        "--inputs",
        fed,
        "--json",
        j2,
        *QUICK,
    )
    assert again.exit_code == 0, again.output

    def figures(path: Path) -> list[dict]:
        out = []
        for r in json.loads(path.read_text())["results"]:
            for o in r["outputs"]:
                out.append({k: v for k, v in o.items()})
        return out

    assert figures(j1) == figures(j2)
    sets = json.loads(j2.read_text())["inputs"]
    assert (
        sets["source"] == str(fed)
        and sets["samples"] == json.loads(j1.read_text())["inputs"]["samples"]
    )


def test_cuda_asked_for_where_it_cannot_run_is_exit_2_with_the_reason(
    onnx_path: Path, checkpoint: Path
) -> None:
    probe = probe_cuda()
    if probe.available:
        pytest.skip("CUDA runs here")
    res = check(onnx_path, "--against", checkpoint, "--providers", "cuda")
    assert res.exit_code == 2
    assert "CUDA does not run here" in res.output and probe.reason in res.output
    assert "PASS" not in res.output


def test_auto_lists_cuda_as_skipped_with_the_reason(onnx_path: Path, checkpoint: Path) -> None:
    if probe_cuda().available:
        pytest.skip("CUDA runs here")
    res = check(onnx_path, "--against", checkpoint, "--opt-levels", "all", *QUICK)
    assert res.exit_code == 0, res.output
    assert "skipped ort-cuda, ort-cuda-tf32: CUDA does not run here" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--providers", "tpu"], "'tpu': choose one or more, comma-separated, of auto, cpu, cuda"),
        (["--providers", "auto,cpu"], "provider 'auto' cannot be combined with others"),
        (["--opt-levels", "max"], "'max': choose one or more, comma-separated, of disabled, basic"),
        (["--batch-sizes", "0"], "positive integers"),
        (["--rtol", "x"], "not a number"),
    ],
)
def test_bad_options_are_exit_2_one_line(
    onnx_path: Path, checkpoint: Path, args: list[str], message: str
) -> None:
    res = check(onnx_path, "--against", checkpoint, *args)
    assert res.exit_code == 2 and message in res.output
    assert "Traceback" not in res.output


def test_missing_files_and_no_reference_are_exit_2(onnx_path: Path, tmp_path: Path) -> None:
    res = check(tmp_path / "nope.onnx", "--against", tmp_path / "nope.pt")
    assert res.exit_code == 2 and "Traceback" not in res.output
    res = check(onnx_path)
    assert res.exit_code == 2 and "--against" in res.output


def test_model_factory_with_mismatched_outputs_is_exit_2(
    onnx_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "wrongmodel.py").write_text(
        textwrap.dedent("""
        import torch
        def make():
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 12))
    """)
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    res = check(onnx_path, "--model", "wrongmodel:make", "--input-shape", "1,28,28")
    assert res.exit_code == 2 and "logits" in res.output and "Traceback" not in res.output


def test_model_factory_with_state_dict_passes(
    onnx_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--model package.module:factory --against CHECKPOINT`: no normalization known → random +
    edge only."""
    (tmp_path / "mynet.py").write_text(
        textwrap.dedent("""
        from bnexport.nets import Net
        def make():
            return Net(temperature=1.5)
    """)
    )
    torch.save(make_net().state_dict(), tmp_path / "sd.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    res = check(
        onnx_path,
        "--model",
        "mynet:make",
        "--input-shape",
        "1,28,28",
        "--against",
        tmp_path / "sd.pt",
        "--providers",
        "cpu",
        *QUICK,
    )
    assert res.exit_code == 0, res.output
    assert "bundled images not used" not in res.output  # a --model source: random + edge cases


@cuda
def test_cuda_provider_passes_on_a_correct_export(onnx_path: Path, checkpoint: Path) -> None:
    cuda_or_skip()
    res = check(onnx_path, "--against", checkpoint, "--providers", "cpu,cuda")
    assert res.exit_code == 0, res.output
    assert "ort-cuda " in res.output and "ort-cuda-tf32" in res.output


# --------------------------------------------------------------------------------------------
# The weights fingerprint, and several inputs through `check`

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn


    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.fc = nn.Linear(6, 4)

        def forward(self, image, features):
            a = self.bn(self.conv(image)).mean((2, 3))
            return {"score": a + self.fc(features), "aux": a}


    def seeded():
        torch.manual_seed(0)
        return TwoInputs()


    def unseeded():
        return TwoInputs()


    def seeded_other():
        torch.manual_seed(1)
        return TwoInputs()


    class ShapeBranch(nn.Module):  # torch.export follows the branch, torch.fx cannot
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, image):
            y = self.bn(self.conv(image))
            if image.shape[-1] % 2 == 0:
                y = y * 2
            return y.mean((2, 3))


    def shape_branch():
        torch.manual_seed(0)
        return ShapeBranch()
    """
)
SHAPES = ["--input-shape", "3,8,8", "--input-shape", "6"]


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "bnx_factories.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _export(factory: str, path: Path) -> None:
    res = runner.invoke(
        app, ["onnx", "--model", f"bnx_factories:{factory}", *SHAPES, "-o", str(path), "--no-check"]
    )
    assert res.exit_code == 0, res.output


def _one_error_line(res: object) -> str:
    lines = [line for line in res.stderr.splitlines() if line.strip()]  # type: ignore[attr-defined]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output  # type: ignore[attr-defined]
    return lines[0]


def test_an_unseeded_factory_is_refused_naming_the_weights(factories: Path) -> None:
    onnx_file = factories / "m.onnx"
    _export("unseeded", onnx_file)
    res = check(onnx_file, "--model", "bnx_factories:unseeded", *SHAPES, *QUICK)
    assert res.exit_code == 2, res.output
    line = _one_error_line(res)
    assert line.startswith("bnexport: error: this ONNX was exported from weights ")
    assert "the reference has " in line
    assert "the factory bnx_factories:unseeded returns different weights on each call" in line
    assert line.endswith(": seed it")
    assert "PASS" not in res.output and "FAIL" not in res.output


def test_another_seeded_model_is_refused_and_the_same_one_passes(factories: Path) -> None:
    onnx_file = factories / "m.onnx"
    _export("seeded", onnx_file)
    res = check(onnx_file, "--model", "bnx_factories:unseeded", *SHAPES, *QUICK)
    assert res.exit_code == 2 and "this ONNX was exported from weights" in _one_error_line(res)
    res = check(onnx_file, "--model", "bnx_factories:seeded_other", *SHAPES, *QUICK)
    assert res.exit_code == 2, res.output
    line = _one_error_line(res)
    assert "this ONNX was exported from weights" in line and "seeded?" not in line
    assert "records it was exported from bnx_factories:seeded" in line
    assert line.endswith("check it against bnx_factories:seeded")
    fed, j = factories / "fed.npz", factories / "r.json"
    args = ["--model", "bnx_factories:seeded", *SHAPES, "--providers", "cpu", *QUICK]
    res = check(onnx_file, *args, "--save-inputs", fed, "--json", j)
    assert res.exit_code == 0, res.output
    assert "records no weights_sha256" not in res.output
    data = json.loads(j.read_text())
    assert [i["name"] for i in data["model"]["inputs"]] == ["image", "features"]
    props = {p.key: p.value for p in onnx.load(onnx_file).metadata_props}
    assert data["reference"]["weights_sha256"] == props["weights_sha256"]
    with np.load(fed) as npz:
        assert {"image", "features"} <= set(npz.files)
    again = check(onnx_file, *args, "--inputs", fed)
    assert again.exit_code == 0, again.output


def test_a_model_that_cannot_be_folded_skips_only_the_folded_runner(
    factories: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bnexport.fold
    from bnexport.errors import FoldError

    onnx_file, report = factories / "b.onnx", factories / "r.json"
    source = ["--model", "bnx_factories:shape_branch", "--input-shape", "3,8,8"]
    res = runner.invoke(app, ["onnx", *source, "--no-fold", "--no-check", "-o", str(onnx_file)])
    assert res.exit_code == 0, res.output

    def refuse(*args: object, **kwargs: object) -> None:
        raise FoldError("cannot trace the model")

    monkeypatch.setattr(bnexport.fold, "fold_model", refuse)
    res = check(onnx_file, *source, "--providers", "cpu", "--batch-sizes", "7", "--json", report)
    assert res.exit_code == 0, res.output
    data = json.loads(report.read_text())
    (skipped,) = [s for s in data["skipped"] if s["runner"] == "torch-folded"]
    assert skipped["reason"].startswith("the model cannot be folded: FoldError: cannot trace")
    assert [r["runner"] for r in data["results"]] == ["ort-cpu-disabled", "ort-cpu-all"]


def test_an_onnx_without_a_fingerprint_is_checked_and_says_so(
    onnx_path: Path, checkpoint: Path
) -> None:
    res = check(onnx_path, "--against", checkpoint, "--providers", "cpu", *QUICK)
    assert res.exit_code == 0, res.output
    assert "note: the ONNX model records no weights_sha256" in res.output


def test_the_shipped_model_table_fits_100_columns_in_15_lines(tmp_path: Path) -> None:
    """`bnexport check` on models/net.pt: one row per runner, no row wraps at width 100, and the
    whole report (table, rule, skipped runners, verdict) takes at most 15 lines."""
    root = Path(__file__).resolve().parents[2]
    shipped = root / "models" / "net.pt"
    onnx_file = tmp_path / "net.onnx"
    made = runner.invoke(app, ["onnx", str(shipped), "-o", str(onnx_file), "--no-check"])
    assert made.exit_code == 0, made.output
    res = runner.invoke(
        app, ["check", str(onnx_file), "--against", str(shipped)], env={"COLUMNS": "100"}
    )
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert len(lines) <= 15, res.stdout
    assert all(len(line) <= 100 for line in lines), res.stdout
    rows = [
        line.split()[0] for line in lines if line.startswith(" ort-") or line.startswith(" torch")
    ]
    assert rows == ["torch-folded", "ort-cpu-disabled", "ort-cpu-all"]  # one row per runner


def test_verbose_shows_every_batch_size(onnx_path: Path, checkpoint: Path) -> None:
    res = check(onnx_path, "--against", checkpoint, "--providers", "cpu", "--verbose", *QUICK)
    assert res.exit_code == 0, res.output
    batches = {line.split()[1] for line in res.stdout.splitlines() if line.startswith(" ort-cpu")}
    assert batches == {"7", "64"}


def test_fixed_tolerance_mode_and_its_options(onnx_path: Path, checkpoint: Path) -> None:
    base = [onnx_path, "--against", checkpoint, "--providers", "cpu", *QUICK]
    res = check(*base, "--tolerance", "fixed", "--rtol", "1e-4", "--atol", "1e-5")
    assert res.exit_code == 0, res.output
    assert "1e-04 / 1e-05" in res.stdout or "0.0001 / 1e-05" in res.stdout
    bad = check(*base, "--rtol", "1e-4")  # fixed tolerances without --tolerance fixed
    assert bad.exit_code == 2 and "--tolerance fixed" in bad.output
    tight = check(*base, "--noise-factor", "1e-3")
    assert tight.exit_code == 1 and "FAIL" in tight.stdout


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_torch_default_static_batch_export_is_checked_at_its_batch(
    checkpoint: Path, tmp_path: Path, dynamo: bool
) -> None:
    # torch's own export without dynamic shapes: input and output fixed at batch 4; the samples
    # fed (1071) are not a multiple of 4, so the last batch is padded and the padding dropped
    path = tmp_path / "static.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(make_net(), (torch.randn(4, 1, 28, 28),), str(path), dynamo=dynamo)
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_value == 4
    report = tmp_path / "r.json"
    res = check(path, "--against", checkpoint, "--providers", "cpu", "--json", report)
    assert res.exit_code == 0, res.output
    data = json.loads(report.read_text())
    assert data["batch_sizes"] == [4]
    assert data["inputs"]["samples"] % 4 != 0
    ort = [r for r in data["results"] if r["runner"].startswith("ort-cpu")]
    assert ort and all(r["passed"] and r["batch_size"] == 4 for r in ort)
    assert all(r["outputs"][0]["shape"][0] == data["inputs"]["samples"] for r in ort)


@pytest.mark.parametrize("command", ["check", "onnx"])
def test_help_wraps_cleanly_at_80_columns(command: str) -> None:
    res = runner.invoke(app, [command, "--help"], terminal_width=80)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(map(len, lines)) <= 80
    # the docstring's paragraphs are rewrapped, not cut where its source lines end
    if command == "check":
        assert any("factory), or both (your factory with weights)" in ln for ln in lines)


def test_the_default_plan_is_the_same_beside_a_cpu_bound_process(
    onnx_path: Path, checkpoint: Path, tmp_path: Path
) -> None:
    # a budget that sheds (the plan's note says so), so a plan that followed the clock would feed
    # fewer samples on the busy machine; it follows the model's counted cost instead
    args = [onnx_path, "--against", checkpoint, "--providers", "cpu", "--time-budget", "0.1"]
    idle = check(*args, "--save-inputs", tmp_path / "idle.npz", "--json", tmp_path / "idle.json")
    assert idle.exit_code == 0, idle.output
    burn = "import time\nend = time.time() + 60\nwhile time.time() < end: pass"
    burners = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(2)]
    try:
        busy = check(
            *args, "--save-inputs", tmp_path / "busy.npz", "--json", tmp_path / "busy.json"
        )
    finally:
        for proc in burners:
            proc.kill()
            proc.wait()
    assert busy.exit_code == 0, busy.output
    plans = [json.loads((tmp_path / f"{k}.json").read_text()) for k in ("idle", "busy")]
    assert plans[0]["inputs"]["sets"] == plans[1]["inputs"]["sets"]
    assert plans[0]["batch_sizes"] == plans[1]["batch_sizes"]
    assert plans[0]["inputs"]["plan"]["random"] < plans[0]["inputs"]["plan"]["random_asked"]
    with np.load(tmp_path / "idle.npz") as a, np.load(tmp_path / "busy.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key])
    assert "note: plan: " in idle.output
