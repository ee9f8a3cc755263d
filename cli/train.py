"""`bnexport train`: train the seed's Net on Fashion-MNIST and write a bnexport checkpoint."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from bnexport.cli.errors import handle_errors
from bnexport.cli.options import choices
from bnexport.cli.progress import TrainProgress
from bnexport.cli.render import console
from bnexport.defaults import (
    DEFAULT_DEVICE,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_TEMPERATURE,
    DEFAULT_TRAIN_SEED,
    DEFAULT_WEIGHT_DECAY,
    DEVICE_CHOICES,
)
from bnexport.defaults import DEFAULT_TRAIN_BATCH_SIZE as DEFAULT_BATCH_SIZE

DEFAULT_OUTPUT = Path("models/net.pt")

DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Directory with the Fashion-MNIST IDX files (default: $BNEXPORT_DATA, then "
        "/usr/share/datasets/fashion-mnist).",
        show_default=False,
    ),
]
EpochsOpt = Annotated[int, typer.Option("--epochs", min=1, help="Training epochs.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Batch size.")]
LrOpt = Annotated[float, typer.Option("--lr", help="Peak learning rate of the one-cycle schedule.")]
WeightDecayOpt = Annotated[
    float, typer.Option("--weight-decay", help="AdamW weight decay (decoupled).")
]
SeedOpt = Annotated[
    int, typer.Option("--seed", help="Seed for the weights, batch order and flips.")
]
TemperatureOpt = Annotated[
    float,
    typer.Option(
        "--temperature", help="Temperature of bn1: y = T * bn(x) (the shipped model uses 1.5)."
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        help="auto (CUDA if torch sees a GPU), cpu, or cuda (an error if absent).",
        **choices(DEVICE_CHOICES, "--device"),
    ),
]
LimitOpt = Annotated[
    int | None,
    typer.Option("--limit", min=1, help="Train on the first N training images (quick runs)."),
]
SampleOpt = Annotated[
    bool,
    typer.Option(
        "--sample", help="Train and evaluate on the bundled 1000-image sample (demos, tests)."
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", min=1, help="CPU threads for torch (default: torch's choice)."),
]
OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "-o",
        "--output",
        help=f"Checkpoint to write (atomically). Default: {DEFAULT_OUTPUT}, only if no such "
        "file exists (--force replaces it).",
        show_default=False,
    ),
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help=f"Without -o, replace an existing {DEFAULT_OUTPUT}.")
]


@handle_errors
def train_cli(
    ctx: typer.Context,
    data_dir: DataDirOpt = None,
    epochs: EpochsOpt = DEFAULT_EPOCHS,
    batch_size: BatchSizeOpt = DEFAULT_BATCH_SIZE,
    lr: LrOpt = DEFAULT_LR,
    weight_decay: WeightDecayOpt = DEFAULT_WEIGHT_DECAY,
    seed: SeedOpt = DEFAULT_TRAIN_SEED,
    temperature: TemperatureOpt = DEFAULT_TEMPERATURE,
    device: DeviceOpt = DEFAULT_DEVICE,
    limit: LimitOpt = None,
    sample: SampleOpt = False,
    threads: ThreadsOpt = None,
    output: OutputOpt = None,
    force: ForceOpt = False,
) -> None:
    """Train the seed's Net (AdamW, one-cycle) and save a checkpoint with its metrics.

    The output path is checked before training starts. Without -o, an existing
    models/net.pt (the shipped model, from the repo root) is never overwritten unless --force.
    """
    from bnexport.files import check_output_paths

    output = default_output(force) if output is None else output
    check_output_paths({"-o": output})  # before torch is imported: fails in the first second

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
    with TrainProgress() as progress:
        result = train(config, progress=progress)
    metadata = _metadata(_command_line(ctx), result)
    sha = save_checkpoint(output, result.model, normalize=result.normalize, metadata=metadata)
    _render(result, output, sha)


def _metadata(command: str, result: Any) -> dict[str, Any]:
    """The checkpoint's metadata: the command, the config, the history and the test metrics."""
    from bnexport import __version__

    config = result.config
    return {
        "command": command,
        "seed": config.seed,
        "epochs": config.epochs,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "weight_decay": config.weight_decay,
        "temperature": config.temperature,
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


def _render(result: Any, output: Path, sha: str) -> None:
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
