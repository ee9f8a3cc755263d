"""Affine steps after a BatchNorm: a mul/div/add/sub/neg node (any spelling: operator, torch
function, tensor method, in place) with a constant scalar or per-channel operand, read as
``z ↦ a·z + b`` (``a``, ``b`` float64 ``[C]``), or the reason it can't join the chain."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from bnexport.errors import FoldError
from bnexport.fold import math as fm
from bnexport.fold.constants import Const, const_of, depends_on_input, fmt_num

_ARITH_FUNCS: dict[Any, tuple[str, bool]] = {
    operator.mul: ("mul", False),
    operator.truediv: ("div", False),
    operator.add: ("add", False),
    operator.sub: ("sub", False),
    operator.neg: ("neg", False),
    operator.imul: ("mul", True),
    operator.itruediv: ("div", True),
    operator.iadd: ("add", True),
    operator.isub: ("sub", True),
    torch.mul: ("mul", False),
    torch.multiply: ("mul", False),
    torch.div: ("div", False),
    torch.divide: ("div", False),
    torch.true_divide: ("div", False),
    torch.add: ("add", False),
    torch.sub: ("sub", False),
    torch.subtract: ("sub", False),
    torch.neg: ("neg", False),
    torch.negative: ("neg", False),
}
_ARITH_METHODS: dict[str, str] = {
    "mul": "mul",
    "multiply": "mul",
    "div": "div",
    "divide": "div",
    "true_divide": "div",
    "add": "add",
    "sub": "sub",
    "subtract": "sub",
    "neg": "neg",
    "negative": "neg",
}


def arith_op(node: fx.Node) -> tuple[str, bool] | None:
    """``(op, in_place)`` for a mul/div/add/sub/neg node in any spelling, else None."""
    if node.op == "call_function" and node.target in _ARITH_FUNCS:
        return _ARITH_FUNCS[node.target]
    if node.op == "call_method" and isinstance(node.target, str):
        name = node.target
        inplace = name.endswith("_")
        op = _ARITH_METHODS.get(name.removesuffix("_") if inplace else name)
        if op is not None:
            return op, inplace
    return None


@dataclass
class Step:
    """One affine step ``z ↦ a·z + b`` (``a``, ``b`` float64 ``[C]``) and its report label."""

    a: torch.Tensor
    b: torch.Tensor
    label: str
    const: Const | None


@dataclass
class Stop:
    """An arithmetic op after the BN that can't join the chain, and why (it stays in the graph)."""

    reason: str


def operands(node: fx.Node) -> tuple[Any, Any, dict[str, Any]]:
    """An arithmetic node's first and second operands and its other keyword arguments (a third
    positional argument is ``alpha``)."""
    args = list(node.args)
    kwargs = dict(node.kwargs)
    first = args.pop(0) if args else kwargs.pop("input", kwargs.pop("self", None))
    other = args.pop(0) if args else kwargs.pop("other", None)
    if args:
        kwargs["alpha"] = args.pop(0)
    return first, other, kwargs


def writes_into(node: fx.Node, x: fx.Node) -> bool:
    """Whether ``node`` is an in-place arithmetic op overwriting ``x`` (like ``x.mul_(c)``)."""
    found = arith_op(node)
    return found is not None and found[1] and operands(node)[0] is x


def affine_step(
    node: fx.Node,
    x: fx.Node,
    gm: fx.GraphModule,
    shape: Sequence[int],
    dtype: torch.dtype,
    bn_name: str,
) -> Step | Stop | None:
    """``node`` as an affine step of ``x`` with a constant scalar/per-channel operand.

    None: not arithmetic (the chain simply ends). `Stop`: arithmetic that can't fold, with the
    reason. A non-finite constant or a division by zero raises `FoldError` naming the BN and the
    node.
    """
    found = arith_op(node)
    if found is None:
        return None
    op, inplace = found
    where = f"{node.name} ({op})"
    first, other, kwargs = operands(node)
    stop = _unfoldable_call(node, where, kwargs, shape, dtype)
    if stop is not None:
        return stop
    ones = torch.ones(int(shape[1]), dtype=torch.float64)
    if op == "neg":
        return Step(-ones, 0 * ones, "neg", None) if first is x else None
    if (first is x) == (other is x):
        return Stop(f"{where} uses the BatchNorm output as both operands (not affine)")
    x_first = first is x
    if inplace and not x_first:
        return Stop(f"{where} writes in place into its other operand")
    c_arg = other if x_first else first
    c = const_of(c_arg, gm)
    if c is None and op in ("add", "sub"):
        return None  # e.g. a residual connection: the chain just ends here
    if c is None:
        what = c_arg.name if isinstance(c_arg, fx.Node) else repr(c_arg)
        why = (
            "it depends on the model's input"
            if depends_on_input(c_arg)
            else "bnexport can't evaluate it at fold time: a random or in-place op computes it"
        )
        return Stop(f"{where}: its other operand {what} is not constant ({why}), so it can't fold")
    vec = _per_channel(c, node, op, where, shape, bn_name)
    if isinstance(vec, Stop):
        return vec
    return _constant_step(op, x_first, vec, c, float(kwargs.get("alpha", 1)), where, node, bn_name)


