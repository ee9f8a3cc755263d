"""The FX fold pass: every BatchNorm call gets one report entry — folded by the first pattern whose
``check`` passes, or left with the reason."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from bnexport.fold import math as fm
from bnexport.fold.affine import arith_op
from bnexport.fold.batchnorm import FUNCTIONAL_BATCHNORMS, is_batchnorm_class, is_batchnorm_like
from bnexport.fold.constants import const_of
from bnexport.fold.context import FoldContext, Probe
from bnexport.fold.layers import custom_layer, layer_kind, new_layer
from bnexport.fold.layout import walk_back
from bnexport.fold.patterns import PATTERNS
from bnexport.fold.report import ChainEntry, Direction, FoldEntry
from bnexport.fold.rules import Refusal, Rule, cast_folded, expected_rank, layer_refusal
from bnexport.fold.sites import BNSite, bn_site, functional_site, layer_site

_NONLINEAR_FUNCS = {
    torch.relu,
    torch.relu_,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.softplus,
    F.logsigmoid,
    torch.sigmoid,
    torch.tanh,
    torch.clamp,
    torch.abs,
    F.sigmoid,
    F.tanh,
}
_NONLINEAR_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_"}


def is_nonlinearity(node: object, ctx: FoldContext) -> bool:
    """An activation module (``torch.nn.modules.activation``), function or method."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_module":
        return type(ctx.module(node)).__module__ == "torch.nn.modules.activation"
    if node.op == "call_function":
        return node.target in _NONLINEAR_FUNCS
    return node.op == "call_method" and node.target in _NONLINEAR_METHODS


def _layer_name(node: object, ctx: FoldContext) -> str | None:
    if isinstance(node, fx.Node) and layer_kind(ctx.module(node)) is not None:
        return str(node.target)
    return None


def _input_side(site: BNSite, ctx: FoldContext) -> Refusal | None:
    """A layer one op before the BN (reshapes aside): which op sits between them."""
    src, _ = walk_back(site.input)
    if isinstance(src, fx.Node) and src.args:
        layer_node, _ = walk_back(src.args[0] if isinstance(src.args[0], fx.Node) else None)
        layer = _layer_name(layer_node, ctx)
        if layer:
            code = "nonlinearity" if is_nonlinearity(src, ctx) else "no_adjacent_layer"
            what = (
                "a nonlinearity"
                if code == "nonlinearity"
                else "neither a constant scale/shift nor a reshape keeping the channel axis"
            )
            return Refusal(
                code,
                f"{ctx.describe(src)} sits between {layer} and {site.name} ({what}): a BatchNorm "
                "can't move across it",
            )
    return None


def _output_side(site: BNSite, ctx: FoldContext) -> Refusal | None:
    """A layer one op after the BN (and its chain): which op sits between them."""
    for user in site.end.users:
        for nxt in user.users:
            layer = _layer_name(nxt, ctx)
            if layer and nxt.args and nxt.args[0] is user:
                code = "nonlinearity" if is_nonlinearity(user, ctx) else "no_adjacent_layer"
                return Refusal(
                    code,
                    f"{ctx.describe(user)} sits between {site.name} and {layer}: a BatchNorm "
                    "can't move across it",
                )
    return None


def _module_of(node: object, ctx: FoldContext) -> tuple[str, type | None]:
    """Path and class of the module ``node`` calls, or whose forward made the call (torch.fx's
    module stack)."""
    if not isinstance(node, fx.Node):
        return "", None
    if node.op == "call_module":
        return str(node.target), type(ctx.module(node))
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if not stack:
        return "", None
    path, cls = stack[-1]
    return str(path), cls if isinstance(cls, type) else None


def _custom_neighbour(site: BNSite, ctx: FoldContext) -> Refusal | None:
    """A layer subclass with its own forward right before or after the BN."""
    neighbours = [site.input, *(u for u in site.end.users if u.args and u.args[0] is site.end)]
    for node in neighbours:
        path, cls = _module_of(node, ctx)
        base = custom_layer(cls)
        if base is not None and cls is not None:
            return Refusal(
                "custom_layer",
                f"{path} ({cls.__name__}) is a {base} subclass with its own forward (e.g. "
                "padding computed at run time, a transformed weight): bnexport folds a BN after "
                "such a layer only when its output is linear in its stored weight and bias "
                "(probed), and a BN before it never",
            )
    return None


def diagnose(site: BNSite, ctx: FoldContext, tried: Sequence[Direction] = ()) -> list[Refusal]:
    """Why no rule folded the BN, for each side no rule already explained (``tried``): an op
    between the BN and a layer, or no layer at all."""
    found = [
        r
        for direction, side in (("after", _input_side), ("before", _output_side))
        if direction not in tried and (r := side(site, ctx)) is not None
    ]
    custom = _custom_neighbour(site, ctx)
    if custom is not None:
        found.insert(0, custom)
    if found or tried:
        return found
    users = ", ".join(ctx.describe(u) for u in site.end.users) or "nothing"
    return [
        Refusal(
            "no_adjacent_layer",
            f"its input comes from {ctx.describe(site.input)} and its output goes to {users}; a "
            "BatchNorm folds only into a Conv/ConvTranspose/Linear module right before it (and "
            "sole user of its output) or right after it, reshapes that keep the channel axis "
            "aside",
        )
    ]


