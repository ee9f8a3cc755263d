"""`bnexport.tune.carry` and the carried keys: what a tuned file holds, what it cannot hold, and
onnxruntime honouring it when a deployer opts in (`bnexport.ort.make_session(file_settings=
"opt_in")`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from tiny_onnx import conv_net, save

from bnexport.errors import BnexportError
from bnexport.ort import make_session
from bnexport.ort_config import (
    CARRIED_KEYS,
    LOAD_CONFIG_ENV,
    ORT_CONFIG_KEY,
    OrtSettings,
    check_carriable,
    effective_settings,
    read_ort_config,
    with_metadata,
)
from bnexport.tune import TUNE_RECORD_KEY, TuneConfig, with_ort_config


@pytest.mark.parametrize(
    ("key", "hint"),
    [
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
    for key in (*CARRIED_KEYS, "session.disable_prepacking"):  # an entry: bnexport_session_config
        assert check_carriable(key) == key
    with pytest.raises(BnexportError, match="diagnostic"):
        check_carriable("enable_profiling")


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
    sess = make_session(path, file_settings="opt_in")
    assert _threads() - before == 4
    assert effective_settings(sess) == settings
    before = _threads()
    sess1 = make_session(one, file_settings="opt_in")
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
    sess = make_session(copy, file_settings="opt_in")
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
