"""`bnexport.ort`: a model's external data is read beside the model, from any working directory,
and never from outside the model's folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from tiny_onnx import conv_net

from bnexport.errors import ExportError
from bnexport.ort import external_data_files, make_session


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
    with pytest.raises(ExportError, match="outside the model's folder") as info:
        make_session(path)
    assert repr(location) in str(info.value) and "'w'" in str(info.value)


def test_a_missing_external_data_file_is_named(tmp_path: Path) -> None:
    path = save_external(conv_net(), tmp_path / "m.onnx")
    (tmp_path / "m.onnx.data").unlink()
    with pytest.raises(ExportError, match=r"m\.onnx\.data, which is missing"):
        make_session(path)


def test_bytes_of_a_model_with_external_data_are_refused(tmp_path: Path) -> None:
    path = save_external(conv_net(), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="pass the model's path"):
        make_session(path.read_bytes())


def test_a_cuda_session_that_runs_on_the_cpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe says CUDA runs, yet the session onnxruntime builds runs on the CPU (here: the
    CPU-only package, which warns and falls back): `make_session` refuses it rather than let a
    CUDA check pass on the CPU."""
    import onnxruntime

    import bnexport.ort as bort
    from bnexport.errors import ProviderUnavailableError
    from bnexport.ort import SessionConfig

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has a CUDA provider here: a CUDA session would not fall back")
    probe = bort.ProbeResult(True, "patched: CUDA runs")
    monkeypatch.setattr(bort, "probe_cuda", lambda *args, **kwargs: probe)
    data = conv_net().SerializeToString()
    with (
        pytest.warns(UserWarning, match="CUDAExecutionProvider"),  # onnxruntime's own warning
        pytest.raises(ProviderUnavailableError, match="runs on CPUExecutionProvider"),
    ):
        make_session(data, SessionConfig(provider="cuda"))
