"""The fold report: one entry per BatchNorm (folded into what, with which chain, or why it was
left).

Plain data: no printing. ``str(report)`` renders a readable multi-line text; ``to_dict()`` is
JSON-ready.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

Status = Literal["folded", "left"]
Direction = Literal["after", "before"]

#: Reason codes for a BatchNorm left in the graph (``FoldEntry.reason_code``), with what they mean.
REASONS: dict[str, str] = {
    "untracked_stats": "BatchNorm has no running statistics (track_running_stats=False): it uses "
    "batch statistics even in eval mode",
    "multi_user": "the layer's output (or the BatchNorm chain's output) has more than one user",
    "no_adjacent_layer": "no Conv/ConvTranspose/Linear module directly before or after the "
    "BatchNorm: none at all, or one separated from it by an op that is neither a constant "
    "scale/shift nor a reshape keeping the channel axis",
    "nonlinearity": "a nonlinearity sits between the layer and the BatchNorm",
    "not_exact_padding": "BN → Conv with zero padding and a non-zero shift (borders would differ)",
    "not_exact_transpose": "BN → ConvTranspose with a non-zero shift (borders would differ)",
    "custom_layer": "the neighbouring layer is a Conv/Linear subclass with its own forward that "
    "is not linear in its stored weight (probed), or comes after the BatchNorm",
    "layout": "the BatchNorm's channel dim is not the layer's channel/feature dim",
    "dtype": "the BatchNorm or its chain changes the dtype, or the layer is not floating point",
    "layer_hooks": "the layer has hooks or a parametrization that recompute its weight",
    "functional_training": "a functional batch_norm call with training=True (batch statistics)",
    "functional_input": "a functional batch_norm whose statistics/parameters are not constants",
    "not_batchnorm": "a module with BatchNorm statistics whose forward computes something else",
    "leaf_module": "not traced: kept as a leaf (leaf_modules), or inside such a module",
    "not_traceable": "inside a block torch.fx can't trace, run as a black box",
    "self_check": "folding it failed the float64 self-check (localized to it), so it was left "
    "unfolded and the rest of the fold checked exact",
}


@dataclass
class FoldEntry:
    """What happened to one BatchNorm.

    ``chain`` describes the folded affine chain, e.g. ``"BatchNorm2d → ×1.5 → +buffer offset[32]"``.
    ``max_rel_weight_change`` is the largest ``|W' − W|/|W|`` over the layer's nonzero weights.
    ``chain_stop`` says why a chain of arithmetic after the BN stopped early (that op stays in the
    graph).
    """

    bn: str
    bn_type: str
    status: Status
    chain: str
    into: str | None = None
    layer_type: str | None = None
    direction: Direction | None = None
    new_module: str | None = None
    temperature: float | None = None
    reason_code: str | None = None
    reason: str | None = None
    chain_stop: str | None = None
    max_rel_weight_change: float | None = None
    subnormals_flushed: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        head = f"{self.bn} ({self.bn_type})"
        if self.status == "folded":
            where = f"{self.into} ({self.layer_type})"
            if self.new_module:
                where += f" as new module {self.new_module} (the shared module is untouched)"
            line = f"folded  {head} {self.direction} {where}: {self.chain}"
            if self.max_rel_weight_change is not None:
                line += f"; max weight change {self.max_rel_weight_change:.3g}"
            if self.subnormals_flushed:
                line += f"; {self.subnormals_flushed} subnormals flushed to 0"
        else:
            line = f"left    {head}: {self.reason}"
        extra = [f"chain stops: {self.chain_stop}"] if self.chain_stop else []
        extra += self.notes
        return "\n".join([line, *(f"          {e}" for e in extra)])


@dataclass
class ChainEntry:
    """A constant scale/shift chain right after a layer, without a BatchNorm (``linear(x) / T``),
    folded into the layer or left with the reason."""

    layer: str
    layer_type: str
    chain: str
    status: Status
    reason: str | None = None
    chain_stop: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        if self.status == "folded":
            line = f"folded  {self.chain} into {self.layer} ({self.layer_type})"
        else:
            line = f"left    {self.chain} after {self.layer} ({self.layer_type}): {self.reason}"
        extra = [f"chain stops: {self.chain_stop}"] if self.chain_stop else []
        extra += self.notes
        return "\n".join([line, *(f"          {e}" for e in extra)])


@dataclass
class FoldReport:
    """All entries (graph order), the scale/shift chains folded without a BatchNorm, notes (e.g.
    the train-mode note) and the float64 verification."""

    entries: list[FoldEntry] = field(default_factory=list)
    chains: list[ChainEntry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verification: dict[str, Any] | None = None
    localization: dict[str, Any] | None = None  # `bnexport.fold.localize.Localization.to_dict`

    @property
    def folded(self) -> list[FoldEntry]:
        return [e for e in self.entries if e.status == "folded"]

    @property
    def left(self) -> list[FoldEntry]:
        return [e for e in self.entries if e.status == "left"]

    def entry(self, bn: str) -> FoldEntry:
        """The entry for the BatchNorm with qualified name ``bn`` (KeyError if none)."""
        for e in self.entries:
            if e.bn == bn:
                return e
        raise KeyError(bn)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batchnorms": len(self.entries),
            "folded": len(self.folded),
            "left": len(self.left),
            "entries": [e.to_dict() for e in self.entries],
            "chains": [c.to_dict() for c in self.chains],
            "notes": list(self.notes),
            "verification": self.verification,
            "localization": self.localization,
        }

    def __str__(self) -> str:
        lines = [
            f"Fold report: {len(self.folded)} folded, {len(self.left)} left "
            f"(of {len(self.entries)} BatchNorm{'s' if len(self.entries) != 1 else ''})"
        ]
        lines += [f"  {line}" for e in self.entries for line in str(e).splitlines()]
        if self.chains:
            lines.append(f"  scale/shift chains after a layer (no BatchNorm): {len(self.chains)}")
            lines += [f"  {line}" for c in self.chains for line in str(c).splitlines()]
        if self.verification:
            v = self.verification
            lines.append(f"  {verification_line(v)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def verification_line(v: dict[str, Any]) -> str:
    """One line for the fold's float64 self-check (`bnexport.fold.self_check`'s numbers)."""
    ratio = v["relative_error"] / v["noise_floor"] if v["noise_floor"] else 0.0
    return (
        f"self-check: folded in float64 vs unfolded, error {v['relative_error']:.2g} of the "
        f"output scale = {ratio:.2g}× the float64 noise floor {v['noise_floor']:.2g} "
        f"(limit {v['factor']:g}×): exact"
    )


def renamed_back(text: str, renames: Mapping[str, str]) -> str:
    """``text`` with each module path starting with a renamed top-level name (``meta_.0``) written
    with the model's own name (``meta.0``); other words (``meta__0``) stay."""
    for new in sorted(renames, key=len, reverse=True):
        text = re.sub(rf"(?<![\w.]){re.escape(new)}(?!\w)", renames[new], text)
    return text


def rename_entries(items: list[Any], renames: Mapping[str, str]) -> None:
    """Apply `renamed_back` to every text field of report entries (in place)."""
    if not renames:
        return
    for item in items:
        for f in fields(item):
            value = getattr(item, f.name)
            if isinstance(value, str):
                setattr(item, f.name, renamed_back(value, renames))
            elif isinstance(value, list):
                setattr(item, f.name, [renamed_back(v, renames) for v in value])
