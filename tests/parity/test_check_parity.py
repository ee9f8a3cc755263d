"""check_parity end to end on an exported Net: runners, reports, input matching, CUDA gating."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from parity_helpers import TEMPERATURE, HandFolded, cuda, cuda_or_skip, inject, make_net, net_f64

from bnexport.data import FASHION_MNIST_NORMALIZE
from bnexport.errors import ParityInputError, ProviderUnavailableError
from bnexport.ort import SessionConfig, make_session, probe_cuda
from bnexport.parity import CheckConfig, InputConfig, Tolerance, check_parity

FAST = InputConfig(random_count=16)  # bundled images + 16 random + edge cases


@pytest.fixture(scope="module")
def report(onnx_path: Path, net: torch.nn.Module):  # type: ignore[no-untyped-def]
    cfg = CheckConfig(  # every input asked for: the same whatever the machine's speed
        providers=("cpu",),
        opt_levels=("disabled", "basic", "all"),
        batch_sizes=(1, 7, 64),
        samples=InputConfig().random_count,
    )
    return check_parity(
        onnx_path,
        net,
        cfg,
        normalize=FASHION_MNIST_NORMALIZE,
        input_shape=(1, 28, 28),
        folded=HandFolded(net),
    )


def test_correct_export_passes_every_runner(report) -> None:  # type: ignore[no-untyped-def]
    assert report.passed and report.failing_runners == []
    ran = {(r.runner, r.batch_size) for r in report.results}
    for level in ("disabled", "basic", "all"):
        assert {(f"ort-cpu-{level}", b) for b in (1, 7, 64)} <= ran
    assert ("torch-folded", 64) in ran
    assert "torch-fp64" not in {r.runner for r in report.results}  # the truth, not a candidate
    assert all(r.passed for r in report.results)
    logits = [r.outputs[0] for r in report.results if r.runner.startswith("ort-")]
    assert all(o.argmax_agreement == 1.0 and o.shape[1] == 10 for o in logits)
    # every candidate is measured against the float64 truth, relative to fp32's own error
    floor = report.noise_floors()["logits"]
    assert 0 < floor < 1e-4
    assert all(o.error is not None and o.error <= 4 * floor for o in logits)


def test_fixed_mode_compares_with_fp32_and_reports_the_truth(
    onnx_path: Path, net: torch.nn.Module
) -> None:
    cfg = CheckConfig(
        providers=("cpu",),
        opt_levels=("all",),
        batch_sizes=(64,),
        inputs=FAST,
        tolerance_mode="fixed",
    )
    rep = check_parity(onnx_path, net, cfg, normalize=FASHION_MNIST_NORMALIZE)
    assert rep.passed
    gt = next(r for r in rep.results if r.runner == "torch-fp64")
    assert not gt.gating  # the ground truth is reported, never gates
    ort = next(r for r in rep.results if r.runner == "ort-cpu-all")
    assert ort.tolerance == Tolerance(rtol=1e-4, atol_scale=1e-5)


def test_ground_truth_error_matches_an_independent_float64_forward(
    report,
    onnx_path: Path,
    net: torch.nn.Module,  # type: ignore[no-untyped-def]
) -> None:
    """The report's 'vs float64' figure equals max|ORT − F-based float64 forward|."""
    from bnexport.parity.inputs import build_inputs
    from bnexport.signature import TensorSpec

    spec = (TensorSpec("input", (None, 1, 28, 28), np.dtype(np.float32)),)
    x = build_inputs(spec, InputConfig(), normalize=FASHION_MNIST_NORMALIZE).arrays()["input"]
    truth = net_f64(net.state_dict(), x, TEMPERATURE)
    sess = make_session(onnx_path, SessionConfig(graph_optimization_level="all"))
    (got,) = sess.run(None, {"input": x[:64]})
    assert np.abs(got - truth[:64]).max() <= 1e-5 * max(1.0, np.abs(truth[:64]).max())
    result = next(r for r in report.results if r.runner == "ort-cpu-all" and r.batch_size == 64)
    full = np.concatenate(
        [sess.run(None, {"input": x[i : i + 64]})[0] for i in range(0, len(x), 64)]
    )
    assert result.ground_truth_max_abs_err["logits"] == pytest.approx(np.abs(full - truth).max())


