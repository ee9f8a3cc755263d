"""`bnexport fold` through CliRunner: the saved .pt2 program against an independent float64
reference, the fold report, `--model`, `--strict`, and bad input (exit 2, one line, no file)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import net_forward_f64, randomize_net_state
from seed_models import SeedNet
from typer.testing import CliRunner

from bnexport.checkpoint import save_checkpoint
from bnexport.cli.app import app
from bnexport.data import FASHION_MNIST_NORMALIZE
from bnexport.nets import Net

runner = CliRunner()
TEMPERATURE = 1.5
X = torch.randn(7, 1, 28, 28, generator=torch.Generator().manual_seed(3))

USER_MODELS = """
import torch
from torch import nn


class LinearBn(nn.Module):
    '''An MLP: Linear → BatchNorm1d → ×(−2) → ReLU → Linear.'''

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.out = nn.Linear(5, 3)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            self.bn.running_mean.copy_(torch.randn(5, generator=g))
            self.bn.running_var.copy_(torch.rand(5, generator=g) + 0.5)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x)) * -2.0))


def TrainMode():  # a factory that returns its model in train mode
    return LinearBn().train()


def Marked():  # module names that rich would read as markup and an emoji
    model = nn.Sequential()
    model.add_module("fc[red]:rocket:", nn.Linear(6, 5))
    model.add_module("bn[/]", nn.BatchNorm1d(5))
    return model.eval()


