"""`bnexport.runners`: the one runner family parity, bench and tune use. Each runner is checked
against the backend called by hand: the same numbers, named as the ONNX model names them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tiny_onnx import conv_net, save

from bnexport.errors import ExportError, ParityInputError
from bnexport.ort import SessionConfig
from bnexport.runners import OnnxRuntimeRunner, ProgramRunner, TorchRunner


class _TwoHeads(torch.nn.Module):
    """``forward(image, scale)`` returning ``{"aux": …, "out": …}`` (keys not in ONNX order)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, image: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.fc(image) * scale
        return {"aux": out.sum(dim=1, keepdim=True), "out": out}


def _feed(batch: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "scale": rng.standard_normal((batch, 1)).astype(np.float32),
        "image": rng.standard_normal((batch, 4)).astype(np.float32),
    }


def test_torch_runner_feeds_by_name_and_names_outputs_by_key() -> None:
    model, feed = _TwoHeads().eval(), _feed()
    runner = TorchRunner(model, ["image", "scale"], ["out", "aux"])
    got = runner.infer(feed)
    want = model(torch.from_numpy(feed["image"]), torch.from_numpy(feed["scale"]))
    assert list(got) == ["out", "aux"] and runner.info()["inputs_by"] == "name"
    np.testing.assert_array_equal(got["out"], want["out"].detach().numpy())
    np.testing.assert_array_equal(got["aux"], want["aux"].detach().numpy())
    assert runner.name == "torch-fp32"


def test_torch_runner_feeds_by_position_when_the_names_differ() -> None:
    model, feed = _TwoHeads().eval(), _feed()
    renamed = {"a": feed["image"], "b": feed["scale"]}
    runner = TorchRunner(model, ["a", "b"], ["x", "y"])
    got = runner.infer(renamed)
    assert runner.info()["inputs_by"] == "position"
    np.testing.assert_array_equal(
        got["x"], TorchRunner(model, ["image", "scale"]).infer(feed)["aux"]
    )


def test_torch_runner_refuses_inputs_that_cannot_fit_the_forward() -> None:
    with pytest.raises(ParityInputError, match="must match by name or by order"):
        TorchRunner(_TwoHeads(), ["a", "b", "c"], ["out", "aux"])
    with pytest.raises(ParityInputError, match="returns 2 output"):
        TorchRunner(_TwoHeads(), ["image", "scale"], ["only"]).infer(_feed())


def test_float64_runner_computes_in_float64_on_a_copy() -> None:
    model, feed = _TwoHeads().eval(), _feed()
    runner = TorchRunner(model, ["image", "scale"], ["out", "aux"], dtype="float64")
    got = runner.infer(feed)
    assert got["out"].dtype == np.float64 and runner.name == "torch-fp64"
    assert model.fc.weight.dtype == torch.float32  # the caller's model is untouched
    x64 = {k: torch.from_numpy(v).double() for k, v in feed.items()}
    want = model.double()(**x64)["out"].detach().numpy()
    np.testing.assert_array_equal(got["out"], want)


def test_torch_runner_without_output_names_names_them_as_the_exporter_does() -> None:
    feed = {"x": np.ones((2, 4), np.float32)}
    assert list(TorchRunner(torch.nn.Linear(4, 2).eval(), ["x"]).infer(feed)) == ["output"]
    assert list(TorchRunner(_Pair().eval(), ["x"]).infer(feed)) == ["output_0", "output_1"]


class _Pair(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + 1, x * 2


def test_prepare_binds_the_feed_and_returns_the_backend_output() -> None:
    """What timing measures: one call on the bound feed, the output as the backend gives it."""
    model, feed = _TwoHeads().eval(), _feed()
    call = TorchRunner(model, ["image", "scale"], ["out", "aux"]).prepare(feed)
    out = call()
    assert isinstance(out, dict) and torch.equal(out["out"], call()["out"])


def test_onnxruntime_runner_matches_a_session_run_by_hand(tmp_path: Path) -> None:
    path = save(conv_net(), tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    runner = OnnxRuntimeRunner(path, SessionConfig(provider="cpu"), name="ort-cpu-all")
    np.testing.assert_array_equal(runner.infer({"x": x})["logits"], want[0])
    assert [s.name for s in runner.input_specs] == ["x"] and runner.output_names == ("logits",)
    info = runner.info()
    assert info["provider"] == "cpu" and info["session_providers"][0] == "CPUExecutionProvider"
    # another name for the input (bench feeds every file by the model's own input name)
    renamed = OnnxRuntimeRunner.wrap(runner.session, name="wrapped", feed_names=["input"])
    np.testing.assert_array_equal(renamed.prepare({"input": x})()[0], want[0])
    assert "provider" not in renamed.info()
    with pytest.raises(ValueError, match="2 feed names"):
        OnnxRuntimeRunner.wrap(runner.session, name="bad", feed_names=["a", "b"])


def test_program_runner_loads_a_saved_program(tmp_path: Path) -> None:
    from bnexport.export import save_program

    model, feed = _TwoHeads().eval(), _feed()
    path = tmp_path / "m.pt2"
    save_program(model, (torch.from_numpy(feed["image"]), torch.from_numpy(feed["scale"])), path)
    runner = ProgramRunner.load(path, ["image", "scale"])
    assert runner.output_names == ("aux", "out")  # a dict's keys, as the exporter names them
    got = runner.infer(feed)
    want = TorchRunner(model, ["image", "scale"], ["aux", "out"]).infer(feed)
    np.testing.assert_allclose(got["out"], want["out"], rtol=1e-6, atol=1e-7)
    with pytest.raises(ExportError, match=r"torch\.export\.load failed"):
        ProgramRunner.load(tmp_path / "missing.pt2", ["image", "scale"])
