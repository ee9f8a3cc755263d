"""Checkpoints: the bnexport format, the seed's own state dicts, and every refusal."""

from __future__ import annotations

import hashlib
import math
import pickle
from pathlib import Path

import pytest
import torch
from reference import net_forward_f64, randomize_net_state
from seed_models import SeedNet, SeedNetMyBN

from bnexport.checkpoint import load_checkpoint, save_checkpoint
from bnexport.data import Normalize
from bnexport.errors import CheckpointError
from bnexport.nets import Net

X = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _net(temperature: float = 1.5) -> Net:
    return randomize_net_state(Net(temperature=temperature), seed=3).eval()


def _assert_matches(model: torch.nn.Module, state_dict: dict, temperature: float) -> None:
    with torch.no_grad():
        got = model(X).double()
    ref = net_forward_f64(state_dict, X, temperature)
    scale = max(1.0, ref.abs().max().item())
    assert (got - ref).abs().max().item() <= 1e-5 * scale


def test_round_trip_keeps_weights_temperature_normalize_and_hash(tmp_path: Path) -> None:
    net = _net(1.5)
    path = tmp_path / "net.pt"
    sha = save_checkpoint(path, net, normalize=Normalize(0.25, 0.5), metadata={"seed": 7})
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    ckpt = load_checkpoint(path)
    assert ckpt.layout == "bnexport"
    assert ckpt.temperature == 1.5
    assert ckpt.normalize == Normalize(0.25, 0.5)
    assert ckpt.metadata == {"seed": 7}
    assert ckpt.sha256 == sha
    assert not ckpt.model.training
    _assert_matches(ckpt.model, net.state_dict(), 1.5)
    assert [p.name for p in tmp_path.iterdir()] == ["net.pt"]  # no temp file left


def test_seed_batchnorm2d_state_dict_loads_with_temperature(tmp_path: Path) -> None:
    seed = randomize_net_state(SeedNet(), seed=4).eval()
    path = tmp_path / "seed.pt"
    torch.save(seed.state_dict(), path)
    ckpt = load_checkpoint(path)  # default temperature 1.0: identical to the seed model
    assert ckpt.layout == "seed-batchnorm2d"
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(X), seed(X), rtol=1e-5, atol=1e-5)
    ckpt2 = load_checkpoint(path, temperature=2.0)
    assert ckpt2.temperature == 2.0
    _assert_matches(ckpt2.model, seed.state_dict(), 2.0)


def test_seed_mybn_state_dict_loads(tmp_path: Path) -> None:
    seed = randomize_net_state(SeedNetMyBN(temperature=1.5), seed=5).eval()
    path = tmp_path / "seed_mybn.pt"
    torch.save(seed.state_dict(), path)
    ckpt = load_checkpoint(path, temperature=1.5)
    assert ckpt.layout == "seed-mybn"
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model(X), seed(X), rtol=1e-5, atol=1e-5)


class _Evil:
    marker: Path

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # runs `open(marker, "w")` when unpickled by a trusting loader
        return (open, (str(self.marker), "w"))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda sd: sd.pop("fc1.weight"), "missing keys: fc1.weight"),
        (
            lambda sd: sd.__setitem__("extra.weight", torch.zeros(2)),
            "unexpected keys: extra.weight",
        ),
        (
            lambda sd: sd.__setitem__("conv1.weight", torch.zeros(16, 1, 3, 3)),
            r"mismatched shapes: conv1.weight: checkpoint \(16, 1, 3, 3\) vs model \(32, 1, 3, 3\)",
        ),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_wrong_keys_are_listed(tmp_path: Path, mutate, expected: str) -> None:
    sd = SeedNetMyBN().state_dict()
    mutate(sd)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)


def test_untracked_running_stats_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "untracked.pt"
    torch.save(SeedNetMyBN(track_running_stats=False).state_dict(), path)
    with pytest.raises(CheckpointError, match="track_running_stats=False"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_corrupt_files_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "corrupt.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "cause"),
    [
        (b"not a checkpoint at all", "corrupt checkpoint (Unsupported operand 110)"),
        (pickle.dumps({"w": 1.0})[:-3], "a plain pickle, not a torch.save file"),  # truncated
    ],
)
def test_a_corrupt_file_names_the_cause_and_never_advises_unsafe_loading(
    tmp_path: Path, content: bytes, cause: str, recwarn: pytest.WarningsRecorder
) -> None:
    path = tmp_path / "corrupt.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"cannot read {path}: {cause}")
    assert "weights_only" not in message
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


class _Code:
    """Unpickling it would call ``os.system``."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("echo unpickled",))


def test_a_pickle_carrying_code_is_refused_as_code_and_an_onnx_file_is_named(
    tmp_path: Path,
) -> None:
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"state_dict": _Code()}))
    with pytest.raises(CheckpointError, match=r"plain pickle that imports (posix|os|nt)\.system"):
        load_checkpoint(path)
    onnx_file = tmp_path / "net.onnx"
    onnx_file.write_bytes(b"\x08\x0a\x12\x07pytorch" + b"\0" * 64)  # ir_version, producer
    with pytest.raises(CheckpointError, match=r"net\.onnx is an ONNX model, not a checkpoint"):
        load_checkpoint(onnx_file)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_nan_temperature_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "seed.pt"
    torch.save(SeedNet().state_dict(), path)
    with pytest.raises(CheckpointError, match="finite"):
        load_checkpoint(path, temperature=math.nan)
    net = _net()
    good = tmp_path / "good.pt"
    save_checkpoint(good, net, normalize=Normalize(0.5, 0.5))
    payload = torch.load(good, weights_only=True)
    payload["config"]["temperature"] = math.nan
    torch.save(payload, good)
    with pytest.raises(CheckpointError, match="finite"):
        load_checkpoint(good)


def test_temperature_flag_cannot_contradict_a_bnexport_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "net.pt"
    save_checkpoint(path, _net(1.5), normalize=Normalize(0.5, 0.5))
    assert load_checkpoint(path, temperature=1.5).temperature == 1.5
    with pytest.raises(CheckpointError, match="conflicts"):
        load_checkpoint(path, temperature=2.0)


def test_failed_save_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "net.pt", _net(), normalize=Normalize(0.5, 0.5))
    assert list(tmp_path.iterdir()) == []