def _left(site: BNSite, refusals: Sequence[Refusal]) -> FoldEntry:
    reason = refusals[0].reason
    if len(refusals) > 1:
        reason = "; ".join(f"{r.reason}" for r in refusals)
    return FoldEntry(
        bn=site.name,
        bn_type=site.type_name,
        status="left",
        chain=site.chain,
        temperature=site.temperature,
        reason_code=refusals[0].code,
        reason=reason,
        chain_stop=site.chain_stop,
        notes=list(site.notes),
    )


def _owner(node: fx.Node) -> tuple[str, str]:
    """``(module path, class name)`` of the module a functional BatchNorm call belongs to: the
    owner of its running_mean buffer, else the innermost module whose forward made the call."""
    named = FUNCTIONAL_BATCHNORMS[node.target]
    args = dict(zip(named, node.args, strict=False)) | dict(node.kwargs)
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    mean = args.get("running_mean")
    if isinstance(mean, fx.Node) and mean.op == "get_attr":
        path = str(mean.target).rpartition(".")[0]
        for p, cls in stack:
            if p == path:
                return path, getattr(cls, "__name__", str(cls))
        if path:
            return path, "batch_norm"
    if stack:
        path, cls = stack[-1]
        return str(path), getattr(cls, "__name__", str(cls))
    return "", "batch_norm"