class BnFirst(nn.Module):
    '''BatchNorm1d straight on the input, then ReLU: no layer to fold it into.'''

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.relu(self.bn(x)))
"""


def _load_program(path: Path) -> torch.nn.Module:
    return torch.export.load(str(path)).module()


def _assert_matches(got: torch.Tensor, ref: torch.Tensor) -> None:
    got_np, ref_np = got.detach().double().numpy(), ref.numpy()
    scale = max(1.0, float(np.abs(ref_np).max()))
    assert float(np.abs(got_np - ref_np).max()) <= 1e-5 * scale


@pytest.fixture(scope="module")
def user_models(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("user")
    (root / "bnx_cli_fold_models.py").write_text(USER_MODELS)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        yield "bnx_cli_fold_models"


def test_fold_writes_a_program_that_matches_the_reference(tmp_path: Path) -> None:
    net = randomize_net_state(Net(temperature=TEMPERATURE), seed=2)
    ckpt, out, report = tmp_path / "net.pt", tmp_path / "net.pt2", tmp_path / "report.json"
    sha = save_checkpoint(ckpt, net, normalize=FASHION_MNIST_NORMALIZE, metadata={})
    result = runner.invoke(app, ["fold", str(ckpt), "-o", str(out), "--report-json", str(report)])
    assert result.exit_code == 0, result.output
    assert "Fold report: 1 folded, 0 left" in result.stdout
    assert "×1.5" in result.stdout and "conv1" in result.stdout
    assert "Parity: PASS" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt", "net.pt2", "report.json"]

    program = _load_program(out)
    for batch in (1, 7):
        _assert_matches(program(X[:batch]), net_forward_f64(net.state_dict(), X[:batch], 1.5))
    data = json.loads(report.read_text())
    assert data["source"]["sha256"] == sha
    assert data["fold"]["entries"][0]["into"] == "conv1"
    assert data["fold"]["entries"][0]["temperature"] == TEMPERATURE
    assert data["parity"]["passed"] is True and data["parity"]["samples"] > 1000
    assert not any("batch_norm" in op for op in data["program"]["op_counts"])


def test_seed_batchnorm2d_state_dict_folds_with_temperature(tmp_path: Path) -> None:
    seed = randomize_net_state(SeedNet(), seed=4)
    ckpt, out = tmp_path / "seed.pt", tmp_path / "seed.pt2"
    torch.save(seed.state_dict(), ckpt)
    result = runner.invoke(app, ["fold", str(ckpt), "-o", str(out), "--temperature", "0.5"])
    assert result.exit_code == 0, result.output
    assert "temperature 0.5" in result.stdout
    _assert_matches(_load_program(out)(X), net_forward_f64(seed.state_dict(), X, 0.5))


def test_user_model_folds_with_negative_scale(user_models: str, tmp_path: Path) -> None:
    from importlib import import_module

    out = tmp_path / "mlp.pt2"
    args = ["fold", "--model", f"{user_models}:LinearBn", "--input-shape", "6", "-o", str(out)]
    result = runner.invoke(app, [*args, "--strict"])
    assert result.exit_code == 0, result.output
    assert "Fold report: 1 folded, 0 left" in result.stdout
    model = import_module(user_models).LinearBn().eval()
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        fc, bn, head = model.fc.double(), model.bn.double(), model.out.double()
        y = torch.nn.functional.linear(x.double(), fc.weight, fc.bias)
        y = (y - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        ref = torch.nn.functional.linear(torch.relu(-2.0 * y), head.weight, head.bias)
    _assert_matches(_load_program(out)(x), ref)


def test_strict_exits_1_and_writes_nothing_when_a_batchnorm_is_left(
    user_models: str, tmp_path: Path
) -> None:
    args = ["fold", "--model", f"{user_models}:BnFirst", "--input-shape", "6"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "x.pt2"), "--strict"])
    assert result.exit_code == 1, result.output
    assert "left: nonlinearity" in result.stdout and "(BatchNorm1d)" in result.stdout
    assert "left bn: relu (call function relu) sits between bn and out" in result.stdout
    assert list(tmp_path.iterdir()) == []

    # Without --strict the BN stays, the report says why, and the program still matches.
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "x.pt2")])
    assert result.exit_code == 0, result.output
    assert "Fold report: 0 folded, 1 left" in result.stdout
    assert (tmp_path / "x.pt2").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "bnx_no_such_module:factory", "--input-shape", "3"], "cannot import"),
        (["--model", "torch.nn:Identity"], "--input-shape"),
        (["--model", "torch.nn:Identity", "--input-shape", "three"], "--input-shape"),
        ([], "give a CHECKPOINT"),
    ],
    ids=["bad-import", "no-shape", "bad-shape", "nothing"],
)
def test_bad_model_options_exit_2_with_one_line(
    args: list[str], needle: str, tmp_path: Path
) -> None:
    result = runner.invoke(app, ["fold", *args, "-o", str(tmp_path / "x.pt2")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bnexport: error: ")
    assert needle in lines[0] and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_missing_keys_exit_2_and_leave_no_file(tmp_path: Path) -> None:
    state = randomize_net_state(Net(), seed=1).state_dict()
    del state["bn1.bn.running_var"]
    ckpt = tmp_path / "in.pt"
    torch.save(state, ckpt)
    result = runner.invoke(app, ["fold", str(ckpt), "-o", str(tmp_path / "x.pt2")])
    assert result.exit_code == 2, result.output
    assert "missing keys: bn1.bn.running_var" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pt"]


def test_a_long_fold_report_groups_folded_and_left_batchnorms_in_100_columns() -> None:
    import io

    from rich.console import Console
    from torch import nn

    from bnexport.cli.fold import render_fold_report
    from bnexport.fold import fold_model

    layers: list[nn.Module] = []
    for _ in range(14):  # paths 0…27: conv, bn
        layers += [nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)]
    layers += [nn.ConvTranspose2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)]  # 28, 29: a group of 1
    for _ in range(4):  # paths 30…37: relu, bn
        layers += [nn.ReLU(), nn.BatchNorm2d(4)]
    model = nn.Sequential(*layers, nn.ReLU()).eval()
    report = fold_model(model, torch.randn(2, 4, 6, 6)).report
    codes = [e.reason_code for e in report.left]
    # The first left BN follows conv → BN → ReLU; the other three have no layer near them at all.
    assert len(report.folded) == 15
    assert codes[0] != codes[1] and codes[1:] == [codes[1]] * 3

    buffer = io.StringIO()
    render_fold_report(Console(file=buffer, width=100), report)
    lines = buffer.getvalue().splitlines()
    text = "\n".join(lines)
    flat = " ".join(text.split())
    assert lines[0].rstrip() == (
        "Fold report: 15 folded, 4 left (of 19 BatchNorms); --report-json lists each"
    )
    # A group's first cell is its count and type, then its first and last paths, a line each.
    assert re.search(r"14 × BatchNorm2d into Conv2d BatchNorm2d ≤ \S+ 1 … \(after\) 27 ", flat)
    assert re.search(rf"3 × BatchNorm2d left: {codes[1]} BatchNorm2d - 33 … 37 ", flat)
    assert "29 into 28 BatchNorm2d" in flat  # alone in its group: its own row
    single, grouped = report.left[0], report.left[1]
    assert " ".join(f"left {single.bn}: {single.reason}".split()) in flat  # its full reason
    assert f"left: {codes[1]} × 3 (" in flat
    assert " ".join(f"e.g. {grouped.bn}: {grouped.reason}".split()) in flat
    assert all(len(line) <= 100 for line in lines), text
    assert len(lines) <= 24, text  # a row per BatchNorm would take over 35


def _lines_fit(text: str, width: int = 100) -> None:
    lines = text.splitlines()
    assert lines and all(len(line) <= width for line in lines), text


def test_the_shipped_model_fits_100_columns_with_its_type_whole(tmp_path: Path) -> None:
    out = tmp_path / "net.pt2"
    result = runner.invoke(
        app, ["fold", "models/net.pt", "-o", str(out), "--localize"], env={"COLUMNS": "100"}
    )
    assert result.exit_code == 0, result.output
    _lines_fit(result.stdout)
    assert any(
        line.strip().startswith("(TemperatureBatchNorm2d)") for line in result.stdout.splitlines()
    )
    assert "localization: 1 fold step compared with the unfolded model in float64" in result.stdout
    assert "none diverges" in " ".join(result.stdout.split())


def test_a_train_mode_factory_is_said_to_run_in_eval(user_models: str, tmp_path: Path) -> None:
    args = ["fold", "--model", f"{user_models}:TrainMode", "--input-shape", "6"]
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "x.pt2")], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    flat = " ".join(result.stdout.split())
    assert (
        "note: the factory returned the model in train mode; bnexport uses it in eval mode" in flat
    )
    _lines_fit(result.stdout)


def test_user_text_is_printed_as_typed(user_models: str, tmp_path: Path) -> None:
    """rich would turn :rocket: into an emoji and [red] into markup: a wrong path on the screen."""
    out = tmp_path / "o:rocket:[red]x[/red].pt2"
    args = ["fold", "--model", f"{user_models}:Marked", "--input-shape", "6", "-o", str(out)]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    flat = " ".join(result.stdout.split())  # a path longer than a line has a line of its own
    assert f"Wrote {out} (" in flat
    assert "bn[/]" in result.stdout and "into fc[red]:rocket:" in result.stdout
    assert "🚀" not in result.stdout


def test_a_fold_that_fails_its_self_check_is_localized_and_fits_100_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the fold math (a weight 1 % off) breaks the fold of the shipped model's one
    BatchNorm: the command localizes it, leaves it unfolded and still writes a program that
    passes."""
    import bnexport.fold.math as fm

    original = fm.fold_after

    def off(kind, weight, bias, scale, shift, groups=1):  # type: ignore[no-untyped-def]
        folded = original(kind, weight, bias, scale, shift, groups)
        return fm.Folded(folded.weight * 1.01, folded.bias)

    monkeypatch.setattr(fm, "fold_after", off)
    out = tmp_path / "net.pt2"
    result = runner.invoke(app, ["fold", "models/net.pt", "-o", str(out)], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    _lines_fit(result.stdout)
    flat = " ".join(result.stdout.split())
    assert "Fold report: 0 folded, 1 left" in flat and "left: self_check" in flat
    assert "left bn1: folding it into conv1 failed the float64 self-check" in flat
    assert "localization: the first fold step whose float64 output diverges is bn1" in flat
    assert "Parity: PASS" in flat


def _render(report: object, width: int = 100) -> str:
    import io

    from rich.console import Console

    from bnexport.cli.fold import render_fold_report

    buffer = io.StringIO()
    render_fold_report(Console(file=buffer, width=width), report)
    return buffer.getvalue()


@pytest.mark.real
@pytest.mark.parametrize(
    ("name", "folded", "left"),
    [
        ("torchvision/resnet50", 53, 0),
        ("timm/levit_128s", 52, 0),
        ("timm/resnetv2_50", 32, 17),  # pre-activation: BNs left, with reasons
    ],
)
def test_real_fold_reports_fit_100_columns(name: str, folded: int, left: int) -> None:
    from real.tv_compat import ensure_torchvision_ops

    ensure_torchvision_ops()  # before timm imports torchvision (a CPU-only torch build)
    pytest.importorskip("timm")
    from real.zoo import REAL_MODELS

    from bnexport.fold import fold_model

    model, inputs = REAL_MODELS[name]()
    report = fold_model(model, inputs).report
    assert (len(report.folded), len(report.left)) == (folded, left)
    text = _render(report)
    _lines_fit(text)
    assert len(text.splitlines()) <= 40, text
    names = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    tops = {n.split(".")[0] for n in names if n}
    for line in text.splitlines():  # a module path is never broken: every one is whole
        for word in line.split():
            word = word.strip("(),:;…")
            if "." in word and word.split(".")[0] in tops:
                assert word in names, f"{word!r} is no path of {name}:\n{text}"
