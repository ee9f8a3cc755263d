"""The model's inputs at the tuned batch size, and seeded feeds for them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bnexport.errors import BnexportError

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class ModelInput:
    """One input of the model: its name, its shape without the batch axis, its numpy dtype."""

    name: str
    shape: tuple[int, ...]  # without the batch dimension
    dtype: Any


def model_inputs(session: Any, batch_size: int, where: str) -> list[ModelInput]:
    """The inputs to feed at ``batch_size``: the first axis is the batch, the rest concrete."""
    from bnexport.signature import TensorSpec

    inputs = []
    for node in session.get_inputs():
        spec = TensorSpec.from_ort(node)
        if not spec.shape:
            raise BnexportError(
                f"{where}: input {spec.name!r} is a scalar; tune needs a batch axis on every input"
            )
        if spec.shape[0] is not None and spec.shape[0] != batch_size:
            raise BnexportError(
                f"{where}: input {spec.name!r} has a fixed batch of {spec.shape[0]}, not "
                f"--batch-size {batch_size}; tune at {spec.shape[0]} or re-export with a dynamic "
                "batch axis"
            )
        if any(d is None for d in spec.shape[1:]):
            raise BnexportError(
                f"{where}: input {spec.describe()} has symbolic dimensions besides the batch; "
                "tune needs concrete shapes (re-export with fixed sizes, e.g. bnexport onnx "
                "--input-shape)"
            )
        inputs.append(ModelInput(spec.name, tuple(int(d) for d in spec.shape[1:]), spec.dtype))
    return inputs


def check_feed_memory(inputs: Sequence[ModelInput], batch_size: int) -> None:
    """Refuse a batch whose feed alone would not fit in the memory here (`bnexport.limits`)."""
    import math

    import numpy as np

    from bnexport.limits import check_memory

    needed = sum(batch_size * math.prod(i.shape) * np.dtype(i.dtype).itemsize for i in inputs)
    check_memory(
        needed,
        f"--batch-size {batch_size} (its inputs, "
        + ", ".join(f"{i.name} [{batch_size},{','.join(map(str, i.shape))}]" for i in inputs)
        + ")",
        "tune for a smaller --batch-size",
    )


def make_feeds(inputs: Sequence[ModelInput], count: int, seed: int) -> dict[str, np.ndarray]:
    """``count`` seeded samples per input (`bnexport.parity.inputs.random_inputs`)."""
    from bnexport.parity.inputs import random_inputs

    shapes = {i.name: i.shape for i in inputs}
    dtypes = {i.name: i.dtype for i in inputs}
    return random_inputs(shapes, dtypes, count, seed).arrays
