"""bnexport.tune and bnexport.ort_config: the pick, the carried keys, the metadata, the refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from tiny_onnx import conv_net, save

from bnexport.bench import Ratio, paired_ratio
from bnexport.errors import BnexportError
from bnexport.ort import SessionConfig, make_session
from bnexport.ort_config import (
    CARRIED_KEYS,
    LOAD_CONFIG_ENV,
    ORT_CONFIG_KEY,
    OrtSettings,
    check_carriable,
    effective_settings,
    model_settings,
    open_with_model_config,
    read_ort_config,
    with_metadata,
)
from bnexport.tune import (
    TUNE_RECORD_KEY,
    CandidateResult,
    TuneConfig,
    busy_warnings,
    candidate_settings,
    check_outputs,
    fixed_settings,
    model_inputs,
    noise_band,
    pick,
    plan_repeats,
    thread_counts,
    tune_model,
    with_ort_config,
)

TINY = {
    "budget_s": 2.0,
    "screen_repeats": 3,
    "confirm_repeats": 3,
    "finalists": 2,
    "min_time_s": 0.001,
    "warmup_s": 0.002,
    "cooldown_s": 0.0,
}


def _result(settings: OrtSettings, median: float, p10: float, p90: float) -> CandidateResult:
    return CandidateResult(settings, "confirm", Ratio(median, p10, p90), 1e-3)


THREADS1 = OrtSettings(intra_op_num_threads=1)
EXTENDED = OrtSettings(graph_optimization_level="extended")
CONTROL = Ratio(1.0, 0.97, 1.03)


# --------------------------------------------------------------------------------------------
# The pick (synthetic timings)


def test_pick_from_synthetic_paired_timings() -> None:
    """Times per round as `bench` records them: the reference drifts, the ratio is paired."""
    drift = np.array([1.0, 1.3, 0.9, 1.6, 1.1, 1.0, 1.2])  # the machine's slow and fast rounds
    reference = list(1e-3 * drift)
    control = paired_ratio(reference, list(1e-3 * drift * [1.01, 0.99, 1.0, 1.02, 0.98, 1, 1]))
    fast = paired_ratio(reference, list(1e-3 / 1.25 * drift))  # 1.25× faster in every round
    slow = paired_ratio(reference, list(1e-3 / 0.8 * drift))
    result = pick(
        [_result(EXTENDED, *slow.__dict__.values()), _result(THREADS1, *fast.__dict__.values())],
        control,
    )
    assert result.settings == THREADS1 and result.faster
    assert result.ratio is not None and result.ratio.median == pytest.approx(1.25)


def test_pick_takes_the_fastest_qualified() -> None:
    finalists = [_result(EXTENDED, 1.10, 1.05, 1.20), _result(THREADS1, 1.30, 1.10, 1.50)]
    assert pick(finalists, CONTROL).settings == THREADS1


def test_pick_keeps_defaults_when_the_gain_is_inside_the_noise() -> None:
    decision = pick([_result(THREADS1, 1.02, 0.99, 1.05)], CONTROL)
    assert decision.settings == OrtSettings() and not decision.faster
    assert decision.ratio is None and "inside or below the noise band" in decision.reason


def test_pick_refuses_a_fast_median_with_a_slow_tail() -> None:
    """1.3× on the median but its p10 (0.8) is below the control's: slower beyond noise."""
    decision = pick([_result(THREADS1, 1.30, 0.80, 1.60)], CONTROL)
    assert decision.settings == OrtSettings() and "p10 is below the control's" in decision.reason


def test_pick_the_noise_band_comes_from_the_control() -> None:
    noisy = Ratio(1.0, 0.7, 1.4)
    assert noise_band(noisy) == (0.7, 1.4)
    assert pick([_result(THREADS1, 1.3, 1.1, 1.5)], noisy).settings == OrtSettings()
    assert noise_band(Ratio(1.0, 0.999, 1.001)) == (0.99, 1.01)  # never narrower than ±1 %


def test_pick_tie_goes_to_the_earlier_finalist() -> None:
    finalists = [_result(EXTENDED, 1.2, 1.1, 1.3), _result(THREADS1, 1.2, 1.1, 1.3)]
    assert pick(finalists, CONTROL).settings == EXTENDED


