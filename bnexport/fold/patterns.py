"""Fold patterns, one class per case, each as ``match`` (structure) / ``check`` (is it exact and
safe?) / ``rewrite`` (new parameters, node edits, report entry); `PATTERNS` in the order they are
tried.

After a layer (``layer → BN → chain``), folded as ``W' = W·s`` on the output-channel axis and
``b' = s·b + t``; the variants differ only in the `kind` hook that picks the axis (Conv: 0,
ConvTranspose: 1 per group, Linear: 0). Before a layer (``BN → chain → layer``): the scale moves to
the input-channel axis and the shift into the bias; the variants add their exactness rule (Conv: no
zero padding or a zero shift; ConvTranspose: a zero shift). After a channel concat of layers:
`bnexport.fold.concat`. The rule interface: `bnexport.fold.rules`; the math: `bnexport.fold.math`.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from bnexport.fold import math as fm
from bnexport.fold.concat import ConcatThenBN
from bnexport.fold.context import FoldContext
from bnexport.fold.layers import layer_kind
from bnexport.fold.layout import walk_back, walk_forward
from bnexport.fold.report import Direction
from bnexport.fold.rules import Match, Pattern, Refusal, Rule, groups, in_channels, out_channels
from bnexport.fold.sites import BNSite
from bnexport.fold.view import data_users


class FoldAfter(Pattern):
    """``layer → BN → chain``: ``W' = W·s`` on the output-channel axis (hook: `kind`), ``b' = s·b +
    t``."""

    direction: ClassVar[Direction] = "after"

    def match(self, site: BNSite, ctx: FoldContext) -> Match | None:
        src, path = walk_back(site.input)  # through reshapes that may keep the channel axis
        if src is None or not self.is_layer(src, ctx):
            return None
        layer = ctx.module(src)
        assert layer is not None
        return Match(site, src, layer, path=path)

    def check(self, m: Match, ctx: FoldContext) -> Refusal | None:
        chain = [m.layer_node, *m.path]
        for node, reader in zip(chain, [*m.path, m.site.node], strict=True):
            users = data_users(node)
            if len(users) != 1:
                others = ", ".join(ctx.describe(u) for u in users if u is not reader)
                return Refusal(
                    "multi_user",
                    f"the output of {m.layer_name if node is m.layer_node else node.name} "
                    f"({node.name}) has {len(users)} users ({ctx.describe(reader)} and "
                    f"{others}); folding {m.site.name} into {m.layer_name} would change what the "
                    "others see",
                )
        return self.common_check(m, ctx, out_channels(m.layer))

    def fold(self, m: Match, ctx: FoldContext) -> fm.Folded:
        s = m.site
        weight, bias = ctx.params64(m.layer_node)
        return fm.fold_after(self.kind, weight, bias, s.scale, s.shift, groups(m.layer))

    def reroute(self, m: Match, ctx: FoldContext) -> None:
        m.site.end.replace_all_uses_with(m.path[-1] if m.path else m.layer_node)


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
        user, path = walk_forward(site.end)  # through reshapes that may keep the channel axis
        if path and user is not None and self.is_layer(user, ctx) and user.args[0] is path[-1]:
            layer = ctx.module(user)
            assert layer is not None
            return Match(site, user, layer, path=path)
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
        refusal = self.common_check(m, ctx, in_channels(m.layer))
        return refusal or self.exactness(m)

    def fold(self, m: Match, ctx: FoldContext) -> fm.Folded:
        s = m.site
        weight, bias = ctx.params64(m.layer_node)
        return fm.fold_before(self.kind, weight, bias, s.scale, s.shift, groups(m.layer))

    def reroute(self, m: Match, ctx: FoldContext) -> None:
        bn_input = m.site.input
        assert bn_input is not None
        (m.path[0] if m.path else m.layer_node).replace_input_with(m.site.end, bn_input)


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
