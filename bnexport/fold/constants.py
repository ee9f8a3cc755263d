"""Values known at fold time: a graph value computed only from numbers, parameters, buffers and
tensor constants (``self.log_t.exp()``), evaluated in float64 with the nodes that compute it."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

#: Pure functions of constants that `const_of` evaluates (elementwise math and reshapes).
_PURE_FUNCS: dict[Any, str] = {
    operator.mul: "mul",
    operator.truediv: "div",
    operator.add: "add",
    operator.sub: "sub",
    operator.neg: "neg",
    operator.pow: "pow",
    torch.mul: "mul",
    torch.div: "div",
    torch.add: "add",
    torch.sub: "sub",
    torch.neg: "neg",
    torch.exp: "exp",
    torch.log: "log",
    torch.sqrt: "sqrt",
    torch.rsqrt: "rsqrt",
    torch.reciprocal: "reciprocal",
    torch.abs: "abs",
    torch.sigmoid: "sigmoid",
    torch.pow: "pow",
    torch.reshape: "reshape",
    torch.unsqueeze: "unsqueeze",
    F.softplus: "softplus",
}
_PURE_METHODS = frozenset(
    {
        "exp",
        "log",
        "sqrt",
        "rsqrt",
        "reciprocal",
        "abs",
        "neg",
        "sigmoid",
        "pow",
        "mul",
        "div",
        "add",
        "sub",
        "view",
        "reshape",
        "unsqueeze",
        "squeeze",
        "flatten",
        "detach",
        "clone",
        "contiguous",
    }
)


def fetch_attr(root: nn.Module, target: str) -> Any:
    """The attribute at the dotted path ``target`` under ``root`` (AttributeError if none)."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def has_path(root: nn.Module, path: str) -> bool:
    """Whether the dotted ``path`` names an attribute under ``root``."""
    try:
        fetch_attr(root, path)
    except AttributeError:
        return False
    return True


def fmt_num(v: float) -> str:
    """A number as the report shows it (6 significant digits)."""
    return f"{v:.6g}"


def float64_copy(t: torch.Tensor, memo: dict[int, torch.Tensor]) -> torch.Tensor:
    """``t`` in float64, converted once per tensor: ``memo`` maps tensor id → copy (the caller
    keeps ``t`` alive while the memo is used). A float64 tensor is itself."""
    if t.dtype == torch.float64:
        return t
    if id(t) not in memo:
        memo[id(t)] = t.detach().double()
    return memo[id(t)]


@dataclass
class Const:
    """A value known at fold time: ``value`` in float64, a label for the report, the nodes computing
    it (removed once unused) and the learnable parameters it was read from."""

    value: torch.Tensor
    label: str
    nodes: list[fx.Node] = field(default_factory=list)
    params: list[str] = field(default_factory=list)


def const_of(arg: Any, gm: fx.GraphModule, depth: int = 0) -> Const | None:
    """``arg`` as a constant: a Python number, a ``get_attr`` buffer/parameter/tensor constant, or a
    pure elementwise/reshape op of constants (``self.log_t.exp()``). None if it depends on an input.
    """
    if isinstance(arg, bool | int | float):
        return Const(torch.tensor(float(arg), dtype=torch.float64), fmt_num(float(arg)))
    if not isinstance(arg, fx.Node) or depth > 8 or _written_in_place(arg):
        return None
    if arg.op == "get_attr":
        return _attr_const(arg, gm)
    if arg.op == "call_function" and arg.target in _PURE_FUNCS:
        fn: Any = arg.target
        name = _PURE_FUNCS[arg.target]
    elif arg.op == "call_method" and arg.target in _PURE_METHODS:
        fn, name = _method(str(arg.target)), str(arg.target)
    elif _deterministic(arg):  # any other op of constants (``gamma[None, :, None, None]``…)
        fn = arg.target if arg.op == "call_function" else _method(str(arg.target))
        name = getattr(arg.target, "__name__", str(arg.target))
    else:
        return None
    return _op_const(arg, gm, depth, fn, name)


