"""The parity gate on real models, through the CLI: `bnexport onnx` and `bnexport check` pass the
correct export with default options; each injected fault makes `check` exit 1.

Faults (`real.faults`): one conv output channel scaled and one conv bias nudged so that their
effect is about ``TARGET`` × the noise floor (calibrated on the check's own report: the effect of a
1e-2 change, scaled linearly); the fold done without eps; a transposed kernel; one NaN weight; the
temperature dropped (the model that has one). Fault checks run one batch size and one
optimization level on a fixed number of samples, so the calibration is reproducible.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import pytest
from real.cli_models import DEFAULT_SHAPE, INPUT_SHAPES, MODELS
from real.faults import ConvInitializers, calibrated, fold_without_eps, set_temperature
from real.zoo import REAL_MODELS
from typer.testing import CliRunner

from bnexport.cli.app import app
from bnexport.export import export_onnx
from bnexport.fold import fold_model

pytestmark = pytest.mark.real

runner = CliRunner()
TARGET = 8.0  # calibrated faults: effect ≈ 8 × the noise floor (the default limit is 4 ×)
FAULT_CHECK = ["--samples", "4", "--batch-sizes", "1", "--opt-levels", "all"]
FAULTS = ("channel", "bias", "no_eps", "transposed", "nan", "no_temperature")
PER_MODEL = [pytest.param(name, marks=pytest.mark.xdist_group(MODELS[name])) for name in MODELS]
CASES = [
    pytest.param(name, fault, marks=pytest.mark.xdist_group(MODELS[name]))
    for name in MODELS
    for fault in FAULTS
    if fault != "no_temperature" or name == "two_input_net"
]


def _source(name: str) -> list[str]:
    return ["--model", f"real.cli_models:{name}", *INPUT_SHAPES.get(name, DEFAULT_SHAPE)]


def _invoke(args: list[str]) -> Any:
    result = runner.invoke(app, args)
    assert result.exit_code in (0, 1), result.output
    return result


@functools.cache
def _exported(name: str, folder: Path) -> Path:
    """`bnexport onnx` of the factory's model with default options: exit 0 (parity passed)."""
    path = folder / f"{name}.onnx"
    result = runner.invoke(app, ["onnx", *_source(name), "-o", str(path)])
    assert result.exit_code == 0, result.output
    return path


def _check(name: str, model: Path, options: list[str], report: Path | None = None) -> Any:
    json_opts = ["--json", str(report)] if report else []
    return _invoke(["check", str(model), *_source(name), *options, *json_opts])


def _effect(report: Path) -> float:
    """The onnxruntime runner's worst error as a multiple of the noise floor."""
    data = json.loads(report.read_text())
    return max(
        out["noise_ratio"]
        for res in data["results"]
        if res["runner"].startswith("ort-")
        for out in res["outputs"]
    )


def _refolded(name: str, folder: Path, mutate: str) -> Path:
    """The model folded with a mutant (no eps) or its temperature dropped, exported."""
    model, example = REAL_MODELS[MODELS[name]]()
    if mutate == "no_eps":
        with fold_without_eps():
            folded = fold_model(model, example, verify=False).module
    else:
        cold = copy.deepcopy(model)
        set_temperature(cold, 1.0)
        folded = fold_model(cold, example, verify=False).module
    path = folder / f"{name}-{mutate}.onnx"
    export_onnx(folded, example, path)  # the default names, as `bnexport onnx` gives them
    return path


@pytest.mark.parametrize("name", PER_MODEL)
def test_correct_export_passes_onnx_and_check_with_defaults(
    name: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model = _exported(name, tmp_path_factory.getbasetemp())
    result = _check(name, model, [])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output


@pytest.mark.parametrize(("name", "fault"), CASES)
def test_fault_fails_the_check(
    name: str, fault: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    correct = _exported(name, tmp_path_factory.getbasetemp())
    convs = ConvInitializers(correct.read_bytes())
    if fault in ("channel", "bias"):
        edit = convs.channel_scaled if fault == "channel" else convs.bias_nudged
        results: list[Any] = []

        def measure(delta: float) -> float:
            path = tmp_path / f"{fault}-{delta:.3g}.onnx"
            path.write_bytes(edit(delta))
            report = tmp_path / "report.json"
            results.append(_check(name, path, FAULT_CHECK, report))
            return _effect(report)

        _, effect = calibrated(measure, TARGET)
        assert 0.6 * TARGET < effect < 1.6 * TARGET  # calibrated near the target, not far above
        result = results[-1]
    else:
        if fault in ("no_eps", "no_temperature"):
            path = _refolded(name, tmp_path, fault)
        else:
            path = tmp_path / f"{fault}.onnx"
            path.write_bytes(convs.transposed() if fault == "transposed" else convs.nan())
        result = _check(name, path, FAULT_CHECK)
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output


@pytest.mark.xdist_group("timm/mixnet_s")
def test_ill_conditioned_edge_cases_do_not_fail_a_correct_export(tmp_path: Path) -> None:
    """timm mixnet_s (SiLU and squeeze-excite gates) on all −1e4: PyTorch fp32 errs 1.7e-4 of the
    scale, onnxruntime without fusions 0.39. The check leaves such edge cases out of the precision
    verdict, says so, and passes the correct export."""
    source = ["--model", "real.cli_models:timm__mixnet_s", *DEFAULT_SHAPE]
    path = tmp_path / "mixnet_s.onnx"
    made = runner.invoke(app, ["onnx", *source, "-o", str(path), "--no-check"])
    assert made.exit_code == 0, made.output
    every_edge_case = ["--samples", "8"]  # the default sheds edge cases on a busy machine
    result = runner.invoke(
        app, ["check", str(path), *source, *every_edge_case], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "edge cases large-" in result.output and "ill-conditioned" in result.output