def test_pick_uses_the_fixed_defaults() -> None:
    pinned = OrtSettings(intra_op_num_threads=1)
    assert pick([], CONTROL, pinned).settings == pinned


# --------------------------------------------------------------------------------------------
# Candidates and budget


def test_a_busy_machine_is_reported() -> None:
    assert busy_warnings([0.1, 0.2, 0.3], [0.4, 0.3, 0.3], 2) == []
    (warning,) = busy_warnings([0.2, 0.2, 0.2], [1.6, 1.0, 0.5], 2)
    assert "load average 1.60 on 2 CPUs" in warning and "idle machine" in warning
    assert busy_warnings(None, None, 2) == []


def test_thread_counts() -> None:
    assert thread_counts(1) == (0, 1)
    assert thread_counts(2) == (0, 1, 2)
    assert thread_counts(6) == (0, 1, 2, 4, 6)


def test_candidates_start_with_defaults_and_cover_threads_levels_and_parallel() -> None:
    cands = candidate_settings(2)
    assert cands[0] == OrtSettings()
    assert len(cands) == len(set(cands)) == 3 * 3 + 1
    assert OrtSettings(intra_op_num_threads=1, graph_optimization_level="extended") in cands
    assert OrtSettings(execution_mode="parallel") in cands
    assert OrtSettings(execution_mode="parallel") not in candidate_settings(2, provider="cuda")


def test_candidates_keep_fixed_keys() -> None:
    cands = candidate_settings(4, {"intra_op_num_threads": "1"})
    assert {c.intra_op_num_threads for c in cands} == {1}
    assert cands[0] == OrtSettings(intra_op_num_threads=1)
    assert {c.graph_optimization_level for c in cands} == {"all", "extended", "basic"}


def test_fixed_settings_parse_names_and_codes() -> None:
    got = fixed_settings({"graph_optimization_level": "2", "execution_mode": "sequential"})
    assert got == {"graph_optimization_level": "extended", "execution_mode": "sequential"}
    with pytest.raises(BnexportError, match="choose one of"):
        fixed_settings({"graph_optimization_level": "fast"})
    with pytest.raises(BnexportError, match="integer >= 0"):
        fixed_settings({"intra_op_num_threads": "-1"})


def test_plan_fits_the_budget_and_keeps_minimums() -> None:
    config = TuneConfig(budget_s=10.0, min_time_s=0.02, cooldown_s=0.05, warmup_s=0.1)
    plan = plan_repeats(1e-4, 11, 5, config)
    assert plan["estimated_s"] <= 10.0 and not plan["over_budget"]
    assert 3 <= plan["screen_repeats"] <= config.screen_repeats
    tight = plan_repeats(1.0, 11, 5, TuneConfig(budget_s=1.0))
    assert (tight["screen_repeats"], tight["confirm_repeats"]) == (3, 7) and tight["over_budget"]
    roomy = plan_repeats(1e-5, 3, 3, TuneConfig(budget_s=1000.0))
    assert (roomy["screen_repeats"], roomy["confirm_repeats"]) == (9, 31)


# --------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("session.disable_prepacking", 'add_session_config_entry("session.disable_prepacking"'),
        ("enable_mem_arena", "enable_cpu_mem_arena"),
        ("allow_spinning", "session.intra_op.allow_spinning"),
        ("cuda.use_tf32", 'CUDAExecutionProvider", {"use_tf32": VALUE}'),
    ],
)
def test_settings_the_file_cannot_carry_are_refused_with_the_by_hand_way(
    key: str, hint: str
) -> None:
    with pytest.raises(BnexportError) as info:
        TuneConfig(fixed={key: "1"})
    message = str(info.value)
    assert f"does not read {key!r}" in message and hint in message
    assert "inference_session_utils.cc" in message and LOAD_CONFIG_ENV in message


def test_carried_keys_are_accepted() -> None:
    for key in CARRIED_KEYS:
        assert check_carriable(key) == key
    with pytest.raises(BnexportError, match="diagnostic"):
        check_carriable("enable_profiling")


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
    with pytest.raises(BnexportError, match="is the input file"):
        tune_model(path, path, TuneConfig(**TINY))


# --------------------------------------------------------------------------------------------
# Metadata written and read back; onnxruntime honours it


