"""bnexport.train: a short seeded run on the bundled sample learns, is reproducible, reports
accuracies that an independent float64 forward confirms, and refuses bad configs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import net_forward_f64

from bnexport.data import FASHION_MNIST_NORMALIZE, load_sample
from bnexport.errors import BnexportError, ProviderUnavailableError
from bnexport.train import TrainConfig, TrainEvent, train

# 4 epochs × 20 steps on the 1000 sample images, no flips: a few seconds on one thread.
QUICK = TrainConfig(
    epochs=4, batch_size=50, seed=0, temperature=1.5, use_sample=True, flip=0.0, threads=1
)


@pytest.fixture(scope="module")
def quick_run():
    events: list[TrainEvent] = []
    rng_before = torch.random.get_rng_state()
    result = train(QUICK, progress=events.append)
    rng_after = torch.random.get_rng_state()
    return result, events, torch.equal(rng_before, rng_after)


def test_loss_drops_and_the_model_learns(quick_run) -> None:
    result, _, _ = quick_run
    losses = [e.train_loss for e in result.history]
    assert len(losses) == 4
    assert losses[-1] < 0.5 * losses[0], losses
    assert result.history[-1].train_acc > result.history[0].train_acc
    # An untrained 10-way classifier sits near ln(10) ≈ 2.30 and 10 %.
    assert result.test_loss < 0.8 * math.log(10)
    assert result.test_accuracy > 0.7


def test_reported_accuracy_matches_an_independent_float64_forward(quick_run) -> None:
    result, _, _ = quick_run
    images, labels = load_sample()
    norm = FASHION_MNIST_NORMALIZE
    x = (torch.from_numpy(images).double()[:, None] / 255.0 - norm.mean) / norm.std
    logits = net_forward_f64(result.model.state_dict(), x, 1.5)
    acc = (logits.argmax(1).numpy() == labels).mean()
    assert abs(acc - result.test_accuracy) <= 0.002  # float32 vs float64 ties may flip one image
    assert result.model.bn1.temperature == 1.5
    assert not result.model.training


def test_progress_events_and_result_fields(quick_run) -> None:
    result, events, _ = quick_run
    steps = [e for e in events if e.kind == "step"]
    epochs = [e for e in events if e.kind == "epoch"]
    assert len(steps) == 4 * 20 and {e.steps for e in steps} == {20}
    assert len(epochs) == 4
    assert [e.test_acc for e in epochs] == [h.test_acc for h in result.history]
    assert steps[-1].loss == pytest.approx(result.history[-1].train_loss)
    assert result.device == ("cuda" if torch.cuda.is_available() else "cpu")  # device "auto"
    assert result.train_size == result.test_size == 1000
    assert result.to_dict()["normalize"] == FASHION_MNIST_NORMALIZE.to_dict()


def test_same_seed_same_model_and_global_rng_untouched(quick_run) -> None:
    _, _, rng_untouched = quick_run
    assert rng_untouched
    again = train(TrainConfig(**{**QUICK.__dict__, "epochs": 1, "limit": 200}))
    twice = train(TrainConfig(**{**QUICK.__dict__, "epochs": 1, "limit": 200}))
    other = train(TrainConfig(**{**QUICK.__dict__, "epochs": 1, "limit": 200, "seed": 1}))
    a, b, c = (r.model.state_dict()["fc1.weight"] for r in (again, twice, other))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_limit_trains_on_the_first_images() -> None:
    result = train(TrainConfig(epochs=1, batch_size=64, use_sample=True, limit=100, threads=1))
    assert result.train_size == 100 and result.test_size == 1000
    assert result.data["train_images"] == 100


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda_is_an_error() -> None:
    with pytest.raises(ProviderUnavailableError, match="--device cuda asked for"):
        train(TrainConfig(use_sample=True, device="cuda"))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs must be >= 1"),
        ("batch_size", 0, "batch size must be >= 1"),
        ("lr", -1.0, "lr must be finite and > 0"),
        ("lr", float("nan"), "lr must be finite and > 0"),
        ("weight_decay", -0.1, "weight decay"),
        ("temperature", float("inf"), "temperature must be finite"),
        ("temperature", 0.0, "--temperature 0: give a temperature > 0"),
        ("temperature", -1.0, "--temperature -1: give a temperature > 0"),
        ("temperature", 1e40, r"--temperature 1e\+40: give a temperature > 0"),
        ("seed", 2**64, "--seed 18446744073709551616: give a seed from 0 to 2"),
        ("threads", 10**5, "--threads 100000: give 1 to"),
        ("limit", 0, "limit must be >= 1"),
        ("flip", 1.5, "flip probability"),
    ],
)
def test_bad_config(field: str, value: object, message: str) -> None:
    with pytest.raises(BnexportError, match=message):
        train(TrainConfig(use_sample=True, **{field: value}))


def test_sample_labels_are_what_training_sees() -> None:
    _, labels = load_sample()
    assert labels.dtype == np.int64


def test_flip_is_a_left_right_mirror_of_the_training_images(monkeypatch) -> None:
    """flip=1 mirrors every training image: the same weights as flip=0 on pre-mirrored images."""
    import bnexport.train as train_mod

    config = {**QUICK.__dict__, "epochs": 1, "limit": 200}
    flipped = train(TrainConfig(**{**config, "flip": 1.0})).model.state_dict()
    plain = train(TrainConfig(**{**config, "flip": 0.0})).model.state_dict()
    images, labels = load_sample()
    monkeypatch.setattr(train_mod, "load_sample", lambda: (images[:, :, ::-1].copy(), labels))
    mirrored = train(TrainConfig(**{**config, "flip": 0.0})).model.state_dict()
    for key, value in flipped.items():
        assert torch.equal(value, mirrored[key]), key
    assert not torch.equal(flipped["fc1.weight"], plain["fc1.weight"])