def test_json_holds_per_runner_errors_and_tolerance(report, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "r.json"
    report.write_json(path)
    data = json.loads(path.read_text())
    assert data["passed"] is True
    for r in data["results"]:
        assert isinstance(r["max_abs_err"], float) and r["tolerance"]["rule"] == "noise"
        assert r["outputs"][0]["worst"]["sample"] >= 0
        assert r["outputs"][0]["noise_ratio"] <= r["tolerance"]["factor"]
    assert data["tolerance_mode"] == "noise" and data["noise_floors"]["logits"] > 0
    assert data["tolerances"]["cpu"] == {"rtol": 1e-4, "atol_scale": 1e-5}  # --tolerance fixed
    assert {"torch", "onnxruntime", "onnx", "numpy"} <= set(data["versions"])
    assert any(r.get("session_providers") == ["CPUExecutionProvider"] for r in data["runners"])


def test_junit_and_markdown(report, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "r.xml"
    report.write_junit(path)
    suite = ET.parse(path).getroot().find("testsuite")
    assert suite is not None
    cases = suite.findall("testcase")
    assert len(cases) == len(report.results) + len(report.skipped)
    assert suite.get("failures") == "0" and not suite.findall("testcase/failure")
    md = report.to_markdown()
    assert "PASS" in md and "| ort-cpu-all | 64 |" in md


def test_a_fault_fails_the_onnx_runners_with_an_explanation(
    onnx_path: Path, net: torch.nn.Module, tmp_path: Path
) -> None:
    bad = inject(onnx_path, tmp_path / "bad.onnx", "bias-channel")
    cfg = CheckConfig(providers=("cpu",), batch_sizes=(7,), inputs=FAST, folded=False)
    rep = check_parity(bad, net, cfg, normalize=FASHION_MNIST_NORMALIZE)
    assert not rep.passed
    assert rep.failing_runners == ["ort-cpu-disabled", "ort-cpu-all"]
    res = rep.failures[0]
    out = res.outputs[0]
    assert out.min_atol_scale > 1e-5 and out.worst is not None
    assert out.noise_ratio is not None and out.noise_ratio > 4
    msg = res.failure_message()
    assert "the noise floor" in msg and "--atol" in msg and "worst: #" in msg
    xml = ET.fromstring(rep.to_junit_xml())
    failures = xml.findall("testsuite/testcase/failure")
    assert len(failures) == 2 and "ort-cpu" in failures[0].get("message", "")


def test_the_model_bnexport_fold_folded_is_checked_and_none_is_listed_as_skipped(
    onnx_path: Path, net: torch.nn.Module
) -> None:
    from bnexport.fold import fold_model

    cfg = CheckConfig(providers=("cpu",), opt_levels=("all",), batch_sizes=(64,), inputs=FAST)
    module = fold_model(net, (torch.randn(2, 1, 28, 28),), verify=False).module
    rep = check_parity(onnx_path, net, cfg, normalize=FASHION_MNIST_NORMALIZE, folded=module)
    folded = [r for r in rep.results if r.runner == "torch-folded"]
    assert folded and folded[0].passed, rep.skipped
    why = "the model cannot be folded: ValueError: no"
    rep = check_parity(onnx_path, net, cfg, normalize=FASHION_MNIST_NORMALIZE, folded_reason=why)
    assert not [r for r in rep.results if r.runner == "torch-folded"]
    assert {"runner": "torch-folded", "reason": why} in rep.skipped


def test_static_batch_onnx_with_other_batch_sizes_is_an_input_error(
    onnx_path: Path, net: torch.nn.Module, tmp_path: Path
) -> None:
    model = onnx.load(str(onnx_path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    path = tmp_path / "static.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ParityInputError, match="fixed batch of 1"):
        check_parity(path, net, CheckConfig(providers=("cpu",), batch_sizes=(1, 7)))


def test_output_count_mismatch_is_an_input_error(onnx_path: Path) -> None:
    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_net()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.net(x)
            return y, y

    with pytest.raises(ParityInputError, match="returns 2 output"):
        check_parity(onnx_path, TwoHeads(), CheckConfig(providers=("cpu",), inputs=FAST))


def test_output_shape_mismatch_is_an_input_error(onnx_path: Path) -> None:
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 12))
    with pytest.raises(ParityInputError, match="logits"):
        check_parity(onnx_path, other, CheckConfig(providers=("cpu",), inputs=FAST))


def test_input_count_mismatch_is_an_input_error(onnx_path: Path) -> None:
    class Needs2(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

    with pytest.raises(ParityInputError, match="must match by name or by order"):
        check_parity(onnx_path, Needs2(), CheckConfig(providers=("cpu",), inputs=FAST))


def test_dtype_mismatch_is_an_input_error(onnx_path: Path) -> None:
    with pytest.raises(ParityInputError, match="same precision"):
        check_parity(onnx_path, make_net().double(), CheckConfig(providers=("cpu",), inputs=FAST))


def test_cuda_asked_for_and_not_running_is_an_error_never_a_cpu_pass(
    onnx_path: Path, net: torch.nn.Module
) -> None:
    probe = probe_cuda()
    if probe.available:
        pytest.skip("CUDA runs here")
    assert probe.reason
    with pytest.raises(ProviderUnavailableError, match="CUDA"):
        make_session(onnx_path, SessionConfig(provider="cuda"))
    with pytest.raises(ProviderUnavailableError, match="CUDA does not run here"):
        check_parity(onnx_path, net, CheckConfig(providers=("cpu", "cuda")))
    rep = check_parity(
        onnx_path,
        net,
        CheckConfig(opt_levels=("all",), batch_sizes=(64,), inputs=FAST, folded=False),
    )
    assert {s["runner"] for s in rep.skipped} == {"ort-cuda", "ort-cuda-tf32"}
    assert all(probe.reason in s["reason"] for s in rep.skipped)


@cuda
def test_cuda_runner_really_runs_on_cuda_and_passes(onnx_path: Path, net: torch.nn.Module) -> None:
    cuda_or_skip()
    rep = check_parity(
        onnx_path,
        net,
        CheckConfig(providers=("cuda",), inputs=FAST),
        normalize=FASHION_MNIST_NORMALIZE,
    )
    infos = {r["name"]: r for r in rep.runners}
    assert infos["ort-cuda"]["session_providers"][0] == "CUDAExecutionProvider"
    assert infos["ort-cuda"]["provider_options"]["use_tf32"] == "0"
    assert infos["ort-cuda-tf32"]["provider_options"]["use_tf32"] == "1"
    assert not infos["ort-cuda-tf32"]["gating"]
    assert rep.passed, [r.failure_message() for r in rep.failures]
    assert {r.batch_size for r in rep.results if r.runner == "ort-cuda"} == {1, 7, 64}


@cuda
def test_cuda_catches_a_fault(onnx_path: Path, net: torch.nn.Module, tmp_path: Path) -> None:
    cuda_or_skip()
    bad = inject(onnx_path, tmp_path / "bad.onnx", "kernel-transposed")
    rep = check_parity(
        bad,
        net,
        CheckConfig(providers=("cuda",), batch_sizes=(64,), inputs=FAST),
        normalize=FASHION_MNIST_NORMALIZE,
    )
    assert not rep.passed and "ort-cuda" in rep.failing_runners


# --------------------------------------------------------------------------------------------
# Several inputs, dict outputs, and the weights fingerprint


class _Mixer(torch.nn.Module):
    """forward(a, ids) → {'score', 'aux'}; swapping or mis-keying anything changes the numbers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.fc = torch.nn.Linear(6, 3)
        self.embed = torch.nn.Embedding(10, 3)

    def forward(self, a: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.fc(a) - 2.0 * self.embed(ids).mean(1)
        return {"score": h.sum(1, keepdim=True), "aux": torch.tanh(h)}


class _MixerRenamed(_Mixer):
    """The same computation, other parameter names and the dict's keys in the other order."""

    def forward(self, p: torch.Tensor, q: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        out = super().forward(p, q)
        return {"aux": out["aux"], "score": out["score"]}


@pytest.fixture(scope="module")
def mixer_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bnexport.export import export_onnx
    from bnexport.fingerprint import METADATA_KEY, weights_sha256

    model = _Mixer().eval()
    example = (torch.randn(2, 6), torch.randint(0, 10, (2, 4)))
    path = tmp_path_factory.mktemp("mixer") / "mixer.onnx"
    export_onnx(model, example, path, metadata={METADATA_KEY: weights_sha256(model)})
    return path


@pytest.mark.parametrize("reference", [_Mixer, _MixerRenamed], ids=["by-name", "by-position"])
def test_several_inputs_and_dict_outputs_pass(mixer_onnx: Path, reference: type) -> None:
    from bnexport.fingerprint import weights_sha256

    model = reference().eval()
    cfg = CheckConfig(providers=("cpu",), batch_sizes=(1, 7), inputs=FAST)
    rep = check_parity(mixer_onnx, model, cfg)
    assert rep.passed, [r.failure_message() for r in rep.failures]
    assert [i["name"] for i in rep.model["inputs"]] == ["a", "ids"]
    assert [i["dtype"] for i in rep.model["inputs"]] == ["float32", "int64"]
    ort_all = next(r for r in rep.results if r.runner == "ort-cpu-all" and r.batch_size == 7)
    assert [o.name for o in ort_all.outputs] == ["score", "aux"]
    assert rep.reference["weights_sha256"] == weights_sha256(model)
    assert rep.reference["inputs_by"] == ("name" if reference is _Mixer else "position")
    assert not any("weights_sha256" in n for n in rep.notes)


def test_a_reference_computing_something_else_fails(mixer_onnx: Path) -> None:
    """Guard for the test above: same weights, one output 1 % off: a mismatch (exit 1), found."""
    from bnexport.fingerprint import weights_sha256

    class Swapped(_Mixer):
        def forward(self, a: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
            out = super().forward(a, ids)
            return {"score": out["score"] * 1.01, "aux": out["aux"]}

    model = Swapped().eval()
    assert weights_sha256(model) == weights_sha256(_Mixer())  # same weights, other computation
    cfg = CheckConfig(providers=("cpu",), batch_sizes=(7,), inputs=FAST, folded=False)
    rep = check_parity(mixer_onnx, model, cfg)
    assert not rep.passed


def test_other_weights_are_refused_before_any_run(mixer_onnx: Path) -> None:
    from bnexport.errors import WeightsMismatchError

    other = _Mixer().eval()
    with torch.no_grad():
        other.fc.bias[0] += 1.0
    calls: list[str] = []
    with pytest.raises(WeightsMismatchError, match="this ONNX was exported from weights"):
        check_parity(
            mixer_onnx,
            other,
            CheckConfig(providers=("cpu",), inputs=FAST),
            progress=lambda event: calls.append(event.message),
        )
    assert calls == []


def test_an_onnx_without_a_fingerprint_is_checked_with_a_note(report) -> None:  # type: ignore[no-untyped-def]
    assert any("records no weights_sha256" in n for n in report.notes)