def _method(name: str) -> Any:
    def fn(self_: Any, *a: Any, **k: Any) -> Any:
        return getattr(self_, name)(*a, **k)

    return fn


#: Words in the names of ops whose result is not a function of their inputs.
_RANDOM = ("rand", "normal", "bernoulli", "dropout", "multinomial", "poisson", "uniform", "empty")


def _deterministic(node: fx.Node) -> bool:
    """A function or method call that neither draws random numbers nor writes in place."""
    if node.op not in ("call_function", "call_method") or "out" in node.kwargs:
        return False
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    if not name or _in_place(node):
        return False
    return not any(word in name.lower() for word in _RANDOM)


_IN_PLACE_OPERATORS = frozenset(
    {
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        operator.ifloordiv,
        operator.imod,
        operator.ipow,
        operator.imatmul,
    }
)


def _in_place(node: fx.Node) -> bool:
    """A call that writes into its first argument (``x.mul_(2)``, ``x += 1``, ``torch.relu_``)."""
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        if node.target in _IN_PLACE_OPERATORS:
            return True
        name = getattr(node.target, "__name__", "")
    else:
        return False
    return name.endswith("_") and not name.endswith("__")


def _written_in_place(node: fx.Node) -> bool:
    """Whether an in-place op writes into ``node``'s value: its value at fold time is not what
    the graph reads later."""
    return any(_in_place(u) and u.args[:1] == (node,) for u in node.users)


def depends_on_input(arg: Any, seen: set[fx.Node] | None = None) -> bool:
    """Whether the graph value ``arg`` is computed from the model's input (a placeholder)."""
    if not isinstance(arg, fx.Node):
        return False
    seen = set() if seen is None else seen
    if arg in seen:
        return False
    seen.add(arg)
    return arg.op == "placeholder" or any(depends_on_input(n, seen) for n in arg.all_input_nodes)


def _attr_const(arg: fx.Node, gm: fx.GraphModule) -> Const | None:
    """A ``get_attr`` node's tensor (parameter, buffer or traced tensor constant) as a `Const`."""
    obj = fetch_attr(gm, str(arg.target))
    if not isinstance(obj, torch.Tensor) or obj.is_complex() or obj.dtype == torch.bool:
        return None
    value = obj.detach().to("cpu", torch.float64)
    if isinstance(obj, nn.Parameter):
        kind = "param"
    elif str(arg.target).split(".")[-1].startswith("_tensor_constant"):
        kind = "constant"
    else:
        kind = "buffer"
    name = "" if kind == "constant" else f" {arg.target}"
    if value.numel() == 1:
        label = f"{kind}{name}={fmt_num(float(value.reshape(-1)[0]))}"
    else:
        label = f"{kind}{name}{list(value.shape)}"
    params = [str(arg.target)] if kind == "param" else []
    return Const(value, label, [arg], params)


def _op_const(arg: fx.Node, gm: fx.GraphModule, depth: int, fn: Any, name: str) -> Const | None:
    """``fn`` (a pure op named ``name``) of constant operands, evaluated; None if an operand is not
    constant, there is none, or the op fails or returns no tensor."""
    parts: list[Const] = []

    def sub(a: Any) -> Any:
        if isinstance(a, fx.Node):
            c = const_of(a, gm, depth + 1)
            if c is None:
                raise LookupError
            parts.append(c)
            return c.value
        return a

    try:
        args = fx.node.map_aggregate(arg.args, sub)
        kwargs = fx.node.map_aggregate(arg.kwargs, sub)
        if not parts:
            return None
        with torch.no_grad():
            value = fn(*args, **kwargs)
    except Exception:
        return None
    if not isinstance(value, torch.Tensor):
        return None
    value = value.detach().to(torch.float64)
    label = f"{name}({', '.join(p.label for p in parts)})"
    nodes = [arg, *(n for p in parts for n in p.nodes)]
    return Const(value, label, nodes, [q for p in parts for q in p.params])
