"""Runners: each turns a feed (ONNX input name → array) into outputs (ONNX output name → array).

Named ``<Backend>Runner`` (Polygraphy's convention), configured once and reused across batch sizes:

- :class:`TorchRunner` — a PyTorch module on the CPU under ``torch.inference_mode``: the fp32
  reference, the float64 ground truth, the folded model.
- :class:`OnnxRuntimeRunner` — one onnxruntime session (CPU at an optimization level, or CUDA with
  or without TF32), created once through :func:`bnexport.ort.make_session`.

Each runner knows its tolerance ``kind`` (see :mod:`bnexport.parity.tolerance`) and whether it
``gates`` the check (a failing non-gating runner is reported, never fails the run).
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bnexport.errors import ParityInputError
from bnexport.ort import SessionConfig, make_session
from bnexport.parity.inputs import TensorSpec

REFERENCE_NAME = "torch-fp32"


class Runner:
    """Base class: ``infer(feed) -> outputs``; ``info()`` describes the runner for reports."""

    name: str
    kind: str
    gating: bool
    description: str

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "gating": self.gating,
            "description": self.description,
        }


class TorchRunner(Runner):
    """Runs a PyTorch module on the CPU (``inference_mode``, eval) in fp32 or float64.

    Inputs are passed by keyword when every ONNX input name is a parameter of ``forward``, else by
    position in ONNX order. Outputs (a tensor, or a tuple/list/dict of them) are flattened and
    named by the ONNX output names — by key when a dict's keys are those names, else by order.
    """

    def __init__(
        self,
        model: Any,
        input_names: Sequence[str],
        output_names: Sequence[str],
        *,
        name: str = REFERENCE_NAME,
        dtype: str = "float32",
        kind: str = "torch",
        gating: bool = True,
        description: str = "",
        copy_model: bool = False,
    ) -> None:
        import torch

        self.name = name
        self.kind = kind
        self.gating = gating
        self.dtype = dtype
        self._torch_dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
        if copy_model or dtype != "float32":
            model = copy.deepcopy(model)
        self.model = model.to(self._torch_dtype) if dtype != "float32" else model
        self.model.eval()
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        self.by_name = match_inputs(self.input_names, self.model)
        self.description = description or f"PyTorch {dtype} on the CPU"

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        # Copies: a model that writes into its input must not change what the next runner sees.
        tensors = {
            name: torch.from_numpy(np.array(feed[name], copy=True)).to(self._torch_dtype)
            if np.issubdtype(feed[name].dtype, np.floating)
            else torch.from_numpy(np.array(feed[name], copy=True))
            for name in self.input_names
        }
        with torch.inference_mode():
            if self.by_name:
                out = self.model(**tensors)
            else:
                out = self.model(*(tensors[n] for n in self.input_names))
        return name_outputs(out, self.output_names, self.name)

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "dtype": self.dtype,
            "inputs_by": "name" if self.by_name else "position",
        }


class OnnxRuntimeRunner(Runner):
    """One onnxruntime session, created once (``make_session`` refuses silent CUDA fallback)."""

    def __init__(
        self,
        model: str | os.PathLike[str] | bytes,
        config: SessionConfig,
        *,
        name: str,
        kind: str,
        gating: bool = True,
        description: str = "",
    ) -> None:
        self.name = name
        self.kind = kind
        self.gating = gating
        self.config = config
        self.session = make_session(model, config)
        self.input_specs = tuple(TensorSpec.from_ort(n) for n in self.session.get_inputs())
        self.output_specs = tuple(TensorSpec.from_ort(n) for n in self.session.get_outputs())
        self.output_names = tuple(s.name for s in self.output_specs)
        self.description = description or (
            f"onnxruntime {config.provider.upper()}, graph optimizations "
            f"{config.graph_optimization_level}"
        )

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(None, dict(feed))
        return dict(zip(self.output_names, outs, strict=True))

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "provider": self.config.provider,
            "graph_optimization_level": self.config.graph_optimization_level,
            "session_providers": list(self.session.get_providers()),
            "provider_options": self.config.resolved_provider_options(),
            "session_config": self.config.to_dict(),
        }


def match_inputs(onnx_names: Sequence[str], model: Any) -> bool:
    """True to pass inputs by keyword, False by position; ``ParityInputError`` when they can't fit.

    By keyword when every ONNX input name is a parameter of ``model.forward``; else by position,
    which needs as many ONNX inputs as ``forward`` takes (its required ones at least).
    """
    from bnexport.export import forward_signature

    signature = forward_signature(model)
    if signature is None:
        return False
    params, positional = signature
    kinds = inspect.Parameter
    keyword_ok = {
        p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)
    }
    if all(n in keyword_ok for n in onnx_names):
        return True
    required = [p for p in positional if p.default is inspect.Parameter.empty]
    if len(required) <= len(onnx_names) <= len(positional):
        return False
    raise ParityInputError(
        f"the ONNX model has {len(onnx_names)} input(s) {list(onnx_names)} but the PyTorch "
        f"model's forward takes {[p.name for p in positional]} "
        f"({len(required)} required); they must match by name or by order"
    )


def flatten_outputs(out: Any) -> list[tuple[str | None, Any]]:
    """A model's output as ``[(key or None, tensor), …]`` in order (nested tuples/lists/dicts)."""
    import torch

    if isinstance(out, torch.Tensor):
        return [(None, out)]
    if isinstance(out, Mapping):
        items: list[tuple[str | None, Any]] = []
        for key, value in out.items():
            sub = flatten_outputs(value)
            items += [(str(key) if len(sub) == 1 else k, t) for k, t in sub]
        return items
    if isinstance(out, (tuple, list)):
        return [item for value in out for item in flatten_outputs(value)]
    raise ParityInputError(
        f"the PyTorch model returned {type(out).__name__}; bnexport check compares tensors "
        "(or tuples, lists and dicts of them)"
    )


def name_outputs(out: Any, output_names: Sequence[str], runner: str) -> dict[str, np.ndarray]:
    """Name a PyTorch model's outputs with the ONNX output names (by key, else by order)."""
    items = flatten_outputs(out)
    if len(items) != len(output_names):
        raise ParityInputError(
            f"{runner}: the PyTorch model returns {len(items)} output(s) but the ONNX model has "
            f"{len(output_names)} {list(output_names)}"
        )
    keys = [k for k, _ in items]
    if all(k is not None for k in keys) and sorted(keys) == sorted(output_names):  # type: ignore[type-var]
        by_key = dict(items)
        return {n: by_key[n].detach().cpu().numpy() for n in output_names}
    return {n: t.detach().cpu().numpy() for n, (_, t) in zip(output_names, items, strict=True)}
