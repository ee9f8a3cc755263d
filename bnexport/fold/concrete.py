"""Tracing Python control flow on shapes: torch.fx with the example inputs at hand.

``symbolic_trace`` fails on ``if x.shape[-1] > 32:`` or ``for _ in range(x.size(1)):`` — a proxy has
no value to branch on. `ConcreteTracer` runs the graph recorded so far on the example inputs when
Python asks for a truth value, an integer or a length, and answers with the real value, as
torch.export specializes such code. Only *static* values are answered: those computed from tensor
shapes (``shape``, ``size()``, ``dim()``, ``numel()``, ``len``), parameters, buffers and numbers —
a branch on tensor data (``if x.sum() > 0``) still fails, so that block is run as a black box.

A decision that read an input's shape is recorded (`ConcreteTracer.specialized`) and kept in the
graph as a ``torch._assert``: the folded module refuses inputs that would have taken another branch
instead of silently computing the wrong one.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.proxy import TraceError

_METADATA_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "layout"})
_METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "get_device"})
_OPERATORS = {
    operator.gt: ">",
    operator.ge: ">=",
    operator.lt: "<",
    operator.le: "<=",
    operator.eq: "==",
    operator.ne: "!=",
    operator.add: "+",
    operator.sub: "-",
    operator.mul: "*",
    operator.floordiv: "//",
    operator.mod: "%",
}


def reads_metadata(node: fx.Node) -> bool:
    """``x.shape``, ``x.size()``, ``x.dim()``, ``len(x)`` …: a value that is only metadata."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _METADATA_ATTRS
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    return node.op == "call_function" and node.target in (len, torch.numel)


def expression(node: Any, depth: int = 0) -> str:
    """``relu.shape[-1] > 32`` for the node computing it (for the report and the guard)."""
    if not isinstance(node, fx.Node):
        return repr(node)
    if depth > 6 or node.op == "placeholder":
        return node.name
    if node.op == "get_attr":
        return str(node.target)
    if node.op == "call_module":
        return f"{node.target}(…)"
    args = [expression(a, depth + 1) for a in node.args]
    if node.op == "call_function" and node.target is getattr:
        return f"{args[0]}.{node.args[1]}"
    if node.op == "call_function" and node.target is operator.getitem:
        return f"{args[0]}[{args[1]}]"
    if node.op == "call_function" and node.target in _OPERATORS and len(args) == 2:
        return f"{args[0]} {_OPERATORS[node.target]} {args[1]}"
    if node.op == "call_method":
        return f"{args[0]}.{node.target}({', '.join(args[1:])})"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{name}({', '.join(args)})"


class ConcreteProxy(fx.Proxy):
    """A proxy that turns into a Python int/float/length when its value is static."""

    def __index__(self) -> int:
        return int(self.tracer.concrete(self, int))  # type: ignore[attr-defined]

    def __int__(self) -> int:
        return int(self.tracer.concrete(self, int))  # type: ignore[attr-defined]

    def __float__(self) -> float:
        return float(self.tracer.concrete(self, float))  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return int(self.tracer.concrete(self, len))  # type: ignore[attr-defined]