def test_ort_config_round_trips_and_keeps_other_keys() -> None:
    base = with_metadata(conv_net(), {ORT_CONFIG_KEY: json.dumps({"note": "mine"})})
    settings = OrtSettings(intra_op_num_threads=1, graph_optimization_level="extended")
    tuned = with_ort_config(base, settings, {"batch_size": 7})
    config = read_ort_config(tuned, "tuned")
    assert config == {
        "note": "mine",
        "session_options": {
            "intra_op_num_threads": 1,
            "inter_op_num_threads": 0,
            "execution_mode": 0,
            "graph_optimization_level": 2,
        },
    }
    props = {p.key: p.value for p in tuned.metadata_props}
    assert json.loads(props[TUNE_RECORD_KEY]) == {"batch_size": 7}
    assert props["source"] == "tests/tiny_onnx.py"  # the input's own metadata stays


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_onnxruntime_applies_the_thread_keys_with_the_env_var(tmp_path: Path) -> None:
    """intra_op_num_threads=3 makes a pool of 3 (2 new threads); parallel mode with
    inter_op_num_threads=3 adds an inter-op pool (2 more). Without the opt-in: the defaults."""
    import onnxruntime as ort

    settings = OrtSettings(
        intra_op_num_threads=3, inter_op_num_threads=3, execution_mode="parallel"
    )
    path = save(with_ort_config(conv_net(), settings), tmp_path / "t.onnx")
    one = save(
        with_ort_config(conv_net(), OrtSettings(intra_op_num_threads=1)), tmp_path / "one.onnx"
    )
    before = _threads()
    sess = open_with_model_config(path)
    assert _threads() - before == 4
    assert effective_settings(sess) == settings
    before = _threads()
    sess1 = open_with_model_config(one)
    assert _threads() - before == 0  # one thread: the caller's, no pool threads
    assert LOAD_CONFIG_ENV not in os.environ  # restored
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert effective_settings(plain) == OrtSettings()  # no opt-in: ort_config is not read
    del sess, sess1, plain


def _profiled_ops(path: Path, level: int, cwd: Path) -> set[str]:
    """Op types onnxruntime ran for a file whose ort_config sets ``level`` (and profiling)."""
    model = with_metadata(
        onnx.load(str(path)),
        {
            ORT_CONFIG_KEY: json.dumps(
                {"session_options": {"graph_optimization_level": level, "enable_profiling": 1}}
            )
        },
    )
    copy = save(model, cwd / f"level{level}.onnx")
    sess = open_with_model_config(copy)
    sess.run(None, {"x": np.zeros((2, 1, 8, 8), np.float32)})
    events = json.loads(Path(sess.end_profiling()).read_text())
    return {
        e["args"]["op_name"]
        for e in events
        if e.get("cat") == "Node" and "op_name" in e.get("args", {})
    }


def test_onnxruntime_applies_the_graph_level_with_the_env_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Observable in the ops that run: disabled keeps Relu; extended fuses it into the Conv;
    all also rewrites the Conv to NCHWc (a ReorderOutput appears)."""
    monkeypatch.chdir(tmp_path)  # the profile file lands in the working directory
    path = save(conv_net(), tmp_path / "m.onnx")
    disabled = _profiled_ops(path, 0, tmp_path)
    extended = _profiled_ops(path, 2, tmp_path)
    full = _profiled_ops(path, 99, tmp_path)
    assert "Relu" in disabled and "ReorderOutput" not in disabled
    assert "Relu" not in extended and "ReorderOutput" not in extended
    assert "Relu" not in full and "ReorderOutput" in full


def test_make_session_honours_ort_config_when_asked(tmp_path: Path) -> None:
    settings = OrtSettings(intra_op_num_threads=1, graph_optimization_level="basic")
    path = save(with_ort_config(conv_net(), settings), tmp_path / "t.onnx")
    assert model_settings(path) == settings
    assert effective_settings(make_session(path)) == OrtSettings()  # not asked: ignored
    asked = make_session(path, SessionConfig(intra_op_num_threads=2), model_config=True)
    assert effective_settings(asked) == settings
    asked_bytes = make_session(path.read_bytes(), model_config=True)
    assert effective_settings(asked_bytes) == settings
    plain = save(conv_net(), tmp_path / "plain.onnx")
    assert effective_settings(make_session(plain, model_config=True)) == OrtSettings()


# --------------------------------------------------------------------------------------------
# Parity and the whole run


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
