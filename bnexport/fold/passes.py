"""The FX fold pass: every BatchNorm call gets one report entry — folded by the first pattern whose
``check`` passes, or left with the reason."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from bnexport.fold.graph import BNSite, FoldContext, bn_parts, layer_kind
from bnexport.fold.patterns import PATTERNS, Pattern, Refusal
from bnexport.fold.report import FoldEntry

_FUNCTIONAL_BN = (F.batch_norm, torch.batch_norm)

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


def diagnose(site: BNSite, ctx: FoldContext) -> Refusal:
    """Why no pattern matched: a nonlinearity (or another op) between the BN and a layer, or no
    layer."""
    src = site.input
    if isinstance(src, fx.Node) and src.args:
        layer = _layer_name(src.args[0], ctx)
        if layer:
            code = "nonlinearity" if is_nonlinearity(src, ctx) else "no_adjacent_layer"
            what = "a nonlinearity" if code == "nonlinearity" else "not an affine op"
            return Refusal(
                code,
                f"{ctx.describe(src)} sits between {layer} and {site.name} ({what}): a BatchNorm "
                "can't move across it",
            )
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
    users = ", ".join(ctx.describe(u) for u in site.end.users) or "nothing"
    return Refusal(
        "no_adjacent_layer",
        f"its input comes from {ctx.describe(src)} and its output goes to {users}; a BatchNorm "
        "folds only into a Conv/ConvTranspose/Linear module right before it (and sole user of its "
        "output) or right after it",
    )


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


def _bn_names(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Report names: module path, plus ``(call k of n)`` for a BN module called several times."""
    calls: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and bn_parts(gm.get_submodule(str(n.target))) is not None:
            calls.setdefault(str(n.target), []).append(n)
    names: dict[fx.Node, str] = {}
    for target, nodes in calls.items():
        for k, n in enumerate(nodes, 1):
            names[n] = target if len(nodes) == 1 else f"{target} (call {k} of {len(nodes)})"
    return names


def _inside_leaf(node: fx.Node, ctx: FoldContext) -> list[FoldEntry]:
    """Entries for the BatchNorms hidden inside a called leaf module (not a BN/layer itself)."""
    module = ctx.module(node)
    if module is None or bn_parts(module) is not None or layer_kind(module) is not None:
        return []
    found: dict[str, nn.Module] = {}
    inner: set[int] = set()  # the `.bn` of a TemperatureBatchNorm2d already listed
    for name, sub in module.named_modules():
        parts = bn_parts(sub)
        if parts is not None and id(sub) not in inner:
            found[name] = sub
            inner.add(id(parts[0]))
    return [
        FoldEntry(
            bn=f"{node.target}.{name}",
            bn_type=type(sub).__name__,
            status="left",
            chain=type(bn_parts(sub)[0]).__name__,  # type: ignore[index]
            reason_code="leaf_module",
            reason=(
                f"it is inside {ctx.describe(node)}, which is called as a black box (a leaf "
                "module), so its graph is not visible; fix: make that module traceable instead of "
                "passing it in leaf_modules"
            ),
        )
        for name, sub in found.items()
    ]


def fold_graph(gm: fx.GraphModule, patterns: Sequence[Pattern] = PATTERNS) -> list[FoldEntry]:
    """Fold every BatchNorm in ``gm`` (shape-propagated) in place; one entry per BatchNorm call.

    BNs are visited in graph order, so ``BN → conv → BN`` folds both (before, then after).
    """
    ctx = FoldContext(gm)
    names = _bn_names(gm)
    entries: list[FoldEntry] = []
    for node in list(gm.graph.nodes):
        if node._erased:
            continue
        if node.op == "call_function" and node.target in _FUNCTIONAL_BN:
            entries.append(
                FoldEntry(
                    bn=node.name,
                    bn_type="functional batch_norm",
                    status="left",
                    chain="batch_norm",
                    reason_code="functional",
                    reason=(
                        f"{ctx.describe(node)} is a functional batch_norm call (or a BatchNorm "
                        "subclass with its own forward, traced through); fix: use a plain "
                        "nn.BatchNorm module"
                    ),
                )
            )
            continue
        if node not in names:
            entries.extend(_inside_leaf(node, ctx))
            continue
        site = ctx.bn_site(node, names[node])
        if isinstance(site, str):
            module = ctx.module(node)
            bn, temperature = bn_parts(module)  # type: ignore[misc]
            entries.append(
                FoldEntry(
                    bn=names[node],
                    bn_type=type(module).__name__,
                    status="left",
                    chain=type(bn).__name__,
                    temperature=float(temperature)
                    if isinstance(temperature, float | int)
                    else None,
                    reason_code="untracked_stats",
                    reason=site,
                )
            )
            continue
        refusals: list[Refusal] = []
        for pattern in patterns:
            m = pattern.match(site, ctx)
            if m is None:
                continue
            refusal = pattern.check(m, ctx)
            if refusal is not None:
                refusals.append(refusal)
                continue
            entries.append(pattern.rewrite(m, ctx))
            break
        else:
            entries.append(_left(site, refusals or [diagnose(site, ctx)]))
    ctx.finish()
    return entries
