"""Faults injected into a correct export, shared by the fault tests and
``scripts/parity_separation.py``: edits of an ONNX file's conv initializers (one output channel
scaled, one bias nudged, a kernel transposed, a NaN) and fold mutants (no eps, no temperature).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import numpy as np
import onnx
import torch
from onnx import numpy_helper

import bnexport.fold.math as fold_math

#: The relative change whose measured effect calibrates a fault to a multiple of the noise floor.
CALIBRATION_STEP = 1e-2


class ConvInitializers:
    """An ONNX model's conv weight initializers (in graph order) and their biases, with edits
    that return the serialized model with one initializer changed."""

    def __init__(self, data: bytes) -> None:
        self.proto = onnx.load_model_from_string(data)
        inits = {i.name: i for i in self.proto.graph.initializer}
        self.weights: list[str] = []
        self.biases: dict[str, str] = {}
        for node in self.proto.graph.node:
            if node.op_type == "Conv" and node.input[1] in inits:
                if node.input[1] not in self.weights:
                    self.weights.append(node.input[1])
                if len(node.input) > 2 and node.input[2] in inits:
                    self.biases[node.input[1]] = node.input[2]
        self.arrays = {n: numpy_helper.to_array(inits[n]) for n in self.weights}

    @property
    def middle(self) -> str:
        """The conv weight halfway through the graph."""
        return self.weights[len(self.weights) // 2]

    def edited(self, name: str, edit: Callable[[np.ndarray], np.ndarray]) -> bytes:
        """The model with initializer ``name`` replaced by ``edit(its array)``."""
        proto = copy.deepcopy(self.proto)
        for init in proto.graph.initializer:
            if init.name == name:
                array = edit(numpy_helper.to_array(init).copy())
                init.CopyFrom(numpy_helper.from_array(array, name))
        return proto.SerializeToString()

    def channel_scaled(self, delta: float) -> bytes:
        """The middle conv's output channel 0 scaled by ``1 + delta``."""

        def edit(w: np.ndarray) -> np.ndarray:
            w[0] *= np.float32(1 + delta)
            return w

        return self.edited(self.middle, edit)

    def bias_nudged(self, delta: float) -> bytes:
        """The middle biased conv's bias 0 moved by ``delta`` × max(1, max|bias|)."""
        with_bias = [w for w in self.weights if w in self.biases]
        name = self.biases[with_bias[len(with_bias) // 2]]

        def edit(b: np.ndarray) -> np.ndarray:
            b[0] += np.float32(delta * max(1.0, float(np.abs(b).max())))
            return b

        return self.edited(name, edit)

    def transposed(self) -> bytes:
        """The middle conv kernel with a spatial extent has its last two axes swapped."""
        spatial = [w for w in self.weights if self.arrays[w].shape[-1] > 1]
        name = spatial[len(spatial) // 2]
        return self.edited(name, lambda w: np.ascontiguousarray(w.swapaxes(-1, -2)))

    def nan(self) -> bytes:
        """The middle conv's first weight set to NaN."""

        def edit(w: np.ndarray) -> np.ndarray:
            w.reshape(-1)[0] = np.nan
            return w

        return self.edited(self.middle, edit)


def calibrated(measure: Callable[[float], float], target: float) -> tuple[float, float]:
    """``(δ, effect at δ)``: ``measure(δ)`` (a fault's effect as a multiple of the noise floor,
    linear in a small δ) at ``CALIBRATION_STEP``, then at the δ scaled to ``target``."""
    first = measure(CALIBRATION_STEP)
    delta = CALIBRATION_STEP * target / max(first, 1e-300)
    return delta, measure(delta)


@contextlib.contextmanager
def fold_without_eps() -> Iterator[None]:
    """Folds made inside the block ignore each BatchNorm's eps (a classic folding bug)."""
    original = fold_math.bn_affine

    def no_eps(mean, var, eps, weight=None, bias=None):  # type: ignore[no-untyped-def]
        return original(mean, var, 0.0, weight, bias)

    fold_math.bn_affine = no_eps  # type: ignore[assignment]
    try:
        yield
    finally:
        fold_math.bn_affine = original  # type: ignore[assignment]


def set_temperature(model: torch.nn.Module, value: float) -> None:
    """Set every ``temperature`` attribute (float or tensor) of ``model``'s modules to ``value``."""
    for m in model.modules():
        if isinstance(getattr(m, "temperature", None), float | int):
            m.temperature = value
        elif isinstance(getattr(m, "temperature", None), torch.Tensor):
            with torch.no_grad():
                m.temperature.fill_(value)
