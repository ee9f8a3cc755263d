"""`bnexport.tune.tune_model` and its stages on tiny models: the refusals before any work, the
output check, and a whole run whose copy differs from the input only in metadata."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from tiny_onnx import conv_net, save

from bnexport.errors import BnexportError, OutputPathError
from bnexport.ort_config import ORT_CONFIG_KEY, OrtSettings, model_settings, with_metadata
from bnexport.tune import TuneConfig, check_outputs, model_inputs, tune_model, with_ort_config

TINY = {
    "budget_s": 2.0,
    "screen_repeats": 3,
    "confirm_repeats": 3,
    "finalists": 2,
    "min_time_s": 0.001,
    "warmup_s": 0.002,
    "cooldown_s": 0.0,
}


def test_fixed_batch_and_symbolic_dims_are_refused(tmp_path: Path) -> None:
    import onnxruntime as ort

    fixed = save(conv_net(batch=4), tmp_path / "fixed.onnx")
    sess = ort.InferenceSession(str(fixed), providers=["CPUExecutionProvider"])
    with pytest.raises(BnexportError, match="fixed batch of 4, not --batch-size 1"):
        model_inputs(sess, 1, str(fixed))
    assert model_inputs(sess, 4, str(fixed))[0].shape == (1, 8, 8)
    model = conv_net()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "h"
    sym = tmp_path / "sym.onnx"
    sym.write_bytes(model.SerializeToString())
    sess = ort.InferenceSession(str(sym), providers=["CPUExecutionProvider"])
    with pytest.raises(BnexportError, match="symbolic dimensions besides the batch"):
        model_inputs(sess, 1, str(sym))


def test_external_data_must_stay_beside_its_model(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    path = src / "ext.onnx"
    onnx.save_model(
        conv_net(channels=16, size=16),
        str(path),
        save_as_external_data=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    other = tmp_path / "elsewhere"
    other.mkdir()
    with pytest.raises(BnexportError, match="external data"):
        tune_model(path, other / "t.onnx", TuneConfig(**TINY))
    report = tune_model(path, src / "t.onnx", TuneConfig(**TINY))  # beside it: fine
    assert report.output == str(src / "t.onnx")
    assert sorted(p.name for p in src.iterdir()) == sorted(["ext.onnx", "ext.onnx.data", "t.onnx"])


def test_bad_ort_config_json_is_refused(tmp_path: Path) -> None:
    path = save(with_metadata(conv_net(), {ORT_CONFIG_KEY: "{not json"}), tmp_path / "bad.onnx")
    with pytest.raises(BnexportError, match="not JSON"):
        tune_model(path, tmp_path / "t.onnx", TuneConfig(**TINY))
    assert not (tmp_path / "t.onnx").exists()


def test_the_input_is_never_the_output(tmp_path: Path) -> None:
    path = save(conv_net(), tmp_path / "m.onnx")
    with pytest.raises(OutputPathError, match=r"is the input .*destroy the input"):
        tune_model(path, path, TuneConfig(**TINY))
    with pytest.raises(OutputPathError, match="is a directory"):
        tune_model(path, tmp_path, TuneConfig(**TINY))


def test_check_outputs_passes_the_same_model_and_fails_a_changed_one(tmp_path: Path) -> None:
    import onnxruntime as ort

    path = save(conv_net(), tmp_path / "m.onnx")
    config = TuneConfig(batch_size=2)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = model_inputs(ref, 2, str(path))
    tuned = save(
        with_ort_config(conv_net(), OrtSettings(graph_optimization_level="basic")),
        tmp_path / "t.onnx",
    )
    ok = check_outputs(tuned, path, ref, inputs, config)
    assert ok.passed and ok.samples == 16 and ok.error <= ok.limit
    wrong = save(with_ort_config(conv_net(seed=1), OrtSettings()), tmp_path / "w.onnx")
    bad = check_outputs(wrong, path, ref, inputs, config)
    assert not bad.passed and bad.error > bad.limit > 0


def test_tune_writes_a_copy_whose_graph_bytes_are_unchanged(tmp_path: Path) -> None:
    path = save(conv_net(), tmp_path / "m.onnx")
    out = tmp_path / "t.onnx"
    report = tune_model(path, out, TuneConfig(batch_size=2, **TINY))
    assert report.passed and report.output == str(out)
    src, dst = onnx.load(str(path)), onnx.load(str(out))
    assert dst.graph.SerializeToString() == src.graph.SerializeToString()
    for m in (src, dst):
        del m.metadata_props[:]
    assert dst.SerializeToString() == src.SerializeToString()
    assert model_settings(out) == report.decision.settings
    # every confirmed file was read back from its session: each written key took effect
    assert all(r.effective == r.settings for r in report.confirm)
