"""Trace a model with torch.fx for folding: BatchNorms and layers stay single calls, and a submodule
torch.fx can't trace becomes a black box (its BatchNorms are reported, not lost).

Python control flow on shapes is answered with the example inputs (`bnexport.fold.concrete`).
torch.fx's ``symbolic_trace`` still fails on the whole model when one block branches on tensor
values (``if x.sum() > 0``). `trace` then retries with that block (the innermost module whose
``forward`` raised) called as a leaf, so the rest of the model still folds; the fold report lists
every BatchNorm inside such a block as "left: inside a non-traceable region".

Submodules named like `torch.fx.GraphModule`'s own attributes (``meta``, ``graph``, ``code`` …)
can't be attributes of the traced module: they are renamed there (``meta`` → ``meta_``), and
`Traced.renames` maps the new names back for the report.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from bnexport.errors import FoldError
from bnexport.fold.batchnorm import is_batchnorm_like
from bnexport.fold.concrete import ConcreteTracer
from bnexport.fold.constants import fetch_attr
from bnexport.fold.layers import custom_layer, layer_kind

#: How many blocks may be turned into black boxes before tracing gives up.
MAX_UNTRACEABLE = 64

#: Modules that are the identity in eval mode; removed before folding so a BN next to them can fold.
EVAL_IDENTITY_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

_ATTR = "_bnexport_failed_in"


class FoldTracer(ConcreteTracer):
    """symbolic_trace's tracer, with BatchNorm-like modules, plain layers, the caller's
    ``leaf_types`` and the ``leaf_paths`` found untraceable kept as single ``call_module`` nodes;
    control flow on shapes is answered from the example ``inputs``."""

    def __init__(
        self,
        leaf_types: Sequence[type[nn.Module]] = (),
        leaf_paths: Sequence[str] = (),
        inputs: Sequence[Any] | None = None,
    ) -> None:
        super().__init__(inputs)
        self.leaf_types = tuple(leaf_types)
        self.leaf_paths = frozenset(leaf_paths)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_paths:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if is_batchnorm_like(m) or layer_kind(m) is not None or custom_layer(type(m)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if self._evaluating:
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            if not hasattr(exc, _ATTR):  # the innermost module whose forward failed
                with contextlib.suppress(Exception):  # an exception type refusing attributes
                    setattr(exc, _ATTR, self.path_of_module(m))
            raise


class ForwardNotTraceable(FoldError):
    """The model's own ``forward`` (not one of its submodules) can't be traced."""


@dataclass
class Traced:
    """The traced module, the blocks run as black boxes because fx can't trace them, the shape
    decisions its forward took on the example inputs, and the renamed top-level names."""

    gm: fx.GraphModule
    untraceable: dict[str, str] = field(default_factory=dict)  # module path → why
    specialized: list[str] = field(default_factory=list)  # "x.shape[-1] > 32 was True"
    renames: dict[str, str] = field(default_factory=dict)  # name in gm → the model's name


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def trace(
    model: nn.Module, leaf_types: Sequence[type[nn.Module]] = (), inputs: Sequence[Any] = ()
) -> Traced:
    """Trace ``model`` (control flow on shapes answered from ``inputs``), turning untraceable
    blocks into leaves; `FoldError` with the fix if the model's own forward can't be traced."""
    for module in model.modules():  # probe custom layers now: tracing patches Module.__call__
        if custom_layer(type(module)) is not None:
            layer_kind(module)
    untraceable: dict[str, str] = {}
    for _ in range(MAX_UNTRACEABLE + 1):
        tracer = FoldTracer(leaf_types, tuple(untraceable), inputs)
        try:
            graph = tracer.trace(model)
        except Exception as exc:
            path = getattr(exc, _ATTR, None)
            if path and path not in untraceable and len(untraceable) < MAX_UNTRACEABLE:
                untraceable[path] = _first_line(exc)
                continue
            error = ForwardNotTraceable if not path else FoldError
            raise error(
                f"cannot trace {type(model).__name__}.forward with torch.fx "
                f"({_first_line(exc)}); fix: move the Python that branches on tensor values into "
                "a submodule (bnexport runs a submodule it can't trace as a black box and folds "
                "the rest) or into a function decorated with torch.fx.wrap"
            ) from exc
        renames = _rename_reserved(graph, tracer.root)
        if renames:
            root: Any = {
                str(n.target): fetch_attr(tracer.root, _original(str(n.target), renames))
                for n in graph.nodes
                if n.op in ("call_module", "get_attr")
            }
        else:
            root = tracer.root
        gm = fx.GraphModule(root, graph, type(model).__name__)
        return Traced(gm, untraceable, list(tracer.specialized), renames)
    raise AssertionError("unreachable")  # pragma: no cover


@functools.cache
def reserved_names() -> frozenset[str]:
    """Attribute names a `torch.fx.GraphModule` has and a plain `nn.Module` has not."""
    gm = fx.GraphModule(nn.Module(), fx.Graph())
    return frozenset(set(dir(gm)) - set(dir(nn.Module())))


def _original(target: str, renames: dict[str, str]) -> str:
    head, dot, rest = target.partition(".")
    return renames.get(head, head) + dot + rest


def _rename_reserved(graph: fx.Graph, root: nn.Module) -> dict[str, str]:
    """Rename the top-level names in ``graph``'s targets that `reserved_names` holds (``meta`` →
    ``meta_``); returns new name → the model's name."""
    reserved = reserved_names()
    heads = {str(n.target).partition(".")[0] for n in graph.nodes if n.op in _TARGETED}
    renames: dict[str, str] = {}
    for head in sorted(heads & reserved):
        new = f"{head}_"
        while new in reserved or new in heads or hasattr(root, new) or new in renames:
            new += "_"
        renames[new] = head
    back = {old: new for new, old in renames.items()}
    for n in graph.nodes:
        if n.op in _TARGETED:
            head, dot, rest = str(n.target).partition(".")
            if head in back:
                n.target = back[head] + dot + rest
    return renames


_TARGETED = ("call_module", "get_attr")


_EVAL_IDENTITY_FUNCS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)


def remove_eval_identities(gm: fx.GraphModule) -> int:
    """Drop ``nn.Identity``/``Dropout*`` calls and ``F.dropout(..., training=False)`` (identities in
    eval) so a BN on either side of them can fold. Returns how many were removed."""
    removed = 0
    for node in list(gm.graph.nodes):
        is_identity = False
        if node.op == "call_module":
            is_identity = isinstance(gm.get_submodule(str(node.target)), EVAL_IDENTITY_MODULES)
        elif node.op == "call_function" and node.target in _EVAL_IDENTITY_FUNCS:
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            is_identity = training is False
        if is_identity and node.args and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    return removed
