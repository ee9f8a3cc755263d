"""Model sources: the seed Net from a checkpoint, or any model from `package.module:factory`."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bnexport.checkpoint import save_checkpoint
from bnexport.data import Normalize
from bnexport.errors import ModelSpecError
from bnexport.nets import Net
from bnexport.source import (
    InputSpec,
    load_source,
    parse_input_shape,
    parse_input_spec,
    resolve_model,
)

USER_MODULE = textwrap.dedent(
    """
    import torch.nn as nn

    def build():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    instance = build()


    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, image, ids, scale=None):
            return self.conv(image).mean((2, 3)) + self.embed(ids).mean(1)


    def unseeded():
        return nn.Linear(4, 2)

    def broken():
        raise RuntimeError("no weights here")

    def not_a_model():
        return 42
    """
)


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "user_models_for_test.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("text", "shape"), [("1,28,28", (1, 28, 28)), (" 3, 32 ,32 ", (3, 32, 32)), ("16", (16,))]
)
def test_parse_input_shape(text: str, shape: tuple[int, ...]) -> None:
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["3x64x64", "3X64X64", "4x4:bf16"])
def test_parse_input_shape_refuses_x_and_says_how_to_write_it(text: str) -> None:
    with pytest.raises(ModelSpecError, match=r"comma-separated.*--input-shape \d,\d+"):
        parse_input_spec(text)


@pytest.mark.parametrize("text", ["", "a,b", "3,0,4", "-1,2"])
def test_parse_input_shape_rejects(text: str) -> None:
    with pytest.raises(ModelSpecError, match="input-shape"):
        parse_input_shape(text)


def test_net_source_from_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "net.pt"
    save_checkpoint(path, Net(temperature=1.5), normalize=Normalize(0.3, 0.4))
    src = load_source(path)
    assert src.is_net and src.temperature == 1.5 and src.normalize == Normalize(0.3, 0.4)
    assert src.input_shape == (1, 28, 28)
    assert tuple(src.example_input.shape) == (2, 1, 28, 28)
    assert src.input_names == ("input",) and src.output_names == ("logits",)  # the seed's names
    with pytest.raises(ModelSpecError, match="does not fit the seed Net"):
        load_source(path, input_specs=[InputSpec((3, 28, 28))])


def test_net_source_needs_a_checkpoint() -> None:
    with pytest.raises(ModelSpecError, match="CHECKPOINT"):
        load_source(None)


def test_user_factory_and_instance(user_dir: Path) -> None:
    src = load_source(
        None, model_spec="user_models_for_test:build", input_specs=[InputSpec((3, 8, 8))]
    )
    assert isinstance(src.model, torch.nn.Sequential) and not src.model.training
    assert not src.is_net and src.normalize is None
    assert tuple(src.example_input.shape) == (2, 3, 8, 8)
    inst = load_source(
        None, model_spec="user_models_for_test:instance", input_specs=[InputSpec((3, 8, 8))]
    )
    assert isinstance(inst.model, torch.nn.Sequential)


def test_user_state_dict_is_loaded(user_dir: Path) -> None:
    import user_models_for_test as m

    trained = m.build()
    with torch.no_grad():
        for p in trained.parameters():
            p.uniform_(-1, 1)
    torch.save(trained.state_dict(), user_dir / "weights.pt")
    src = load_source(
        user_dir / "weights.pt",
        model_spec="user_models_for_test:build",
        input_specs=[InputSpec((3, 8, 8))],
    )
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(src.model(x), trained.eval()(x))
    assert src.sha256 is not None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nocolon", "must look like package.module:factory"),
        ("no_such_module_xyz:build", "cannot import"),
        ("user_models_for_test:nope", "has no attribute"),
        ("user_models_for_test:broken", r"factory broken\(\) raised RuntimeError: no weights here"),
        ("user_models_for_test:not_a_model", "not a torch.nn.Module"),
    ],
)
def test_bad_model_specs(user_dir: Path, spec: str, message: str) -> None:
    with pytest.raises(ModelSpecError, match=message):
        load_source(None, model_spec=spec, input_specs=[InputSpec((3, 8, 8))])


def test_user_model_needs_a_fitting_input_shape(user_dir: Path) -> None:
    with pytest.raises(ModelSpecError, match="needs --input-shape"):
        load_source(None, model_spec="user_models_for_test:build")
    with pytest.raises(ModelSpecError, match="check --input-shape"):
        load_source(
            None, model_spec="user_models_for_test:build", input_specs=[InputSpec((5, 8, 8))]
        )
    with pytest.raises(ModelSpecError, match="temperature"):
        load_source(
            None,
            model_spec="user_models_for_test:build",
            input_specs=[InputSpec((3, 8, 8))],
            temperature=2.0,
        )


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("3,32,32", InputSpec((3, 32, 32), "float32")),
        ("8:int64", InputSpec((8,), "int64")),
        ("8:long", InputSpec((8,), "int64")),
        ("4,4:bf16", InputSpec((4, 4), "bfloat16")),
        ("2:bool", InputSpec((2,), "bool")),
        ("2: float16", InputSpec((2,), "float16")),
    ],
)
def test_parse_input_spec(text: str, spec: InputSpec) -> None:
    assert parse_input_spec(text) == spec


def test_parse_input_spec_rejects_an_unknown_dtype() -> None:
    with pytest.raises(ModelSpecError, match=r"unknown dtype 'complex64'.*int64"):
        parse_input_spec("8:complex64")


def test_several_inputs_are_named_after_the_forward(user_dir: Path) -> None:
    specs = [InputSpec((3, 8, 8)), InputSpec((5,), "int64")]
    src = load_source(None, model_spec="user_models_for_test:TwoInputs", input_specs=specs)
    assert src.input_names == ("image", "ids") and src.output_names is None
    image, ids = src.example_inputs
    assert image.dtype == torch.float32 and tuple(image.shape) == (2, 3, 8, 8)
    assert ids.dtype == torch.int64 and tuple(ids.shape) == (2, 5)
    assert int(ids.min()) >= 0 and int(ids.max()) < 10  # valid indices: INT_INPUT_HIGH
    again = load_source(None, model_spec="user_models_for_test:TwoInputs", input_specs=specs)
    assert all(
        torch.equal(a, b) for a, b in zip(src.example_inputs, again.example_inputs, strict=True)
    )


@pytest.mark.parametrize("count", [1, 4])
def test_a_wrong_number_of_input_shapes_names_the_forward_parameters(
    user_dir: Path, count: int
) -> None:
    specs = [InputSpec((3, 8, 8))] * count
    with pytest.raises(ModelSpecError) as info:
        load_source(None, model_spec="user_models_for_test:TwoInputs", input_specs=specs)
    message = str(info.value)
    assert "forward(image, ids, scale) takes 2 to 3 input(s)" in message
    assert f"got {count} --input-shape" in message


def test_a_factory_without_weights_can_be_rebuilt(user_dir: Path) -> None:
    spec = [InputSpec((4,))]
    src = load_source(None, model_spec="user_models_for_test:unseeded", input_specs=spec)
    assert src.rebuild is not None
    other = src.rebuild()
    assert not torch.equal(other.weight, src.model.weight)  # a second call: a new random model
    torch.save(src.model.state_dict(), user_dir / "w.pt")
    loaded = load_source(
        user_dir / "w.pt", model_spec="user_models_for_test:unseeded", input_specs=spec
    )
    assert loaded.rebuild is None  # weights from a file: the same on every load


FACTORY = textwrap.dedent(
    """
    import torch.nn as nn
    import dep_probe

    def make():
        m = nn.Linear(4, 2)
        m.dep = dep_probe.WHERE
        return m
    """
)


@pytest.fixture
def cwd_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding ``mynets_probe.py`` and a stray ``dep_probe.py``; an
    "installed" ``dep_probe`` on ``sys.path``. Neither module is imported yet."""
    work, site = tmp_path / "work", tmp_path / "site"
    work.mkdir()
    site.mkdir()
    (work / "mynets_probe.py").write_text(FACTORY)
    (work / "dep_probe.py").write_text("WHERE = 'working directory'\n")
    (site / "dep_probe.py").write_text("WHERE = 'installed'\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.chdir(work)
    for name in ("mynets_probe", "dep_probe"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return work


def test_the_working_directory_is_importable_only_during_the_import(cwd_only: Path) -> None:
    before = list(sys.path)
    model = resolve_model("mynets_probe:make")
    assert isinstance(model, torch.nn.Linear)
    assert sys.path == before


def test_the_working_directory_cannot_shadow_installed_modules(cwd_only: Path) -> None:
    assert resolve_model("mynets_probe:make").dep == "installed"


def test_a_stray_onnxscript_in_the_working_directory_is_not_imported(tmp_path: Path) -> None:
    """The real case: torch's exporter imports onnxscript after the model is loaded."""
    factory = "import torch.nn as nn\n\ndef make():\n    return nn.Linear(4, 2)\n"
    (tmp_path / "mynets_probe.py").write_text(factory)
    (tmp_path / "onnxscript.py").write_text("raise ImportError('the stray onnxscript.py')\n")
    code = (
        "import sys; from bnexport.source import resolve_model; before = list(sys.path); "
        "resolve_model('mynets_probe:make'); import onnxscript; "
        "print(sys.path == before, onnxscript.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    same_path, origin = out.stdout.split()
    assert same_path == "True" and Path(origin).parent.parent != tmp_path


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("raise ValueError('bad config')", "error importing mynets_probe: ValueError: bad config"),
        ("import no_such_dep_xyz", "error importing mynets_probe: ModuleNotFoundError: No module"),
        ("def make(:", "error importing mynets_probe: SyntaxError"),
        ("import sys\nsys.exit(3)", "error importing mynets_probe: SystemExit: 3"),
    ],
)
def test_errors_in_the_users_module_are_reported_as_theirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, message: str
) -> None:
    (tmp_path / "mynets_probe.py").write_text(source + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "mynets_probe", raising=False)
    with pytest.raises(ModelSpecError, match=re.escape(message)) as info:
        resolve_model("mynets_probe:make")
    assert "--debug" in str(info.value) and info.value.__cause__ is not None
