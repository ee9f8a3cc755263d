"""A model's interface: its forward's parameters, the ONNX names of its inputs and outputs, and how
a PyTorch call's inputs and outputs line up with those names.

A leaf (it imports only `bnexport.errors`): export names the graph's inputs and outputs with it,
`bnexport.source` reads the forward's parameters, and the runners (`bnexport.runners`) feed a
PyTorch module by ONNX input name and name its outputs as the ONNX model does.

ONNX names: the inputs are the forward's positional parameter names; a single output is
``output``, a flat dict's outputs keep its keys, any other structure gives ``output_0``,
``output_1``, … (flattened in `torch.utils._pytree` order).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bnexport.errors import ExportError, ParityInputError

if TYPE_CHECKING:
    import numpy as np

SINGLE_OUTPUT_NAME = "output"

Parameters = list[inspect.Parameter]

# onnxruntime's type strings → the numpy dtype names a runner feeds.
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, shape (``None`` for a symbolic dimension) and dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype

    @classmethod
    def from_ort(cls, node: Any) -> TensorSpec:
        """From an onnxruntime ``NodeArg`` (``session.get_inputs()[i]``)."""
        import numpy as np

        if node.type not in _ORT_DTYPES:
            raise ParityInputError(
                f"ONNX tensor {node.name!r} has type {node.type}, which bnexport check cannot feed"
            )
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in (node.shape or ()))
        return cls(node.name, shape, np.dtype(_ORT_DTYPES[node.type]))

    def describe(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name} [{dims}] {self.dtype}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": str(self.dtype)}


def forward_signature(model: Any) -> tuple[Parameters, Parameters] | None:
    """``(all parameters, positional ones)`` of `model.forward`; None for ``*args`` or a forward
    without a signature."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    kinds = inspect.Parameter
    if any(p.kind == kinds.VAR_POSITIONAL for p in params):
        return None
    positional = [
        p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
    ]
    return params, positional


def forward_parameters(model: Any) -> tuple[tuple[str, ...], int] | None:
    """``(names, required)`` of `model.forward`'s positional parameters; None for ``*args``."""
    signature = forward_signature(model)
    if signature is None:
        return None
    _, positional = signature
    required = sum(p.default is inspect.Parameter.empty for p in positional)
    return tuple(p.name for p in positional), required


def default_input_names(model: Any, count: int) -> tuple[str, ...]:
    """The forward's first `count` positional parameter names (``input_0``, … for ``*args``)."""
    params = forward_parameters(model)
    if params is None:
        return tuple(f"input_{i}" for i in range(count))
    names, _ = params
    if count > len(names):
        raise ExportError(
            f"{count} example inputs, but {type(model).__name__}.forward takes "
            f"{len(names)} positional input(s) ({', '.join(names)})"
        )
    return names[:count]


def default_output_names(out_spec: Any) -> tuple[str, ...]:
    """Output names for a pytree output structure: ``output`` for one tensor, a flat dict's keys,
    else ``output_0``, ``output_1``, … in flattening order."""
    from torch.utils._pytree import tree_unflatten

    n = out_spec.num_leaves
    structure = tree_unflatten(list(range(n)), out_spec)
    if isinstance(structure, int):
        return (SINGLE_OUTPUT_NAME,)
    if isinstance(structure, Mapping) and all(isinstance(v, int) for v in structure.values()):
        return tuple(str(k) for k in structure)
    return tuple(f"output_{i}" for i in range(n))


def match_inputs(onnx_names: Sequence[str], model: Any) -> bool:
    """True to pass inputs by keyword, False by position; ``ParityInputError`` when they can't fit.

    By keyword when every ONNX input name is a parameter of ``model.forward``; else by position,
    which needs as many ONNX inputs as ``forward`` takes (its required ones at least).
    """
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
