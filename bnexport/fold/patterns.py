"""Fold patterns, one class per case, each as ``match`` (structure) / ``check`` (is it exact and
safe?) / ``rewrite`` (new parameters, node edits, report entry).

After a layer (``layer → BN → chain``), folded as ``W' = W·s`` on the output-channel axis and
``b' = s·b + t``; the variants differ only in the `kind` hook that picks the axis (Conv: 0,
ConvTranspose: 1 per group, Linear: 0). Before a layer (``BN → chain → layer``): the scale moves to
the input-channel axis and the shift into the bias; the variants add their exactness rule (Conv: no
zero padding or a zero shift; ConvTranspose: a zero shift). The math is in `bnexport.fold.math`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch import nn

from bnexport.fold import math as fm
from bnexport.fold.graph import BNSite, FoldContext, data_users
from bnexport.fold.layers import custom_layer, layer_hook_reason, layer_kind, new_layer
from bnexport.fold.report import Direction, FoldEntry


@dataclass
class Match:
    """A BN site next to a layer call."""

    site: BNSite
    layer_node: fx.Node
    layer: nn.Module
    layer_name: str = ""

    def __post_init__(self) -> None:
        self.layer_name = self.layer_name or str(self.layer_node.target)


@dataclass
class Refusal:
    """Why a matched pattern can't fold: a `REASONS` code and a sentence for the report."""

    code: str
    reason: str


