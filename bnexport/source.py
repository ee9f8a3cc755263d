"""Where the model comes from: a seed-`Net` checkpoint, or any model from an import string.

`load_source` is what every command calls first. It returns the model in eval mode, its input shape
and an example input, so fold, export, check and bench treat a user's model like the shipped one.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnexport.data import Normalize
from bnexport.errors import ModelSpecError

EXAMPLE_BATCH = 2
EXAMPLE_SEED = 0


@dataclass
class ModelSource:
    """A model ready to fold, export or check."""

    model: Any  # torch.nn.Module, eval mode
    input_shape: tuple[int, ...]  # without the batch dimension
    example_input: Any  # torch.Tensor, float32, batch EXAMPLE_BATCH
    normalize: Normalize | None
    temperature: float | None
    sha256: str | None
    name: str
    is_net: bool
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def parse_input_shape(text: str) -> tuple[int, ...]:
    """Parse ``"C,H,W"`` (any rank, no batch dimension) into positive ints."""
    parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ModelSpecError(
            f"--input-shape {text!r} is not a comma-separated list of integers (e.g. 3,32,32)"
        ) from None
    if not shape or any(d <= 0 for d in shape):
        raise ModelSpecError(
            f"--input-shape {text!r} needs positive sizes, without the batch dimension"
        )
    return shape


def load_source(
    checkpoint: str | os.PathLike[str] | None,
    *,
    model_spec: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    temperature: float | None = None,
) -> ModelSource:
    """Load the seed `Net` from `checkpoint`, or the model `model_spec` builds (with weights).

    `model_spec` is ``package.module:factory`` (like uvicorn's app strings): `factory` is a callable
    returning an `nn.Module` (or a module instance). The current directory is importable.
    """
    if model_spec is None:
        return _net_source(checkpoint, input_shape, temperature)
    return _user_source(checkpoint, model_spec, input_shape, temperature)


def example_input(input_shape: tuple[int, ...], batch: int = EXAMPLE_BATCH) -> Any:
    """A seeded standard-normal float32 batch, independent of the global RNG."""
    import torch

    gen = torch.Generator().manual_seed(EXAMPLE_SEED)
    return torch.randn((batch, *input_shape), generator=gen, dtype=torch.float32)


def _net_source(
    checkpoint: str | os.PathLike[str] | None,
    input_shape: tuple[int, ...] | None,
    temperature: float | None,
) -> ModelSource:
    from bnexport.checkpoint import load_checkpoint
    from bnexport.nets import INPUT_SHAPE

    if checkpoint is None:
        raise ModelSpecError(
            "give a CHECKPOINT, or --model package.module:factory for your own model"
        )
    if input_shape is not None and tuple(input_shape) != INPUT_SHAPE:
        raise ModelSpecError(
            f"--input-shape {input_shape} does not fit the seed Net, whose input is {INPUT_SHAPE}"
        )
    ckpt = load_checkpoint(checkpoint, temperature=temperature)
    return ModelSource(
        model=ckpt.model,
        input_shape=INPUT_SHAPE,
        example_input=example_input(INPUT_SHAPE),
        normalize=ckpt.normalize,
        temperature=ckpt.temperature,
        sha256=ckpt.sha256,
        name=Path(checkpoint).name,
        is_net=True,
        metadata=ckpt.metadata,
        notes=ckpt.notes,
    )


def _user_source(
    checkpoint: str | os.PathLike[str] | None,
    model_spec: str,
    input_shape: tuple[int, ...] | None,
    temperature: float | None,
) -> ModelSource:
    import torch

    from bnexport.checkpoint import load_state_dict_strict, read_torch_file
    from bnexport.files import sha256_file

    if input_shape is None:
        raise ModelSpecError(
            f"--model {model_spec} needs --input-shape (e.g. 3,32,32; no batch dim)"
        )
    if temperature is not None:
        raise ModelSpecError(
            "--temperature applies to the seed Net's state dicts; set it in your factory instead"
        )
    model = resolve_model(model_spec)
    sha = None
    if checkpoint is not None:
        state = read_torch_file(checkpoint)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ModelSpecError(f"{checkpoint}: expected a state_dict, got {type(state).__name__}")
        load_state_dict_strict(model, state, checkpoint)
        sha = sha256_file(checkpoint)
    model.eval()
    example = example_input(tuple(input_shape))
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:
        raise ModelSpecError(
            f"{model_spec} fails on an input of shape {tuple(example.shape)}: "
            f"{type(exc).__name__}: {exc}; check --input-shape"
        ) from None
    return ModelSource(
        model=model,
        input_shape=tuple(input_shape),
        example_input=example,
        normalize=None,
        temperature=None,
        sha256=sha,
        name=model_spec,
        is_net=False,
    )


def resolve_model(spec: str) -> Any:
    """Import ``package.module:attr[.attr]`` and return the `nn.Module` it is or builds."""
    from torch import nn

    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ModelSpecError(f"--model {spec!r} must look like package.module:factory")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"--model {spec}: cannot import {module_name!r}: {exc}") from None
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelSpecError(
                f"--model {spec}: {module_name} has no attribute {attr_path!r}"
            ) from None
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise ModelSpecError(f"--model {spec}: {attr_path} is neither a module nor a factory")
        try:
            obj = obj()
        except Exception as exc:
            raise ModelSpecError(
                f"--model {spec}: the factory raised {type(exc).__name__}: {exc}"
            ) from None
    if not isinstance(obj, nn.Module):
        raise ModelSpecError(
            f"--model {spec}: the factory returned {type(obj).__name__}, not a torch.nn.Module"
        )
    return obj
