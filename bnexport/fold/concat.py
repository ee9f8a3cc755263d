"""The concat rule: ``cat([layer_1(…), …, layer_k(…)], dim=1) → BN → chain`` folds slice ``k`` of
the BN's scale/shift into layer ``k`` (mixed/grouped kernels: split → convs → cat → BN)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from bnexport.fold import math as fm
from bnexport.fold.context import FoldContext, Probe
from bnexport.fold.layers import custom_layer, layer_kind, new_layer
from bnexport.fold.report import Direction, FoldEntry
from bnexport.fold.rules import (
    Refusal,
    Rule,
    cast_folded,
    expected_rank,
    groups,
    layer_refusal,
    out_channels,
    weight_change,
)
from bnexport.fold.sites import BNSite
from bnexport.fold.view import data_users

_CATS = (torch.cat, torch.concat, torch.concatenate)


@dataclass
class ConcatMatch:
    """A BN site whose input is a channel concat of layer outputs."""

    site: BNSite
    cat: fx.Node
    parts: list[fx.Node]


class ConcatThenBN(Rule):
    """``cat([layer_1(…), …, layer_k(…)], dim=1) → BN → chain`` (mixed/grouped kernels: split →
    convs → cat → BN): channel slice ``k`` of the BN's scale/shift folds into layer ``k`` after it
    (``W_k' = W_k·s[k]``, ``b_k' = s[k]·b_k + t[k]``), and the concat stays."""

    direction: ClassVar[Direction] = "after"

    def match(self, site: BNSite, ctx: FoldContext) -> ConcatMatch | None:
        src = site.input
        if src is None or src.op != "call_function" or src.target not in _CATS:
            return None
        parts = src.args[0] if src.args else src.kwargs.get("tensors")
        dim = src.args[1] if len(src.args) > 1 else src.kwargs.get("dim", 0)
        rank = len(ctx.shape(src) or ())
        if not isinstance(parts, list | tuple) or dim not in (1, 1 - rank):
            return None
        modules = [ctx.module(p) for p in parts]
        if not any(layer_kind(m) or custom_layer(type(m)) for m in modules if m is not None):
            return None
        return ConcatMatch(site, src, list(parts))

    def check(self, m: ConcatMatch, ctx: FoldContext) -> Refusal | None:
        site, cat = m.site, m.cat
        if len(data_users(cat)) != 1:
            others = ", ".join(ctx.describe(u) for u in data_users(cat) if u is not site.node)
            return Refusal(
                "multi_user",
                f"the concat {ctx.describe(cat)} before {site.name} also feeds {others}; folding "
                "into its layers would change what those see",
            )
        offset = 0
        for k, part in enumerate(m.parts):
            layer = ctx.module(part)
            shape = ctx.shape(part)
            width = int(shape[1]) if shape is not None and len(shape) > 1 else 0
            where = (
                f"part {k} of the concat (channels {offset}…{offset + width - 1} of {site.name})"
            )
            offset += width
            base = custom_layer(type(layer)) if layer is not None else None
            if base is not None and layer_kind(layer) is None:
                return Refusal(
                    "custom_layer",
                    f"{where} comes from {ctx.describe(part)}, a {base} subclass whose own "
                    "forward is not linear in its stored weight and bias (probed), so that slice "
                    "has no layer to fold into",
                )
            if layer_kind(layer) is None:
                return Refusal(
                    "no_adjacent_layer",
                    f"{where} is {ctx.describe(part)}, not a Conv/ConvTranspose/Linear output, so "
                    "that slice has no layer to fold into",
                )
            assert layer is not None and isinstance(part, fx.Node)
            if len(data_users(part)) != 1 or m.parts.count(part) > 1:
                return Refusal(
                    "multi_user",
                    f"{where}: the output of {part.target} has other users besides the concat",
                )
            refusal = layer_refusal(layer, str(part.target))
            if refusal is not None:
                return refusal
            if shape is None or len(shape) != expected_rank(layer):
                return Refusal("layout", f"{where}: {part.target}'s output is {list(shape or ())}")
            if ctx.dtype(part) != ctx.dtype(site.end):
                return Refusal("dtype", f"{where}: {site.name} and its chain change the dtype")
        if offset != site.channels:
            return Refusal(
                "layout",
                f"the concat has {offset} channels, {site.name} normalizes {site.channels}",
            )
        return None

    def rewrite(self, m: ConcatMatch, ctx: FoldContext) -> FoldEntry:
        site = m.site
        names, notes, flushed, offset = [], list(site.notes), 0, 0
        for part in m.parts:
            layer = ctx.module(part)
            kind = layer_kind(layer)
            assert layer is not None and kind is not None
            width = out_channels(layer)
            s, t = site.scale[offset : offset + width], site.shift[offset : offset + width]
            offset += width
            name = str(part.target)
            weight, bias = ctx.params64(part)
            folded = fm.fold_after(kind, weight, bias, s, t, groups(layer))
            w, b = cast_folded(folded, layer, name)
            created = ctx.install(part, new_layer(layer, w.tensor, b.tensor))
            ctx.record(part, folded)
            flushed += w.subnormals_flushed + b.subnormals_flushed
            if created:
                notes.append(f"{name} is shared: only this call uses the folded copy {created}")
            names.append(name)
        ctx.probes.append(Probe(site.name, ", ".join(names), m.cat.name, site.end.name))
        site.end.replace_all_uses_with(m.cat)
        ctx.remove_site(site)
        return FoldEntry(
            bn=site.name,
            bn_type=site.type_name,
            status="folded",
            chain=site.chain,
            into=", ".join(names),
            layer_type=f"torch.cat of {len(names)} layers",
            direction=self.direction,
            temperature=site.temperature,
            chain_stop=site.chain_stop,
            max_rel_weight_change=weight_change(site),
            subnormals_flushed=flushed,
            notes=notes,
        )