def _dt(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.")


class Rule(ABC):
    """One fold rule: ``match`` (structure), ``check`` (exact and safe?), ``rewrite``; its
    `direction` says on which side of the BN the layer is."""

    direction: ClassVar[Direction]

    @property
    def name(self) -> str:
        return type(self).__name__

    @abstractmethod
    def match(self, site: BNSite, ctx: FoldContext) -> Any: ...

    @abstractmethod
    def check(self, m: Any, ctx: FoldContext) -> Refusal | None: ...

    @abstractmethod
    def rewrite(self, m: Any, ctx: FoldContext) -> FoldEntry: ...


def weight_change(site: BNSite) -> float:
    """``max |W' − W| / |W|`` of a fold: the largest ``|s_c − 1|`` over the folded channels."""
    return float((site.scale - 1).abs().max()) if site.scale.numel() else 0.0


def cast_folded(folded: fm.Folded, layer: nn.Module, name: str) -> tuple[fm.Cast, fm.Cast]:
    """The folded weight and bias, cast once to the layer's dtypes (checked)."""
    bias_dtype = layer.bias.dtype if layer.bias is not None else layer.weight.dtype
    w = fm.cast_checked(folded.weight, layer.weight.dtype, layer=name, what="weight")
    b = fm.cast_checked(folded.bias, bias_dtype, layer=name, what="bias")  # type: ignore[arg-type]
    return w, b


def layer_refusal(layer: nn.Module, name: str) -> Refusal | None:
    """Hooks/parametrizations or a non-float weight: the layer can't absorb a fold."""
    hook = layer_hook_reason(layer, name)
    if hook:
        return Refusal("layer_hooks", hook)
    if not layer.weight.is_floating_point():  # type: ignore[union-attr]
        return Refusal("dtype", f"{name} has a {_dt(layer.weight.dtype)} weight")  # type: ignore[union-attr]
    return None


def expected_rank(layer: nn.Module) -> int:
    """Rank of the layer's batched input/output whose dim 1 is its channel/feature dim."""
    return 2 if isinstance(layer, nn.Linear) else len(layer.kernel_size) + 2  # type: ignore[arg-type]


class Pattern(Rule):
    """A rule with one layer next to the BN. Subclasses set `kind` (the weight-axis hook) and
    `direction`."""

    kind: ClassVar[fm.LayerKind]
    direction: ClassVar[Direction]

    def is_layer(self, node: object, ctx: FoldContext) -> bool:
        return layer_kind(ctx.module(node)) == self.kind

    @abstractmethod
    def match(self, site: BNSite, ctx: FoldContext) -> Match | None: ...

    @abstractmethod
    def check(self, m: Match, ctx: FoldContext) -> Refusal | None: ...

    @abstractmethod
    def fold(self, m: Match, ctx: FoldContext) -> fm.Folded:
        """The folded parameters in float64."""

    @abstractmethod
    def reroute(self, m: Match, ctx: FoldContext) -> None:
        """Edit the graph so the folded layer call replaces BN + chain."""

    def rewrite(self, m: Match, ctx: FoldContext) -> FoldEntry:
        """Fold: float64 math, one checked cast, a new module for this call, node edits, report
        entry."""
        layer, site = m.layer, m.site
        folded = self.fold(m, ctx)
        w, b = cast_folded(folded, layer, m.layer_name)
        created = ctx.install(m.layer_node, new_layer(layer, w.tensor, b.tensor))
        ctx.record(m.layer_node, folded)
        self.reroute(m, ctx)
        ctx.remove_site(site)
        notes = list(site.notes)
        if created:
            notes.append(
                f"{m.layer_name} is shared (called or referenced elsewhere): only this call "
                f"({m.layer_node.name}) uses the folded copy {created}"
            )
        return FoldEntry(
            bn=site.name,
            bn_type=site.type_name,
            status="folded",
            chain=site.chain,
            into=m.layer_name,
            layer_type=type(layer).__name__,
            direction=self.direction,
            new_module=created,
            temperature=site.temperature,
            chain_stop=site.chain_stop,
            max_rel_weight_change=weight_change(site),
            subnormals_flushed=w.subnormals_flushed + b.subnormals_flushed,
            notes=notes,
        )

    def _common_check(
        self, m: Match, ctx: FoldContext, tensor_node: fx.Node | None, channels: int
    ) -> Refusal | None:
        """Hooks, float dtype, and the layout: ``tensor_node`` (the layer side of the BN) must have
        the layer's batched rank and the BN's channels on dim 1."""
        site, layer = m.site, m.layer
        refusal = layer_refusal(layer, m.layer_name)
        if refusal is not None:
            return refusal
        shape = ctx.shape(tensor_node)
        if ctx.dtype(tensor_node) != ctx.dtype(site.end):
            return Refusal(
                "dtype",
                f"{site.name} and its chain turn {_dt(ctx.dtype(tensor_node))} into "
                f"{_dt(ctx.dtype(site.end))}; the folded layer would keep "
                f"{_dt(ctx.dtype(tensor_node))}",
            )
        rank = expected_rank(layer)
        if shape is None or len(shape) != rank or shape[1] != site.channels:
            return Refusal(
                "layout",
                f"{site.name} normalizes dim 1 of a {list(shape or ())} tensor but "
                f"{m.layer_name}'s {channels} channels/features are dim 1 only of a rank-{rank} "
                "batched tensor",
            )
        if channels != site.channels:
            return Refusal(
                "layout",
                f"{site.name} has {site.channels} channels, {m.layer_name} {channels}",
            )
        return None


def _groups(layer: nn.Module) -> int:
    return int(getattr(layer, "groups", 1))


def _out_channels(layer: nn.Module) -> int:
    return int(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)  # type: ignore[arg-type]


def _in_channels(layer: nn.Module) -> int:
    return int(layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels)  # type: ignore[arg-type]


class FoldAfter(Pattern):
    """``layer → BN → chain``: ``W' = W·s`` on the output-channel axis (hook: `kind`), ``b' = s·b +
    t``."""

    direction: ClassVar[Direction] = "after"

    def match(self, site: BNSite, ctx: FoldContext) -> Match | None:
        src = site.input
        if src is None or not self.is_layer(src, ctx):
            return None
        layer = ctx.module(src)
        assert layer is not None
        return Match(site, src, layer)

    def check(self, m: Match, ctx: FoldContext) -> Refusal | None:
        users = data_users(m.layer_node)
        if len(users) != 1:
            others = ", ".join(ctx.describe(u) for u in users if u is not m.site.node)
            return Refusal(
                "multi_user",
                f"the output of {m.layer_name} ({m.layer_node.name}) has {len(users)} users "
                f"({m.site.name} and {others}); folding {m.site.name} into it would change what "
                "the others see",
            )
        return self._common_check(m, ctx, m.layer_node, _out_channels(m.layer))

    def fold(self, m: Match, ctx: FoldContext) -> fm.Folded:
        s = m.site
        weight, bias = ctx.params64(m.layer_node)
        return fm.fold_after(self.kind, weight, bias, s.scale, s.shift, _groups(m.layer))

    def reroute(self, m: Match, ctx: FoldContext) -> None:
        m.site.end.replace_all_uses_with(m.layer_node)


class ConvThenBN(FoldAfter):
    """Conv1d/2d/3d (any groups, stride, dilation, padding mode, bias) → BN → chain."""

    kind: ClassVar[fm.LayerKind] = "conv"


class ConvTransposeThenBN(FoldAfter):
    """ConvTranspose1d/2d/3d (any groups incl. depthwise) → BN → chain; scales weight axis 1 per
    group."""

    kind: ClassVar[fm.LayerKind] = "conv_transpose"


class LinearThenBN(FoldAfter):
    """Linear → BatchNorm1d on ``[N, C]`` → chain."""

    kind: ClassVar[fm.LayerKind] = "linear"


class FoldBefore(Pattern):
    """``BN → chain → layer``: the scale goes on the input-channel axis, the shift into the bias."""

    direction: ClassVar[Direction] = "before"

    def is_layer(self, node: object, ctx: FoldContext) -> bool:
        """torch's own layers only: a custom forward may pad at run time (see `layer_kind`)."""
        return layer_kind(ctx.module(node), probe=False) == self.kind

    def match(self, site: BNSite, ctx: FoldContext) -> Match | None:
        for user in site.end.users:
            if self.is_layer(user, ctx) and user.args and user.args[0] is site.end:
                layer = ctx.module(user)
                assert layer is not None
                return Match(site, user, layer)
        return None

    def exactness(self, m: Match) -> Refusal | None:
        """Hook: why this layer can't absorb the shift exactly (None: it can)."""
        return None

    def check(self, m: Match, ctx: FoldContext) -> Refusal | None:
        site = m.site
        users = list(site.end.users)
        if len(users) != 1:
            others = ", ".join(ctx.describe(u) for u in users if u is not m.layer_node)
            return Refusal(
                "multi_user",
                f"the output of {site.name}{' and its chain' if site.chain_nodes else ''} has "
                f"{len(users)} users ({m.layer_name} and {others}); it can fold into "
                f"{m.layer_name} only if that is its one user",
            )
        refusal = self._common_check(m, ctx, site.input, _in_channels(m.layer))
        return refusal or self.exactness(m)

    def fold(self, m: Match, ctx: FoldContext) -> fm.Folded:
        s = m.site
        weight, bias = ctx.params64(m.layer_node)
        return fm.fold_before(self.kind, weight, bias, s.scale, s.shift, _groups(m.layer))

    def reroute(self, m: Match, ctx: FoldContext) -> None:
        bn_input = m.site.input
        assert bn_input is not None
        m.layer_node.replace_input_with(m.site.end, bn_input)


def _max_shift(m: Match) -> str:
    return f"max |shift| = {float(m.site.shift.abs().max()):.3g}"


def _zero_pads(layer: nn.Module) -> bool:
    """Whether the conv pads its input with zeros."""
    if getattr(layer, "padding_mode", "zeros") != "zeros":
        return False
    padding = layer.padding  # type: ignore[union-attr]
    if padding == "valid":
        return False
    if padding == "same":
        return any(
            d * (k - 1) > 0
            for d, k in zip(layer.dilation, layer.kernel_size, strict=True)  # type: ignore[union-attr]
        )
    return any(int(p) != 0 for p in padding)  # type: ignore[union-attr]


class BNThenConv(FoldBefore):
    """BN → chain → Conv: exact with padding 0, a copying ``padding_mode`` or a zero shift."""

    kind: ClassVar[fm.LayerKind] = "conv"

    def exactness(self, m: Match) -> Refusal | None:
        if _zero_pads(m.layer) and bool((m.site.shift != 0).any()):
            return Refusal(
                "not_exact_padding",
                f"{m.layer_name} zero-pads its input (padding={m.layer.padding}) and "
                f"{m.site.name} has a non-zero shift ({_max_shift(m)}): after folding, the padded "
                "border would act as 0 instead of the shift, so border outputs would change; it "
                "folds exactly only with padding 0, a reflect/replicate/circular padding_mode, "
                "or a zero shift",
            )
        return None


class BNThenConvTranspose(FoldBefore):
    """BN → chain → ConvTranspose: exact only with a zero shift (scale on weight axis 0)."""

    kind: ClassVar[fm.LayerKind] = "conv_transpose"

    def exactness(self, m: Match) -> Refusal | None:
        if bool((m.site.shift != 0).any()):
            return Refusal(
                "not_exact_transpose",
                f"{m.site.name} has a non-zero shift ({_max_shift(m)}) and {m.layer_name} is a "
                "transposed conv: it spreads a constant input unevenly near the borders, so the "
                "shift can't become a bias exactly",
            )
        return None


class BNThenLinear(FoldBefore):
    """BatchNorm1d on ``[N, C]`` → chain → Linear: ``W' = W·diag(s)``, ``b' = b + W·t``."""

    kind: ClassVar[fm.LayerKind] = "linear"


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
            width = _out_channels(layer)
            s, t = site.scale[offset : offset + width], site.shift[offset : offset + width]
            offset += width
            name = str(part.target)
            weight, bias = ctx.params64(part)
            folded = fm.fold_after(kind, weight, bias, s, t, _groups(layer))
            w, b = cast_folded(folded, layer, name)
            created = ctx.install(part, new_layer(layer, w.tensor, b.tensor))
            ctx.record(part, folded)
            flushed += w.subnormals_flushed + b.subnormals_flushed
            if created:
                notes.append(f"{name} is shared: only this call uses the folded copy {created}")
            names.append(name)
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


#: Tried in this order for every BatchNorm: after a layer first (always exact), after a concat of
#: layers, then before a layer.
PATTERNS: tuple[Rule, ...] = (
    ConvThenBN(),
    ConvTransposeThenBN(),
    LinearThenBN(),
    ConcatThenBN(),
    BNThenConv(),
    BNThenConvTranspose(),
    BNThenLinear(),
)