def bn_names(gm: fx.GraphModule) -> dict[fx.Node, tuple[str, str]]:
    """Report name and type of every BatchNorm call: its module path (the module owning a
    functional call's statistics), plus ``(call k of n)`` when one module makes several calls.
    A ``batch_norm`` of a constant (timm's ``ScaledStdConv2d`` standardizes its weight that way)
    is part of computing a weight, not a BatchNorm of activations: it is not listed."""
    calls: dict[str, list[tuple[fx.Node, str]]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            module = gm.get_submodule(str(n.target))
            if is_batchnorm_like(module):
                calls.setdefault(str(n.target), []).append((n, type(module).__name__))
        elif n.op == "call_function" and n.target in FUNCTIONAL_BATCHNORMS:
            if n.args and const_of(n.args[0], gm) is not None:
                continue  # it normalizes a constant (weight standardization), not activations
            path, cls = _owner(n)
            calls.setdefault(path or f"{gm.__class__.__name__}.forward", []).append((n, cls))
    names: dict[fx.Node, tuple[str, str]] = {}
    for target, nodes in calls.items():
        for k, (n, cls) in enumerate(nodes, 1):
            label = target if len(nodes) == 1 else f"{target} (call {k} of {len(nodes)})"
            names[n] = (label, cls)
    return names


def _inside_leaf(
    node: fx.Node, ctx: FoldContext, untraceable: Mapping[str, str]
) -> list[FoldEntry]:
    """Entries for the BatchNorms inside a module called as a black box (a leaf module that is not
    itself a BN/layer, or a block torch.fx can't trace)."""
    module = ctx.module(node)
    if module is None or is_batchnorm_like(module) or layer_kind(module) is not None:
        return []
    target = str(node.target)
    blocked = next((p for p in untraceable if target == p or target.startswith(p + ".")), None)
    entries: list[FoldEntry] = []
    listed: list[str] = []
    for name, sub in module.named_modules():
        if not is_batchnorm_class(sub) or any(name.startswith(p + ".") for p in listed):
            continue
        listed.append(name)
        path = f"{target}.{name}" if name else target
        if blocked is not None:
            code, reason = (
                "not_traceable",
                (
                    f"inside a non-traceable region: torch.fx can't trace {blocked} "
                    f"({untraceable[blocked]}), so it runs as a black box"
                ),
            )
        elif not name:
            code, reason = (
                "leaf_module",
                (
                    f"not traced: kept as a leaf (leaf_modules), and its forward "
                    f"({type(sub).__name__}) is not a plain BatchNorm; fix: drop it from "
                    "leaf_modules so it is traced through"
                ),
            )
        else:
            code, reason = (
                "leaf_module",
                (
                    f"not traced: it is inside {ctx.describe(node)}, which is kept as a leaf "
                    "(leaf_modules), so its graph is not visible; fix: make that module traceable "
                    "instead of passing it in leaf_modules"
                ),
            )
        entries.append(
            FoldEntry(
                bn=path,
                bn_type=type(sub).__name__,
                status="left",
                chain=type(sub).__name__,
                reason_code=code,
                reason=reason,
            )
        )
    return entries


def _fold_site(
    node: fx.Node, name: str, type_name: str, ctx: FoldContext, rules: Sequence[Rule]
) -> FoldEntry:
    """Fold one BatchNorm call with the first rule whose check passes, or say why not."""
    if name in ctx.excluded:  # its fold failed the self-check
        return FoldEntry(
            bn=name,
            bn_type=type_name,
            status="left",
            chain=type_name,
            reason_code="self_check",
            reason=ctx.excluded[name],
        )
    if node.op == "call_function":
        site = functional_site(ctx, node, name, type_name)
    else:
        site = bn_site(ctx, node, name)
    if isinstance(site, tuple):
        code, reason = site
        return FoldEntry(
            bn=name,
            bn_type=type_name,
            status="left",
            chain=type_name,
            reason_code=code,
            reason=reason,
        )
    refusals: list[Refusal] = []
    tried: list[Direction] = []
    for rule in rules:
        m = rule.match(site, ctx)
        if m is None:
            continue
        refusal = rule.check(m, ctx)
        if refusal is not None:
            refusals.append(refusal)
            tried.append(rule.direction)
            continue
        return rule.rewrite(m, ctx)
    return _left(site, [*refusals, *diagnose(site, ctx, tried)])


def _not_linear(layer: nn.Module, name: str) -> Refusal:
    """Why a scale/shift can't fold into a custom layer that failed the linearity probe."""
    return Refusal(
        "custom_layer",
        f"{name} ({type(layer).__name__}) is a {custom_layer(type(layer))} subclass whose own "
        "forward is not linear in its stored weight and bias (probed with random parameters; "
        "e.g. it standardizes its weight), so a scale/shift after it can't go into its weight",
    )


def fold_layer_chains(ctx: FoldContext) -> list[ChainEntry]:
    """Fold the constant scale/shift chain right after any layer (``linear(x) / T``, ``conv(x) *
    s + c``) into it; one entry per layer with such a chain."""
    entries: list[ChainEntry] = []
    for node in list(ctx.gm.graph.nodes):
        layer = ctx.module(node)
        kind = layer_kind(layer)
        custom = custom_layer(type(layer)) if layer is not None else None
        if (kind is None and custom is None) or not any(arith_op(u) for u in node.users):
            continue
        assert layer is not None
        shape, name = ctx.shape(node), str(node.target)
        if shape is None or len(shape) != expected_rank(layer):
            continue  # e.g. a Linear on [N, L, F]: dim 1 is not its feature dim
        site = layer_site(ctx, node, name, int(shape[1]))
        if not site.chain_nodes:
            continue
        chain = " → ".join(site.labels)
        refusal = layer_refusal(layer, name) if kind is not None else _not_linear(layer, name)
        if refusal is None and name in ctx.excluded:
            refusal = Refusal("self_check", ctx.excluded[name])
        if refusal is not None:
            entries.append(ChainEntry(name, type(layer).__name__, chain, "left", refusal.reason))
            continue
        weight, bias = ctx.params64(node)
        groups = int(getattr(layer, "groups", 1))
        folded = fm.fold_after(kind, weight, bias, site.scale, site.shift, groups)
        w, b = cast_folded(folded, layer, name)
        created = ctx.install(node, new_layer(layer, w.tensor, b.tensor))
        ctx.record(node, folded)
        ctx.probes.append(Probe(name, name, node.name, site.end.name))
        site.end.replace_all_uses_with(node)
        ctx.remove_site(site, keep_node=True)
        notes = list(site.notes)
        if created:
            notes.append(f"{name} is shared: only this call uses the folded copy {created}")
        entries.append(
            ChainEntry(
                name, type(layer).__name__, chain, "folded", chain_stop=site.chain_stop, notes=notes
            )
        )
    return entries


def fold_graph(
    gm: fx.GraphModule,
    rules: Sequence[Rule] = PATTERNS,
    untraceable: Mapping[str, str] | None = None,
    memo64: dict[int, torch.Tensor] | None = None,
    excluded: Mapping[str, str] | None = None,
) -> tuple[list[FoldEntry], list[ChainEntry], FoldContext]:
    """Fold every BatchNorm in ``gm`` (shape-propagated) in place; one entry per BatchNorm call,
    plus one per layer whose constant scale/shift chain (without BatchNorm) was folded, and the
    context: the folded parameters in float64 by path (`FoldContext.exact`) and the fold steps
    (`FoldContext.probes`). ``memo64`` receives the float64 copies of the original parameters the
    fold read (tensor id → copy). ``excluded``: BatchNorms and chain layers to leave unfolded, by
    name, with the reason (their fold failed the self-check).

    Chains after layers fold first (``conv → ×c → BN`` then folds as ``conv → BN``); BNs are then
    visited in graph order, so ``BN → conv → BN`` folds both (before, then after).
    """
    ctx = FoldContext(gm, memo64, excluded)
    chains = fold_layer_chains(ctx)
    names = bn_names(gm)
    entries: list[FoldEntry] = []
    for node in list(gm.graph.nodes):
        if node._erased:
            continue
        if node in names:
            entries.append(_fold_site(node, *names[node], ctx, rules))
        elif node.op == "call_module":
            entries.extend(_inside_leaf(node, ctx, untraceable or {}))
    ctx.finish()
    return entries, chains, ctx
