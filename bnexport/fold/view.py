"""Reading the traced graph: the module a node calls, its propagated shape and dtype, a
description for the report, and which users read a value (not only its metadata)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

_METADATA_ATTRS = frozenset({"ndim", "shape", "dtype", "device", "is_cuda", "layout"})
_METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "get_device"})
#: Methods whose second argument is read only for its shape or dtype (``y.reshape_as(x)``).
_LIKE_METHODS = frozenset({"reshape_as", "view_as", "expand_as", "type_as"})


def reads_metadata_only(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` reads only ``node``'s shape/rank/dtype/device (``x.ndim``, ``x.size(0)``),
    which a fold never changes — e.g. timm's ``_assert(x.ndim == 4)`` before each BatchNorm."""
    if user.op == "call_function" and user.target is getattr:
        return user.args[0] is node and user.args[1] in _METADATA_ATTRS
    if user.op == "call_method" and user.target in _METADATA_METHODS:
        return user.args[0] is node
    if user.op == "call_method" and user.target in _LIKE_METHODS:
        return user.args[0] is not node and node in user.args[1:]
    return user.op == "call_function" and user.target in (len, torch.numel)


def data_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values (not only its metadata)."""
    return [u for u in node.users if not reads_metadata_only(u, node)]


def tensor_meta(node: Any) -> Any:
    """The node's single-tensor metadata (None for a tuple output, a non-tensor or no meta)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta if hasattr(meta, "shape") else None


class GraphView:
    """Lookups on a shape-propagated GraphModule ``gm``; the module of each ``call_module`` target
    is looked up once (`set_module` when a rewrite installs another)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self._modules: dict[str, nn.Module] = {}  # call_module target → module

    def module(self, node: Any) -> nn.Module | None:
        """The module a ``call_module`` node calls (None for any other node)."""
        if isinstance(node, fx.Node) and node.op == "call_module":
            target = str(node.target)
            if target not in self._modules:
                self._modules[target] = self.gm.get_submodule(target)
            return self._modules[target]
        return None

    def set_module(self, target: str, module: nn.Module) -> None:
        """Record that ``target`` now names ``module``."""
        self._modules[target] = module

    def shape(self, node: Any) -> tuple[int, ...] | None:
        meta = tensor_meta(node)
        return tuple(meta.shape) if meta is not None else None

    def dtype(self, node: Any) -> torch.dtype | None:
        meta = tensor_meta(node)
        return meta.dtype if meta is not None else None

    def describe(self, node: Any) -> str:
        """``relu (ReLU)``, ``add (call_function add)``, ``output`` — for reasons in the report."""
        if not isinstance(node, fx.Node):
            return repr(node)
        if node.op == "call_module":
            return f"{node.target} ({type(self.module(node)).__name__})"
        if node.op in ("placeholder", "output"):
            return f"the model's {'input' if node.op == 'placeholder' else 'output'} ({node.name})"
        target = getattr(node.target, "__name__", str(node.target))
        return f"{node.name} ({node.op.replace('_', ' ')} {target})"

    def users_in_order(self, node: fx.Node) -> list[fx.Node]:
        """``node``'s users in graph order."""
        if len(node.users) <= 1:
            return list(node.users)
        return [n for n in self.gm.graph.nodes if n in node.users]
