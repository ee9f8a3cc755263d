"""Train the seed `Net` on Fashion-MNIST: AdamW with a one-cycle learning-rate schedule, seeded.

Determinism: the weights are initialised under ``torch.manual_seed(seed)`` (inside a forked RNG, so
the caller's global RNG is left alone) and the batch order and flips come from a private
``torch.Generator`` seeded with the same seed; the same config on the same machine gives the same
model. Augmentation: each training image is flipped left-right with probability `flip`
(Fashion-MNIST's garments are mirror-symmetric, so the label stays right).

The library never prints: progress goes to an optional callback as `TrainEvent`s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bnexport.data import (
    FASHION_MNIST_NORMALIZE,
    SAMPLE_FILES,
    Normalize,
    find_data_dir,
    load_pair,
    load_sample,
    split_files,
    to_tensor,
)
from bnexport.defaults import (
    DEFAULT_DEVICE,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_TEMPERATURE,
    DEFAULT_TRAIN_BATCH_SIZE,
    DEFAULT_TRAIN_SEED,
    DEFAULT_WEIGHT_DECAY,
    DEVICE_CHOICES,
)
from bnexport.errors import BnexportError, ProviderUnavailableError
from bnexport.files import sha256_file
from bnexport.limits import (
    MAX_DIM,
    MAX_REPEATS,
    check_count,
    check_seed,
    check_temperature,
    check_threads,
)

Device = Literal["auto", "cpu", "cuda"]
EVAL_BATCH = 1000


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run. `lr` is the one-cycle schedule's peak."""

    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_TRAIN_BATCH_SIZE
    lr: float = DEFAULT_LR
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    seed: int = DEFAULT_TRAIN_SEED
    temperature: float = DEFAULT_TEMPERATURE
    device: Device = DEFAULT_DEVICE  # type: ignore[assignment]
    data_dir: Path | None = None
    limit: int | None = None  # train on the first `limit` training images only (quick runs)
    use_sample: bool = False  # train and evaluate on the bundled 1000-image sample (tests, demos)
    flip: float = 0.5  # probability of a left-right flip per training image
    threads: int | None = None  # torch intra-op threads for this run; None keeps torch's setting

    def validate(self) -> None:
        """Raise `BnexportError` naming the first bad value."""
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (math.isfinite(self.lr) and self.lr > 0, f"lr must be finite and > 0, got {self.lr}"),
            (
                math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                f"weight decay must be finite and >= 0, got {self.weight_decay}",
            ),
            (
                math.isfinite(self.temperature),
                f"temperature must be finite, got {self.temperature}",
            ),
            (
                self.device in DEVICE_CHOICES,
                f"device must be one of {', '.join(DEVICE_CHOICES)}, got {self.device!r}",
            ),
            (self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}"),
            (0.0 <= self.flip <= 1.0, f"flip probability must be in [0, 1], got {self.flip}"),
            (
                self.threads is None or self.threads >= 1,
                f"threads must be >= 1, got {self.threads}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise BnexportError(message)
        check_temperature(self.temperature)
        check_seed(self.seed)
        check_count(self.epochs, "--epochs", maximum=MAX_REPEATS)
        check_count(self.batch_size, "--batch-size", maximum=MAX_DIM)
        check_threads(self.threads, "--threads")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["data_dir"] = None if self.data_dir is None else str(self.data_dir)
        return d


@dataclass(frozen=True)
class TrainEvent:
    """Progress: ``kind="step"`` after each batch (running means over the epoch so far), and
    ``kind="epoch"`` after each epoch's evaluation (with the test loss and accuracy)."""

    kind: Literal["step", "epoch"]
    epoch: int  # 1-based
    epochs: int
    step: int  # 1-based within the epoch
    steps: int
    loss: float  # running mean training loss this epoch
    acc: float  # running training accuracy this epoch, in [0, 1]
    lr: float
    test_loss: float | None = None
    test_acc: float | None = None


@dataclass(frozen=True)
class EpochStats:
    """One epoch's metrics; accuracies in [0, 1]."""

    epoch: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """A trained `Net` (eval mode, on the CPU) and how it got there."""

    model: Any  # bnexport.nets.Net
    config: TrainConfig
    history: list[EpochStats]
    test_accuracy: float
    test_loss: float
    test_size: int
    train_size: int
    seconds: float
    device: str
    normalize: Normalize
    data: dict[str, Any] = field(default_factory=dict)
    torch_version: str = ""
    threads: int = 0  # torch intra-op threads used on the CPU

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metrics, config and data provenance (everything but the model)."""
        return {
            "config": self.config.to_dict(),
            "history": [e.to_dict() for e in self.history],
            "test_accuracy": self.test_accuracy,
            "test_loss": self.test_loss,
            "test_size": self.test_size,
            "train_size": self.train_size,
            "seconds": self.seconds,
            "device": self.device,
            "normalize": self.normalize.to_dict(),
            "data": self.data,
            "torch_version": self.torch_version,
            "threads": self.threads,
        }


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ProviderUnavailableError(
            f"--device cuda asked for, but torch {torch.__version__} sees no CUDA device; "
            "use --device cpu (or auto), or install a CUDA build of torch"
        )
    if device not in ("cpu", "cuda"):
        raise BnexportError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {device!r}")
    return device


def _load_data(
    config: TrainConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """(train images, train labels, test images, test labels, provenance)."""
    if config.use_sample:
        images, labels = load_sample()
        data = {
            "source": "bundled-sample",
            "note": "bnexport/sample: the same 1000 test images for training and evaluation",
            "files": list(SAMPLE_FILES),
        }
        train_x, train_y, test_x, test_y = images, labels, images, labels
    else:
        root = find_data_dir(config.data_dir, splits=("train", "test"))
        train_files, test_files = split_files(root, "train"), split_files(root, "test")
        assert train_files is not None and test_files is not None  # find_data_dir checked
        train_x, train_y = load_pair(*train_files)
        test_x, test_y = load_pair(*test_files)
        data = {
            "source": "fashion-mnist",
            "dir": str(root.resolve()),
            "files": {p.name: sha256_file(p) for p in (*train_files, *test_files)},
        }
    if config.limit is not None:
        train_x, train_y = train_x[: config.limit], train_y[: config.limit]
    data["train_images"] = int(train_x.shape[0])
    data["test_images"] = int(test_x.shape[0])
    return train_x, train_y, test_x, test_y, data


def train(
    config: TrainConfig,
    progress: Callable[[TrainEvent], None] | None = None,
    *,
    normalize: Normalize = FASHION_MNIST_NORMALIZE,
) -> TrainResult:
    """Train `Net(temperature=config.temperature)` and evaluate it on the test set after each epoch.

    Loss: cross-entropy on the logits. Optimiser: AdamW(lr, weight_decay) under OneCycleLR with
    peak `lr` over ``epochs * ceil(N / batch_size)`` steps.
    """
    import torch

    config.validate()
    device = resolve_device(config.device)
    train_x, train_y, test_x, test_y, data = _load_data(config)
    started = time.perf_counter()
    with _torch_settings(config.threads) as threads:
        model = _seeded_net(config, device)
        train_set = (to_tensor(train_x, normalize).to(device), torch.as_tensor(train_y).to(device))
        test_set = (to_tensor(test_x, normalize).to(device), torch.as_tensor(test_y).to(device))
        history = _fit(model, train_set, test_set, config, progress)
        seconds = time.perf_counter() - started

    model = model.cpu().eval()
    return TrainResult(
        model=model,
        config=config,
        history=history,
        test_accuracy=history[-1].test_acc,
        test_loss=history[-1].test_loss,
        test_size=int(test_x.shape[0]),
        train_size=int(train_x.shape[0]),
        seconds=seconds,
        device=device,
        normalize=normalize,
        data=data,
        torch_version=str(torch.__version__),
        threads=threads,
    )


@contextmanager
def _torch_settings(threads: int | None) -> Iterator[int]:
    """Run with `threads` torch threads (None: torch's) and deterministic cuDNN; yields the thread
    count in use and restores both afterwards."""
    import torch

    old_threads = torch.get_num_threads()
    old_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old_cudnn


def _seeded_net(config: TrainConfig, device: str) -> Any:
    """`Net` initialised under ``manual_seed(config.seed)`` in a forked RNG (the caller's is
    left alone)."""
    import torch

    from bnexport.nets import Net

    fork_devices = [torch.cuda.current_device()] if device == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        return Net(temperature=config.temperature).to(device)


def _fit(
    model: Any,
    train_set: tuple[Any, Any],
    test_set: tuple[Any, Any],
    config: TrainConfig,
    progress: Callable[[TrainEvent], None] | None,
) -> list[EpochStats]:
    """AdamW under OneCycleLR for ``config.epochs`` epochs, evaluated on `test_set` after each."""
    import torch

    gen = torch.Generator().manual_seed(config.seed)
    steps = math.ceil(train_set[0].shape[0] / config.batch_size)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps
    )
    history: list[EpochStats] = []
    for epoch in range(1, config.epochs + 1):
        epoch_start = time.perf_counter()
        train_loss, train_acc = _train_epoch(
            model, train_set, gen, (optimizer, scheduler), config, epoch, progress
        )
        test_loss, test_acc = evaluate(model, *test_set)
        if not math.isfinite(train_loss):
            raise BnexportError(
                f"training diverged in epoch {epoch} (loss {train_loss}) at --lr {config.lr} and "
                f"--temperature {config.temperature:g}; lower --lr, or give a temperature nearer "
                "1 (the shipped model's is 1.5)"
            )
        elapsed = time.perf_counter() - epoch_start
        history.append(EpochStats(epoch, train_loss, train_acc, test_loss, test_acc, elapsed))
        if progress is not None:
            lr = scheduler.get_last_lr()[0]
            progress(
                TrainEvent(
                    "epoch",
                    epoch,
                    config.epochs,
                    steps,
                    steps,
                    train_loss,
                    train_acc,
                    lr,
                    test_loss=test_loss,
                    test_acc=test_acc,
                )
            )
    return history


def _train_epoch(
    model: Any,
    train_set: tuple[Any, Any],
    gen: Any,
    optim: tuple[Any, Any],
    config: TrainConfig,
    epoch: int,
    progress: Callable[[TrainEvent], None] | None,
) -> tuple[float, float]:
    """One epoch over `train_set` in a seeded order with seeded flips: (mean loss, accuracy)."""
    import torch
    from torch import nn

    (xs, ys), (optimizer, scheduler) = train_set, optim
    n, device = xs.shape[0], xs.device
    steps = math.ceil(n / config.batch_size)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    order = torch.randperm(n, generator=gen).to(device)
    flips = (torch.rand(n, generator=gen) < config.flip).to(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for step in range(1, steps + 1):
        idx = order[(step - 1) * config.batch_size : step * config.batch_size]
        xb, yb = xs[idx], ys[idx]
        xb = torch.where(flips[idx][:, None, None, None], xb.flip(-1), xb)
        logits = model(xb)
        loss = loss_fn(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        loss_sum += loss.detach().double() * yb.shape[0]
        correct += (logits.detach().argmax(1) == yb).sum()
        seen += yb.shape[0]
        if progress is not None:
            loss_now, acc_now = float(loss_sum) / seen, int(correct) / seen
            progress(TrainEvent("step", epoch, config.epochs, step, steps, loss_now, acc_now, lr))
    return float(loss_sum) / seen, int(correct) / seen


def evaluate(model: Any, xs: Any, ys: Any, batch_size: int = EVAL_BATCH) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` in eval mode over normalized inputs `xs`."""
    import torch
    from torch.nn import functional as F

    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, xs.shape[0], batch_size):
            logits = model(xs[i : i + batch_size])
            target = ys[i : i + batch_size]
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(1) == target).sum())
    model.train(was_training)
    n = max(int(xs.shape[0]), 1)
    return loss_sum / n, correct / n