class ConcreteTracer(fx.Tracer):
    """A tracer that answers static control flow with the values of the example ``inputs``."""

    def __init__(self, inputs: Sequence[Any] | None = None) -> None:
        super().__init__()
        self.proxy_buffer_attributes = True  # ``rsqrt(self.var + eps)`` stays in the graph
        self.inputs = None if inputs is None else tuple(inputs)
        self.specialized: list[str] = []
        self._values: dict[fx.Node, Any] = {}
        self._static: dict[fx.Node, bool] = {}
        self._evaluating = False

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ConcreteProxy(node, self)

    # --- answering control flow ------------------------------------------------------------

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = bool(self.concrete(obj, bool))
        return value

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        n = int(self.concrete(obj, len))
        return iter([obj[k] for k in range(n)])

    def concrete(self, obj: fx.Proxy, kind: Any) -> Any:
        """The value of ``obj`` as ``kind`` (bool, int, float, len) if it is static, recorded
        with a guard when it read an input's shape; else fx's usual TraceError."""
        node = obj.node
        if self.inputs is None or not self._is_static(node):
            if kind is bool:
                return super().to_bool(obj)
            raise TraceError(
                f"{expression(node)} depends on tensor values, so Python can't use it as a "
                f"{getattr(kind, '__name__', kind)} while tracing"
            )
        value = self._value_of(node)
        result = kind(value)
        if self._reads_input(node):
            self._guard(obj, kind, result)
        return result

    def _guard(self, obj: fx.Proxy, kind: Any, result: Any) -> None:
        text = f"{expression(obj.node)}{'.__len__()' if kind is len else ''} was {result!r}"
        if text not in self.specialized:
            self.specialized.append(text)
        if kind is bool:
            cond = obj if result else self.create_proxy("call_function", operator.not_, (obj,), {})
        else:
            value = self.create_proxy("call_function", len, (obj,), {}) if kind is len else obj
            cond = self.create_proxy("call_function", operator.eq, (value, result), {})
        message = (
            f"bnexport fold traced this model with inputs for which {text}; other inputs take "
            "another branch of its forward: fold it with inputs shaped like these"
        )
        self.create_proxy("call_function", torch._assert, (cond, message), {})

    def _is_static(self, node: fx.Node) -> bool:
        """Computed only from shapes/metadata, parameters, buffers and numbers."""
        if node not in self._static:
            if node.op == "placeholder":
                static = False
            elif node.op == "get_attr" or reads_metadata(node):
                static = True
            else:
                static = all(self._is_static(n) for n in node.all_input_nodes)
            self._static[node] = static
        return self._static[node]

    def _reads_input(self, node: fx.Node, seen: set[fx.Node] | None = None) -> bool:
        """Whether ``node`` reads the metadata of a value computed from the model's input."""
        seen = set() if seen is None else seen
        if node in seen:
            return False
        seen.add(node)
        if reads_metadata(node):
            return any(not self._is_static(n) for n in node.all_input_nodes)
        return any(self._reads_input(n, seen) for n in node.all_input_nodes)

    # --- running the graph so far ----------------------------------------------------------

    def _value_of(self, node: fx.Node) -> Any:
        """Run the graph recorded so far, in order, up to ``node`` (values are kept)."""
        if node in self._values:
            return self._values[node]
        placeholders = 0
        self._evaluating = True
        try:
            with torch.no_grad():
                for n in self.graph.nodes:
                    if n.op == "placeholder":
                        placeholders += 1
                    if n not in self._values:
                        self._values[n] = self._run(n, placeholders - 1)
                    if n is node:
                        break
        except TraceError:
            raise
        except Exception as exc:
            raise TraceError(
                f"cannot evaluate {expression(node)} on the example inputs "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        finally:
            self._evaluating = False
        return self._values[node]

    def _run(self, n: fx.Node, index: int) -> Any:
        assert self.inputs is not None
        if n.op == "placeholder":
            if index < len(self.inputs):
                x = self.inputs[index]
                return x.detach().clone() if isinstance(x, torch.Tensor) else x
            return n.args[0] if n.args else None
        args = fx.node.map_arg(n.args, lambda a: self._values[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: self._values[a])
        if n.op == "get_attr":
            obj: Any = self.root
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            return obj
        if n.op == "call_function":
            return n.target(*args, **kwargs)  # type: ignore[operator]
        if n.op == "call_method":
            return getattr(args[0], str(n.target))(*args[1:], **kwargs)
        if n.op == "call_module":
            return self.root.get_submodule(str(n.target))(*args, **kwargs)
        raise TraceError(f"cannot evaluate a {n.op} node")

    # --- while evaluating, modules and attributes are the real ones ------------------------

    def call_module(
        self, m: torch.nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if self._evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)
