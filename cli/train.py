"""`bnexport train`: train the seed's Net on Fashion-MNIST and write a bnexport checkpoint."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from bnexport.cli._common import choices, console, handle_errors
from bnexport.defaults import DEFAULT_DEVICE, DEVICE_CHOICES

# Tuned defaults (see models/net.md); keep them equal to bnexport.train.TrainConfig's.
DEFAULT_EPOCHS = 12
DEFAULT_BATCH_SIZE = 128
DEFAULT_LR = 2e-3
DEFAULT_WEIGHT_DECAY = 5e-2
DEFAULT_OUTPUT = Path("models/net.pt")


@handle_errors
def train_cli(
    ctx: typer.Context,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Directory with the Fashion-MNIST IDX files (default: $BNEXPORT_DATA, then "
            "/usr/share/datasets/fashion-mnist).",
            show_default=False,
        ),
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Training epochs.")] = (
        DEFAULT_EPOCHS
    ),
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Batch size.")] = (
        DEFAULT_BATCH_SIZE
    ),
    lr: Annotated[
        float, typer.Option("--lr", help="Peak learning rate of the one-cycle schedule.")
    ] = DEFAULT_LR,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", help="AdamW weight decay (decoupled).")
    ] = DEFAULT_WEIGHT_DECAY,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed for the weights, batch order and flips.")
    ] = 0,
    temperature: Annotated[
        float,
        typer.Option(
            "--temperature", help="Temperature of bn1: y = T * bn(x) (the shipped model uses 1.5)."
        ),
    ] = 1.0,
    device: Annotated[
        str,
        typer.Option(
            "--device",
            help="auto (CUDA if torch sees a GPU), cpu, or cuda (an error if absent).",
            **choices(DEVICE_CHOICES, "--device"),
        ),
    ] = DEFAULT_DEVICE,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, help="Train on the first N training images (quick runs)."),
    ] = None,
    sample: Annotated[
        bool,
        typer.Option(
            "--sample", help="Train and evaluate on the bundled 1000-image sample (demos, tests)."
        ),
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, help="CPU threads for torch (default: torch's choice)."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help=f"Checkpoint to write (atomically). Default: {DEFAULT_OUTPUT}, only if no such "
            "file exists (--force replaces it).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help=f"Without -o, replace an existing {DEFAULT_OUTPUT}."),
    ] = False,
) -> None:
    """Train the seed's Net (AdamW, one-cycle) and save a checkpoint with its metrics.

    The output path is checked before training starts. Without -o, an existing
    models/net.pt (the shipped model, from the repo root) is never overwritten unless --force.
    """
    from bnexport.files import check_output_paths

    output = default_output(force) if output is None else output
    check_output_paths({"-o": output})  # before torch is imported: fails in the first second

    from bnexport import __version__
    from bnexport.checkpoint import save_checkpoint
    from bnexport.train import TrainConfig, train

    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        temperature=temperature,
        device=device,  # type: ignore[arg-type]
        data_dir=data_dir,
        limit=limit,
        use_sample=sample,
        threads=threads,
    )
    with _Progress() as progress:
        result = train(config, progress=progress)

    metadata: dict[str, Any] = {
        "command": _command_line(ctx),
        "seed": seed,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "weight_decay": weight_decay,
        "temperature": temperature,
        "config": config.to_dict(),
        "training_seconds": round(result.seconds, 1),
        "history": [e.to_dict() for e in result.history],
        "test_accuracy": result.test_accuracy,
        "test_loss": result.test_loss,
        "test_size": result.test_size,
        "train_size": result.train_size,
        "data": result.data,
        "device": result.device,
        "threads": result.threads,
        "torch_version": result.torch_version,
        "bnexport_version": __version__,
    }
    sha = save_checkpoint(output, result.model, normalize=result.normalize, metadata=metadata)
    out = console()
    out.print(
        f"test accuracy {result.test_accuracy:.2%} on {result.test_size} images "
        f"({result.data['source']}), {result.seconds:.1f} s on {result.device}"
    )
    out.print(f"wrote {output}  sha256 {sha}")


def default_output(force: bool) -> Path:
    """`DEFAULT_OUTPUT`, unless it exists and `force` is off (then an `OutputPathError`)."""
    from bnexport.errors import OutputPathError

    if DEFAULT_OUTPUT.exists() and not force:
        raise OutputPathError(
            f"{DEFAULT_OUTPUT} exists and train without -o does not overwrite it; give "
            "-o PATH for the new checkpoint, or --force to replace it"
        )
    return DEFAULT_OUTPUT


def _command_line(ctx: typer.Context) -> str:
    """`bnexport train` plus the options given on the command line (defaults are in metadata)."""
    parts = ["bnexport", "train"]
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name) if param.name else None
        if source is None or source.name != "COMMANDLINE":  # typer vendors click: compare names
            continue
        value = ctx.params[param.name]
        flag = max(param.opts, key=len)
        if isinstance(value, bool):
            if value:
                parts.append(flag)
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


class _Progress:
    """Renders `TrainEvent`s on stderr: a bar with running loss/accuracy, a line per epoch."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.err = Console(stderr=True, highlight=False)
        self.bar = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2%}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.err,
            transient=True,
        )
        self.task: Any = None

    def __enter__(self) -> _Progress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def __call__(self, event: Any) -> None:
        label = f"{event.epoch}/{event.epochs}"
        if self.task is None:
            self.task = self.bar.add_task(
                "train", total=event.steps, epoch=label, loss=0.0, acc=0.0
            )
        if event.kind == "step":
            if event.step == 1:
                self.bar.reset(self.task, total=event.steps)
            self.bar.update(
                self.task, completed=event.step, epoch=label, loss=event.loss, acc=event.acc
            )
        else:
            self.bar.console.print(
                f"epoch {label}  train loss {event.loss:.4f}  acc {event.acc:.2%}  "
                f"test loss {event.test_loss:.4f}  acc {event.test_acc:.2%}"
            )
