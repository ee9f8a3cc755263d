"""`bnexport.ort`: the one session factory. A model's external data is read beside the model, from
any working directory, and never from outside the model's folder; onnxruntime's defaults are
reproduced exactly; the settings a file carries are applied only when asked."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from tiny_onnx import conv_net, save

from bnexport.cuda_diagnosis import ProbeResult
from bnexport.errors import BnexportError, OnnxFileError
from bnexport.onnx_file import external_data_files
from bnexport.ort import DEFAULT_LOG_SEVERITY, ORT_DEFAULTS, SessionConfig, make_session
from bnexport.ort_config import (
    LOAD_CONFIG_ENV,
    ORT_CONFIG_KEY,
    SESSION_CONFIG_KEY,
    OrtSettings,
    effective_settings,
    model_settings,
    read_session_config,
    with_metadata,
)


def save_external(model: onnx.ModelProto, path: Path, location: str | None = None) -> Path:
    """Save with every tensor in ``<name>.data`` beside the model (torch's big-model layout),
    then, if given, point the tensors' ``location`` elsewhere (the .onnx file alone changes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = f"{path.name}.data"
    onnx.save(model, path, save_as_external_data=True, location=data, size_threshold=0)
    if location is not None:
        proto = onnx.load(path, load_external_data=False)
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        path.write_bytes(proto.SerializeToString())
    return path


def test_external_data_is_found_beside_the_model_from_another_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = conv_net()
    path = save_external(model, tmp_path / "models" / "m.onnx")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert external_data_files(path) == (path.parent / "m.onnx.data",)
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    got = make_session(path).run(None, {"x": x})[0]
    want = make_session(conv_net().SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_external_data_outside_the_models_folder_is_refused(where: str, tmp_path: Path) -> None:
    outside = tmp_path / "secret.data"
    outside.write_bytes(b"\0" * 4096)
    location = str(outside) if where == "absolute" else "../secret.data"
    path = save_external(conv_net(), tmp_path / "models" / "m.onnx", location)
    with pytest.raises(OnnxFileError, match="outside the model's folder") as info:
        make_session(path)
    assert repr(location) in str(info.value) and "'w'" in str(info.value)


def test_a_missing_external_data_file_is_named(tmp_path: Path) -> None:
    path = save_external(conv_net(), tmp_path / "m.onnx")
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(OnnxFileError, match=r"m\.onnx\.data, which is missing"):
        make_session(path)


def test_bytes_of_a_model_with_external_data_are_refused(tmp_path: Path) -> None:
    path = save_external(conv_net(), tmp_path / "m.onnx")
    with pytest.raises(OnnxFileError, match="pass the model's path"):
        make_session(path.read_bytes())


def test_a_cuda_session_that_runs_on_the_cpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe says CUDA runs, yet the session onnxruntime builds runs on the CPU (here: the
    CPU-only package, which warns and falls back): `make_session` refuses it rather than let a
    CUDA check pass on the CPU."""
    import onnxruntime

    import bnexport.ort as bort
    from bnexport.errors import ProviderUnavailableError

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has a CUDA provider here: a CUDA session would not fall back")
    probe = ProbeResult(True, "patched: CUDA runs")
    monkeypatch.setattr(bort, "probe_cuda", lambda *args, **kwargs: probe)
    data = conv_net().SerializeToString()
    with (
        pytest.warns(UserWarning, match="CUDAExecutionProvider"),  # onnxruntime's own warning
        pytest.raises(ProviderUnavailableError, match="runs on CPUExecutionProvider"),
    ):
        make_session(data, SessionConfig(provider="cuda"))


# --------------------------------------------------------------------------------------------
# Session options: onnxruntime's defaults, config entries


def _options(session: object) -> dict[str, str]:
    """The public attributes of a session's ``SessionOptions``, as strings."""
    so = session.get_session_options()  # type: ignore[attr-defined]
    names = [n for n in dir(so) if not n.startswith("_") and not callable(getattr(so, n))]
    return {n: str(getattr(so, n)) for n in names}


@pytest.mark.parametrize(
    "settings",
    [
        OrtSettings(),
        OrtSettings(intra_op_num_threads=1, graph_optimization_level="extended"),
        OrtSettings(execution_mode="parallel", inter_op_num_threads=2),
    ],
)
def test_ort_defaults_reproduce_onnxruntimes_own_options(
    settings: OrtSettings, tmp_path: Path
) -> None:
    """`ORT_DEFAULTS` plus carried keys is ``SessionOptions()`` plus those keys (what onnxruntime
    builds from an ``ort_config``), the log level aside; no spinning entry is added."""
    import onnxruntime as ort

    path = save(conv_net(), tmp_path / "m.onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads = settings.intra_op_num_threads
    so.inter_op_num_threads = settings.inter_op_num_threads
    so.execution_mode = getattr(
        ort.ExecutionMode,
        {"sequential": "ORT_SEQUENTIAL", "parallel": "ORT_PARALLEL"}[settings.execution_mode],
    )
    so.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[settings.graph_optimization_level]
    plain = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ours = make_session(path, ORT_DEFAULTS.carrying(settings))
    want, got = _options(plain), _options(ours)
    assert {k: v for k, v in got.items() if want[k] != v} == {
        "log_severity_level": str(DEFAULT_LOG_SEVERITY)
    }
    spinning = "session.intra_op.allow_spinning"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        ours.get_session_options().get_session_config_entry(spinning)  # onnxruntime's default
    assert make_session(path).get_session_options().get_session_config_entry(spinning) == "1"


def test_session_config_entries_are_applied(tmp_path: Path) -> None:
    path = save(conv_net(), tmp_path / "m.onnx")
    config = SessionConfig(session_config_entries={"session.disable_prepacking": "1"})
    so = make_session(path, config).get_session_options()
    assert so.get_session_config_entry("session.disable_prepacking") == "1"
    assert config.to_dict()["session_config_entries"] == {"session.disable_prepacking": "1"}


# --------------------------------------------------------------------------------------------
# The settings a file carries: ignored, applied over bnexport's options, or opted in


def test_file_settings_apply_over_bnexports_options_only_when_asked(tmp_path: Path) -> None:
    from bnexport.tune import with_ort_config

    settings = OrtSettings(intra_op_num_threads=1, graph_optimization_level="basic")
    path = save(with_ort_config(conv_net(), settings), tmp_path / "t.onnx")
    assert model_settings(path) == settings
    assert effective_settings(make_session(path)) == OrtSettings()  # not asked: ignored
    asked = make_session(path, SessionConfig(intra_op_num_threads=2), file_settings="apply")
    assert effective_settings(asked) == settings
    asked_bytes = make_session(path.read_bytes(), file_settings="apply")
    assert effective_settings(asked_bytes) == settings
    plain = save(conv_net(), tmp_path / "plain.onnx")
    assert effective_settings(make_session(plain, file_settings="apply")) == OrtSettings()
    with pytest.raises(BnexportError, match="file_settings 'yes'"):
        make_session(plain, file_settings="yes")  # type: ignore[arg-type]


def test_opt_in_is_onnxruntimes_own_and_ignore_holds_with_the_variable_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``opt_in``: onnxruntime's defaults plus the file's keys, bnexport's options dropped (the
    variable restored afterwards). ``ignore`` never reads the file, even with the variable set."""
    from bnexport.tune import with_ort_config

    settings = OrtSettings(intra_op_num_threads=1, graph_optimization_level="extended")
    path = save(with_ort_config(conv_net(), settings), tmp_path / "t.onnx")
    mine = SessionConfig(graph_optimization_level="disabled", enable_mem_arena=False)
    opted = make_session(path, mine, file_settings="opt_in")
    assert effective_settings(opted) == settings
    assert opted.get_session_options().enable_cpu_mem_arena  # onnxruntime's default, not mine
    assert LOAD_CONFIG_ENV not in os.environ
    monkeypatch.setenv(LOAD_CONFIG_ENV, "1")
    ignored = make_session(path, replace(ORT_DEFAULTS, intra_op_num_threads=2))
    assert effective_settings(ignored) == OrtSettings(intra_op_num_threads=2)
    assert os.environ[LOAD_CONFIG_ENV] == "1"  # the caller's environment is left as it was


def test_a_bad_ort_config_is_refused_when_applied(tmp_path: Path) -> None:
    bad = {ORT_CONFIG_KEY: json.dumps({"session_options": {"execution_mode": 7}})}
    path = save(with_metadata(conv_net(), bad), tmp_path / "bad.onnx")
    with pytest.raises(BnexportError, match="execution_mode 7 must be 0 or 1"):
        make_session(path, file_settings="apply")


def test_session_config_entries_travel_in_bnexports_metadata_and_apply_only_when_asked(
    tmp_path: Path,
) -> None:
    """``bnexport_session_config``: read back as written, set on the session by ``apply`` (over
    bnexport's own entries), never by ``ignore`` nor by onnxruntime's ``opt_in``."""
    from bnexport.tune import with_ort_config

    off = {"session.disable_prepacking": "1"}
    settings = OrtSettings(intra_op_num_threads=1, session_config_entries=off)  # type: ignore[arg-type]
    path = save(with_ort_config(conv_net(), settings), tmp_path / "t.onnx")
    assert model_settings(path) == settings and settings.label() == "threads=1, prepacking=off"
    proto = onnx.load(str(path))
    assert read_session_config(proto, "t") == off
    assert [p.key for p in proto.metadata_props].count(SESSION_CONFIG_KEY) == 1

    def entry(file_settings: str) -> str:
        so = make_session(path, file_settings=file_settings).get_session_options()  # type: ignore[arg-type]
        return so.get_session_config_entry("session.disable_prepacking")

    assert entry("apply") == "1"
    with pytest.raises(Exception, match="disable_prepacking"):
        entry("ignore")  # unset: onnxruntime has no such entry
    with pytest.raises(Exception, match="disable_prepacking"):
        entry("opt_in")
    untuned = with_ort_config(proto, OrtSettings())  # re-tuned to the defaults: the entry goes
    assert SESSION_CONFIG_KEY not in {p.key for p in untuned.metadata_props}


def test_a_bad_session_config_entry_is_refused(tmp_path: Path) -> None:
    for value, message in (
        ('{"intra_op_num_threads": "1"}', "not an onnxruntime session config entry"),
        ('{"session.disable_prepacking": 1}', "must be a string"),
        ("[1]", "not a JSON object"),
    ):
        bad = save(with_metadata(conv_net(), {SESSION_CONFIG_KEY: value}), tmp_path / "b.onnx")
        with pytest.raises(BnexportError, match=message):
            make_session(bad, file_settings="apply")