def _unfoldable_call(
    node: fx.Node, where: str, kwargs: dict[str, Any], shape: Sequence[int], dtype: torch.dtype
) -> Stop | None:
    """Why an arithmetic call can't be an affine step whatever its operands (``out=``, a rounding
    mode, a non-constant alpha, a new shape or dtype); None if it can."""
    if kwargs.get("out") is not None:
        return Stop(f"{where} writes to out=")
    if kwargs.get("rounding_mode") is not None:
        return Stop(f"{where} uses rounding_mode={kwargs['rounding_mode']!r}: not affine")
    alpha = kwargs.get("alpha", 1)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        return Stop(f"{where} has a non-constant alpha")
    meta = node.meta.get("tensor_meta")
    if meta is None or tuple(meta.shape) != tuple(shape):
        return Stop(f"{where} changes the shape {list(shape)}")
    if meta.dtype != dtype:
        return Stop(
            f"{where} changes the dtype from {str(dtype).removeprefix('torch.')} to "
            f"{str(meta.dtype).removeprefix('torch.')} (a constant of another dtype)"
        )
    return None


def _per_channel(
    c: Const, node: fx.Node, op: str, where: str, shape: Sequence[int], bn_name: str
) -> torch.Tensor | Stop:
    """The constant as a float64 ``[C]`` vector along dim 1 of ``shape``; `Stop` if it isn't
    scalar or per-channel; `FoldError` if it is non-finite."""
    vec = fm.per_channel(c.value, shape)
    if vec is None:
        return Stop(
            f"{where}: constant {c.label} (shape {list(c.value.shape)}) is not a scalar or a "
            f"per-channel [C] value along dim 1 of the {list(shape)} output"
        )
    bad = ~torch.isfinite(vec)
    if bool(bad.any()):
        raise FoldError(
            f"BatchNorm {bn_name!r}: the constant {c.label} in {node.name} ({op}) after it is "
            f"non-finite at {fm.offenders(bad, vec)}; fix: give it a finite value (e.g. a finite "
            "temperature)"
        )
    return vec


def _constant_step(
    op: str,
    x_first: bool,
    vec: torch.Tensor,
    c: Const,
    alpha: float,
    where: str,
    node: fx.Node,
    bn_name: str,
) -> Step | Stop:
    """The step of ``x op c`` (``x_first``) or ``c op x`` with the per-channel constant ``vec``
    (``alpha`` scales the constant of add/sub)."""
    ones = torch.ones_like(vec)
    zero = 0 * ones
    if op == "mul":
        return Step(vec, zero, f"×{c.label}", c)
    if op == "div":
        if not x_first:
            return Stop(f"{where}: {c.label} / x is not affine in x, so it can't fold")
        if bool((vec == 0).any()):
            raise FoldError(
                f"BatchNorm {bn_name!r}: {node.name} divides by {c.label}, which is zero at "
                f"{fm.offenders(vec == 0, vec)}; fix: the model's output is infinite there — "
                "use a nonzero divisor"
            )
        return Step(1 / vec, zero, f"÷{c.label}", c)
    alpha_txt = "" if alpha == 1 else f"{fmt_num(alpha)}·"
    if op == "add":
        if x_first:
            return Step(ones, alpha * vec, f"+{alpha_txt}{c.label}", c)
        return Step(alpha * ones, vec, f"{c.label}+{alpha_txt}x", c)
    if x_first:
        return Step(ones, -alpha * vec, f"−{alpha_txt}{c.label}", c)
    return Step(-alpha * ones, vec, f"{c.label}−{alpha_txt}x", c)
