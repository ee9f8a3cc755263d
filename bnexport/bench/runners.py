"""Runners: one candidate each, ``prepare(batch) -> call``, the call being what is timed."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch


class Runner(Protocol):
    """One candidate: ``prepare`` binds a float32 batch and returns the call to time."""

    name: str

    def prepare(self, batch: np.ndarray) -> Callable[[], Any]: ...


class TorchRunner:
    """PyTorch eager, ``inference_mode``, on CPU."""

    def __init__(self, name: str, module: torch.nn.Module) -> None:
        self.name = name
        self.module = module

    def prepare(self, batch: np.ndarray) -> Callable[[], Any]:
        import torch

        x = torch.from_numpy(batch)
        module = self.module

        def call() -> Any:
            with torch.inference_mode():
                return module(x)

        return call


class OrtRunner:
    """An onnxruntime ``InferenceSession``, called the way users call it: ``session.run``."""

    def __init__(self, name: str, session: Any) -> None:
        self.name = name
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def prepare(self, batch: np.ndarray) -> Callable[[], Any]:
        feed = {self.input_name: batch}
        run = self.session.run

        def call() -> Any:
            return run(None, feed)

        return call
