"""The fold rule interface (``match`` / ``check`` / ``rewrite``), the one-layer `Pattern` whose
variants override hooks, and the checks every rule shares (layer hooks, dtype, layout, the one
checked cast of the folded parameters)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch import nn

from bnexport.fold import math as fm
from bnexport.fold.context import FoldContext, Probe
from bnexport.fold.layers import layer_hook_reason, layer_kind, new_layer
from bnexport.fold.layout import describe_path, keeps_channels
from bnexport.fold.report import Direction, FoldEntry
from bnexport.fold.sites import BNSite


@dataclass
class Match:
    """A BN site next to a layer call, with the layout ops between them (graph order; they keep
    the channel axis if the check passes)."""

    site: BNSite
    layer_node: fx.Node
    layer: nn.Module
    layer_name: str = ""
    path: list[fx.Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.layer_name = self.layer_name or str(self.layer_node.target)


@dataclass
class Refusal:
    """Why a matched pattern can't fold: a `REASONS` code and a sentence for the report."""

    code: str
    reason: str


def dtype_name(dtype: torch.dtype | None) -> str:
    """``float32`` for ``torch.float32`` (for reasons in the report)."""
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
        return Refusal("dtype", f"{name} has a {dtype_name(layer.weight.dtype)} weight")  # type: ignore[union-attr]
    return None


def expected_rank(layer: nn.Module) -> int:
    """Rank of the layer's batched input/output whose dim 1 is its channel/feature dim."""
    return 2 if isinstance(layer, nn.Linear) else len(layer.kernel_size) + 2  # type: ignore[arg-type]


def channel_axis(layer: nn.Module, shape: Sequence[int] | None) -> int | None:
    """The channel/feature axis of the layer's input or output ``shape``: a Linear's last dim, a
    conv's dim 1 (dim 0 unbatched); None for a rank the layer doesn't take."""
    if shape is None:
        return None
    if isinstance(layer, nn.Linear):
        return len(shape) - 1 if len(shape) >= 1 else None
    rank = len(layer.kernel_size)  # type: ignore[arg-type]
    return {rank + 2: 1, rank + 1: 0}.get(len(shape))


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
        after = self.direction == "after"
        out = (m.path[-1] if m.path else m.layer_node) if after else m.layer_node
        ref = site.end if after else m.layer_node
        ctx.probes.append(Probe(site.name, m.layer_name, out.name, ref.name))
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

    def common_check(self, m: Match, ctx: FoldContext, channels: int) -> Refusal | None:
        """Hooks, float dtype, and the layout: the BN's dim 1 must be the layer's channel/feature
        axis, through the layout ops between them (`bnexport.fold.layout`)."""
        site, layer = m.site, m.layer
        refusal = layer_refusal(layer, m.layer_name)
        if refusal is not None:
            return refusal
        tensor_node = m.layer_node if self.direction == "after" else site.input
        if ctx.dtype(tensor_node) != ctx.dtype(site.end):
            return Refusal(
                "dtype",
                f"{site.name} and its chain turn {dtype_name(ctx.dtype(tensor_node))} into "
                f"{dtype_name(ctx.dtype(site.end))}; the folded layer would keep "
                f"{dtype_name(ctx.dtype(tensor_node))}",
            )
        if not self.keeps_layout(m, ctx):
            shape = list(ctx.shape(site.input) or ())
            ops = f" after {describe_path(m.path)}" if m.path else ""
            return Refusal(
                "layout",
                f"{site.name} normalizes dim 1 of a {shape} tensor, which{ops} is not "
                f"{m.layer_name}'s {channels} channels/features (a Linear's last dim, a conv's "
                "dim 1 of a batched tensor)",
            )
        if channels != site.channels:
            return Refusal(
                "layout",
                f"{site.name} has {site.channels} channels, {m.layer_name} {channels}",
            )
        return None

    def keeps_layout(self, m: Match, ctx: FoldContext) -> bool:
        """Whether the BN's channels are the layer's, element for element (direction hook)."""
        if self.direction == "after":
            axis = channel_axis(m.layer, ctx.shape(m.layer_node))
            return axis is not None and keeps_channels(ctx, m.layer_node, axis, m.path, 1)
        layer_input = m.path[-1] if m.path else m.site.end
        axis = channel_axis(m.layer, ctx.shape(layer_input))
        return axis is not None and keeps_channels(ctx, m.site.end, 1, m.path, axis)


def groups(layer: nn.Module) -> int:
    """The layer's groups (1 for Linear)."""
    return int(getattr(layer, "groups", 1))


def out_channels(layer: nn.Module) -> int:
    """Output channels of a Conv/ConvTranspose, output features of a Linear."""
    return int(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)  # type: ignore[arg-type]


def in_channels(layer: nn.Module) -> int:
    """Input channels of a Conv/ConvTranspose, input features of a Linear."""
    return int(layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels)  # type: ignore[arg-type]
