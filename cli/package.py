"""`bnexport package`: one model folder that Triton and MLServer both load unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from bnexport.cli.errors import handle_errors
from bnexport.cli.render import console
from bnexport.serving.defaults import (
    DEFAULT_INSTANCES,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_QUEUE_DELAY_US,
    DEFAULT_VERSION,
)


@handle_errors
def package_cli(
    model: Annotated[Path, typer.Argument(help="The ONNX file to serve.", show_default=False)],
    repository: Annotated[
        Path,
        typer.Option(
            "--repository",
            "-r",
            help="The model repository folder to write into.",
            show_default=False,
        ),
    ],
    name: Annotated[
        str | None,
        typer.Option(
            "--name", help="The model's name (default: the file's stem).", show_default=False
        ),
    ] = None,
    version: Annotated[
        int, typer.Option("--version", min=1, help="The version folder.")
    ] = DEFAULT_VERSION,
    max_batch_size: Annotated[
        int,
        typer.Option(
            "--max-batch-size",
            min=0,
            help="Largest batch the server may form from requests (0: no batching).",
        ),
    ] = DEFAULT_MAX_BATCH_SIZE,
    queue_delay_us: Annotated[
        int,
        typer.Option(
            "--queue-delay-us", min=0, help="How long the batcher waits to fill a batch, in µs."
        ),
    ] = DEFAULT_QUEUE_DELAY_US,
    instances: Annotated[
        int, typer.Option("--instances", min=1, help="Model instances (Triton's count).")
    ] = DEFAULT_INSTANCES,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing model folder of that name.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Write MODEL into a Triton/MLServer model repository: config.pbtxt (validated with Triton's
    schema), configs/gpu.pbtxt, model-settings.json and VERSION/model.onnx."""
    from bnexport.serving.package import PackageConfig, package_model

    config = PackageConfig(
        model, repository, name, version, max_batch_size, instances, queue_delay_us, force
    )
    result = package_model(config)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    out = console()
    verb = "replaced" if result.replaced else "wrote"
    out.print(f"{verb} model {result.name!r} in {result.folder}", markup=False, highlight=False)
    for tensor in result.io.inputs:
        out.print(f"  input  {tensor.describe()}", markup=False, highlight=False)
    for tensor in result.io.outputs:
        out.print(f"  output {tensor.describe()}", markup=False, highlight=False)
    batching = (
        f"dynamic batching up to {result.max_batch_size} rows, {queue_delay_us} µs queue delay"
        if result.max_batch_size
        else "no batching (max_batch_size 0)"
    )
    tuned = (
        f"tuned: {result.settings_label()}"
        if result.settings
        else "untuned: onnxruntime's default session options"
    )
    for line in (batching, tuned):
        out.print(f"  {line}", markup=False, highlight=False)
    for note in result.notes:
        out.print(f"note: {note}", markup=False, highlight=False)
    out.print(
        f"serve it: bnexport serve {result.folder.parent}  |  tritonserver "
        f"--model-repository {result.folder.parent}",
        markup=False,
        highlight=False,
    )
