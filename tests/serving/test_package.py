"""`bnexport package`: golden configs for the Net and a two-input dict-output model, Triton's
schema and load rules, a fixed first dimension, tuned settings, external data, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tiny_onnx import conv_net, save
from typer.testing import CliRunner

from bnexport.cli.app import app
from bnexport.ort_config import OrtSettings, with_metadata
from bnexport.serving.errors import RepositoryError
from bnexport.serving.graph_io import read_graph_io
from bnexport.serving.triton_config import model_config_pb2, parse_config, validate_config
from bnexport.tune import with_ort_config

runner = CliRunner()
GOLDEN = Path(__file__).parent / "golden"
GOLDEN = Path(__file__).parent / "golden"
FILES = ("config.pbtxt", "configs/gpu.pbtxt", "model-settings.json")


def package(model: Path, repo: Path, *extra: str) -> object:
    return runner.invoke(app, ["package", str(model), "--repository", str(repo), *extra])


@pytest.mark.parametrize(("fixture", "name"), [("net_onnx", "net"), ("pair_onnx", "pair")])
def test_golden_configs(fixture: str, name: str, tmp_path: Path, request: pytest.FixtureRequest):
    model = request.getfixturevalue(fixture)
    result = package(model, tmp_path, "--name", name)
    assert result.exit_code == 0, result.output
    folder = tmp_path / name
    for relative in FILES:
        assert (folder / relative).read_text() == (GOLDEN / name / relative).read_text(), relative
    assert (folder / "1" / "model.onnx").read_bytes() == model.read_bytes()
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "1/model.onnx",
        *sorted(FILES),
    ]


def test_configs_parse_with_triton_schema(net_onnx: Path, tmp_path: Path) -> None:
    assert package(net_onnx, tmp_path, "--name", "net").exit_code == 0
    io = read_graph_io(onnx.load(str(net_onnx)), "net")
    for relative in FILES[:2]:
        config = text_format.Parse(
            (tmp_path / "net" / relative).read_text(), model_config_pb2().ModelConfig()
        )
        validate_config(config, "net", io, relative)
        assert config.max_batch_size == 64
        assert list(config.input[0].dims) == [1, 28, 28]  # the batch dimension is implicit
    settings = json.loads((tmp_path / "net" / "model-settings.json").read_text())
    assert settings["implementation"] == "bnexport.serving.runtime.OnnxModel"
    assert (settings["max_batch_size"], settings["max_batch_time"]) == (64, 0.002)


def test_fixed_first_dimension_gets_max_batch_size_zero(tmp_path: Path) -> None:
    model = save(conv_net(batch=1), tmp_path / "fixed.onnx")
    result = package(model, tmp_path / "repo")
    assert result.exit_code == 0, result.output
    assert "max_batch_size 0" in result.output and "x [1,1,8,8]" in result.output
    config = parse_config((tmp_path / "repo" / "fixed" / "config.pbtxt").read_text(), "fixed")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [1, 1, 8, 8]  # the whole shape, batch included
    settings = json.loads((tmp_path / "repo" / "fixed" / "model-settings.json").read_text())
    assert "max_batch_size" not in settings


def test_tuned_settings_map_to_backend_parameters(tmp_path: Path) -> None:
    tuned = OrtSettings(
        intra_op_num_threads=1, execution_mode="parallel", graph_optimization_level="extended"
    )
    entry = json.dumps({"session_options": tuned.session_options_json()})
    model = save(with_metadata(conv_net(), {"ort_config": entry}), tmp_path / "tuned.onnx")
    assert package(model, tmp_path / "repo").exit_code == 0
    config = parse_config((tmp_path / "repo" / "tuned" / "config.pbtxt").read_text(), "tuned")
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params == {
        "intra_op_thread_count": "1",
        "inter_op_thread_count": "0",
        "execution_mode": "1",
    }
    assert config.optimization.graph.level == 1  # Triton's numbering: 1 is extended


def test_session_config_entries_map_where_triton_takes_them(tmp_path: Path) -> None:
    entries = {
        "session.disable_prepacking": "1",
        "session.use_device_allocator_for_initializers": "1",
    }
    tuned = OrtSettings(intra_op_num_threads=1, session_config_entries=entries)  # type: ignore[arg-type]
    model = save(with_ort_config(conv_net(), tuned), tmp_path / "tuned.onnx")
    result = package(model, tmp_path / "repo")
    assert result.exit_code == 0, result.output
    config = parse_config((tmp_path / "repo" / "tuned" / "config.pbtxt").read_text(), "tuned")
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["session.use_device_allocator_for_initializers"] == "1"
    assert "session.disable_prepacking" not in params  # the backend has no such parameter
    text = " ".join(result.output.split())
    assert "tuned: threads=1, prepacking=off, session.use_device_allocator" in text
    assert "no parameter for session.disable_prepacking=1: bnexport serve applies it" in text


def test_external_data_lands_beside_the_model(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(
        conv_net(),
        str(src / "ext.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    assert package(src / "ext.onnx", tmp_path / "repo").exit_code == 0
    version = tmp_path / "repo" / "ext" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["ext.onnx.data", "model.onnx"]


def test_existing_folder_refused_without_force(net_onnx: Path, tmp_path: Path) -> None:
    assert package(net_onnx, tmp_path, "--name", "net").exit_code == 0
    before = (tmp_path / "net" / "config.pbtxt").read_text()
    result = package(net_onnx, tmp_path, "--name", "net", "--max-batch-size", "8")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"bnexport: error: model folder {tmp_path / 'net'} exists; pass --force to replace it, "
        "or --name another"
    ]
    assert (tmp_path / "net" / "config.pbtxt").read_text() == before
    result = package(net_onnx, tmp_path, "--name", "net", "--max-batch-size", "8", "--force")
    assert result.exit_code == 0 and "replaced" in result.output
    assert "max_batch_size: 8" in (tmp_path / "net" / "config.pbtxt").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["net"]  # no staging folder left behind


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "a/b"], "model name 'a/b'"),
        (["--name", "-x"], "model name '-x'"),
    ],
)
def test_bad_names_refused(net_onnx: Path, tmp_path: Path, args: list[str], message: str):
    result = package(net_onnx, tmp_path / "repo", *args)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "repo").exists()


def test_missing_model_refused(tmp_path: Path) -> None:
    result = package(tmp_path / "none.onnx", tmp_path / "repo")
    assert result.exit_code == 2 and "not found" in result.output
    assert not (tmp_path / "repo").exists()


def test_load_rules_catch_what_triton_refuses(net_onnx: Path, tmp_path: Path) -> None:
    assert package(net_onnx, tmp_path, "--name", "net").exit_code == 0
    io = read_graph_io(onnx.load(str(net_onnx)), "net")
    text = (tmp_path / "net" / "config.pbtxt").read_text()
    cases = {
        "differs from its folder": text.replace('name: "net"', 'name: "other"'),
        "preferred size 128 outside 1..64": text.replace(
            "preferred_batch_size: 64", "preferred_batch_size: 128"
        ),
        "dims [1, 28, 27]": text.replace("dims: 28\n}", "dims: 27\n}", 1),
        "is TYPE_FP64": text.replace("TYPE_FP32", "TYPE_FP64", 1),
        "'logits' is missing": text.replace('name: "logits"', 'name: "probs"'),
    }
    for message, bad in cases.items():
        with pytest.raises(RepositoryError, match="Triton would refuse it") as info:
            validate_config(parse_config(bad, "x"), "net", io, "net/config.pbtxt")
        assert message in str(info.value)
    with pytest.raises(RepositoryError, match="Triton's schema refuses it"):
        parse_config(text.replace("max_batch_size", "max_batch"), "net/config.pbtxt")
    fixed = read_graph_io(conv_net(batch=1), "fixed")
    config = text_format.Parse(
        'name: "fixed" platform: "onnxruntime_onnx" max_batch_size: 4 '
        'input { name: "x" data_type: TYPE_FP32 dims: [1, 8, 8] } '
        'output { name: "logits" data_type: TYPE_FP32 dims: [3] } instance_group { count: 1 }',
        model_config_pb2().ModelConfig(),
    )
    with pytest.raises(RepositoryError, match="fixed first dimension"):
        validate_config(config, "fixed", fixed, "fixed/config.pbtxt")
