"""Reshapes between a layer and a BatchNorm that keep the channel axis.

timm LeViT's ``LinearNorm`` computes ``bn(linear(x).flatten(0, 1)).reshape_as(x)``: the BatchNorm1d
normalizes dim 1 of ``[N·T, C]``, which is the Linear's feature axis of ``[N, T, C]`` moved by a
reshape. A BatchNorm folds across such ops (flatten/reshape/view/permute/transpose/squeeze…) when
every element keeps its channel: the fold rules check it by pushing a tensor of channel indices
through the ops (each reshape is row-major, so the shapes the graph propagated say everything)
and comparing it with the channel index on the other side. The ops stay in the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.fx as fx

from bnexport.fold.view import GraphView, data_users

#: Methods and functions that only rearrange elements, row-major, into the shape the graph shows.
_RESHAPE_METHODS = frozenset(
    {
        "flatten",
        "reshape",
        "view",
        "reshape_as",
        "view_as",
        "contiguous",
        "unsqueeze",
        "squeeze",
        "unflatten",
    }
)
_RESHAPE_FUNCS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten)
#: Methods and functions that move axes; replayed with their own constant arguments.
_MOVE_METHODS = frozenset({"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"})
_MOVE_FUNCS = (torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim)

#: The longest run of layout ops followed between a layer and a BatchNorm.
MAX_LAYOUT_OPS = 8


def is_layout_op(node: object) -> bool:
    """A reshape/permute-like call whose first argument is the tensor it rearranges."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method":
        return node.target in _RESHAPE_METHODS or node.target in _MOVE_METHODS
    return node.op == "call_function" and node.target in (*_RESHAPE_FUNCS, *_MOVE_FUNCS)


def walk_back(node: fx.Node | None) -> tuple[fx.Node | None, list[fx.Node]]:
    """From a BatchNorm's input back through layout ops: the node they start from and the ops in
    graph order (empty when ``node`` is no layout op)."""
    path: list[fx.Node] = []
    while node is not None and is_layout_op(node) and len(path) < MAX_LAYOUT_OPS:
        path.insert(0, node)
        arg = node.args[0]
        node = arg if isinstance(arg, fx.Node) else None
    return node, path


def walk_forward(node: fx.Node) -> tuple[fx.Node | None, list[fx.Node]]:
    """From a BatchNorm chain's end forward through layout ops, each the one data user of the
    value before it: the ops and the first node that is none (None if the value branches)."""
    path: list[fx.Node] = []
    while len(path) < MAX_LAYOUT_OPS:
        users = data_users(node)
        if len(users) != 1:
            return None, path
        (user,) = users
        if not (is_layout_op(user) and user.args[0] is node):
            return user, path
        path.append(user)
        node = user
    return None, path


def _replay(view: GraphView, op: fx.Node, tag: torch.Tensor) -> torch.Tensor | None:
    """``op`` applied to ``tag``: a reshape to the shape the graph shows, or the axis move with
    its constant arguments; None if it can't be replayed."""
    shape = view.shape(op)
    if shape is None:
        return None
    name = op.target if op.op == "call_method" else getattr(op.target, "__name__", "")
    if name in _MOVE_METHODS or op.target in _MOVE_FUNCS:
        args = op.args[1:]
        if any(isinstance(a, fx.Node) for a in (*args, *op.kwargs.values())):
            return None
        move = getattr(tag, str(name)) if op.op == "call_method" else partial(op.target, tag)
        try:
            out = move(*args, **op.kwargs)
        except (RuntimeError, TypeError, IndexError):
            return None
        return out if tuple(out.shape) == tuple(shape) else None
    if tag.numel() != torch.Size(shape).numel():
        return None
    return tag.reshape(shape)


def channel_index(shape: Sequence[int], axis: int) -> torch.Tensor:
    """A tensor of ``shape`` whose every element is its index along ``axis``."""
    axis = axis % len(shape)
    view = [1] * len(shape)
    view[axis] = int(shape[axis])
    return torch.arange(int(shape[axis]), dtype=torch.int32).reshape(view).expand(*shape)


def keeps_channels(
    view: GraphView, start: fx.Node, axis: int, path: Sequence[fx.Node], end_axis: int
) -> bool:
    """Whether the element at channel ``c`` of ``start``'s output (along ``axis``) is at channel
    ``c`` along ``end_axis`` after the layout ops ``path``: a per-channel scale/shift commutes with
    them."""
    shape = view.shape(start)
    if shape is None or len(shape) == 0 or not -len(shape) <= axis < len(shape):
        return False
    tag: torch.Tensor | None = channel_index(shape, axis)
    for op in path:
        tag = _replay(view, op, tag) if tag is not None else None
    if tag is None or tag.dim() == 0 or not -tag.dim() <= end_axis < tag.dim():
        return False
    want = channel_index(tuple(tag.shape), end_axis)
    return tag.shape[end_axis] == shape[axis] and bool(torch.equal(tag, want))


def describe_path(path: Sequence[fx.Node]) -> str:
    """``flatten_1 → reshape_as`` (for reasons in the report)."""
    return " → ".join(n.name for n in path)
