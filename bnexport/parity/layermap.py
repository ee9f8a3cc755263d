"""Module outputs of the unfolded PyTorch model ↔ values of the exported graph.

The graph's module-output table (`bnexport.parity.onnx_graph`) says which value each module call
of the *exported* model returns. For a file exported unfolded (or by torch itself) those are the
unfolded model's modules, matched by path and call index. For a folded file they are the folded
model's: a conv that absorbed a BatchNorm chain (conv → BN → temperature …) returns the chain's
output, so its value is matched to the chain's **last module** of the unfolded model: the
innermost of the BatchNorm and its ancestors whose output is that value, proved by one forward of
the folded and the unfolded model on one sample (agreement to `CHAIN_MATCH_RTOL`, where the
candidates differ by the BatchNorm's own change of scale). Every module call that gets no value
is listed with the reason — fused into a fold chain, an identity in eval mode, not in the table —
and is never guessed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnexport.parity.layers import OUTPUT_PREFIX, Call, Layer, call_key, record_calls
from bnexport.parity.onnx_graph import GraphView
from bnexport.runners import Feed, TorchRunner

#: A fold chain's end is the candidate module whose output the folded layer's matches to this
#: relative error (one sample, fp32 on both sides: ~1e-6 measured on resnet50's deepest chain; a
#: wrong candidate differs by the BatchNorm's scale, shift or the activation after it: ≥ 1e-2).
CHAIN_MATCH_RTOL = 1e-3
#: Module types that are the identity in eval mode (the fold removes them; no value is theirs).
IDENTITY_TYPES = frozenset({"Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d"})


@dataclass
class LayerMap:
    """The mapped layers in execution order (model outputs last), every other module call with
    why it has no value, and where the graph's table came from."""

    layers: list[Layer]
    unmapped: dict[str, str]
    calls: int
    source: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "module_calls": self.calls,
            "mapped": sum(1 + len(x.aliases) for x in self.layers if x.module),
            "unmapped": [{"module": k, "reason": v} for k, v in self.unmapped.items()],
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class _Chain:
    """A folded chain: the layer module that computes it in the folded model, the modules whose
    output may be its end (innermost first), its modules and its description."""

    target: str
    candidates: tuple[str, ...]
    members: tuple[str, ...]
    text: str


def map_layers(
    view: GraphView,
    reference: TorchRunner,
    feed: Feed,
    *,
    fold_report: Any = None,
    folded: Any = None,
) -> LayerMap:
    """Map the unfolded ``reference``'s module calls to ``view``'s values (module docstring);
    ``feed`` is one sample, ``fold_report``/``folded`` the fold of the model, used when the file
    says it was exported folded."""
    is_folded = _file_folded(view)
    chains = _chains(fold_report) if is_folded and fold_report is not None else {}
    keep = {call_key(c, 0) for ch in chains.values() for c in ch.candidates}
    calls, kept = record_calls(reference, feed, keep)
    by_key = {c.key: c for c in calls}
    counts: dict[str, int] = {}
    for c in calls:
        counts[c.module] = c.call + 1
    notes: list[str] = []
    if view.source == "none":
        notes.append("the file records no module paths: only the model outputs are compared")
    folded_out = _folded_outputs(folded, feed, chains) if chains else {}
    values, unmapped = _resolve(view, by_key, counts, chains, kept, folded_out)
    layers = _layers(view, values, by_key, chains)
    layers += _output_layers(view, reference, len(calls), layers)
    for c in calls:
        if c.key not in unmapped and not any(c.key in (x.key, *x.aliases) for x in layers):
            unmapped[c.key] = _reason(c, chains, view)
    return LayerMap(layers, unmapped, len(calls), view.source, notes)


def _file_folded(view: GraphView) -> bool:
    meta = {p.key: p.value for p in view.proto.metadata_props}
    return meta.get("folded") == "true"


def _chains(report: Any) -> dict[str, _Chain]:
    """The folded chains of a `FoldReport` by the folded model's layer path."""
    chains: dict[str, _Chain] = {}
    for e in getattr(report, "entries", ()):
        if e.status != "folded" or not e.into:
            continue
        target = e.new_module or e.into
        start = e.bn if e.direction != "before" else e.into
        text = (
            f"{e.into} → {e.bn} ({e.chain})"
            if e.direction != "before"
            else (f"{e.bn} → {e.into} ({e.chain})")
        )
        chains[target] = _Chain(target, _ancestry(start), (e.into, e.bn), text)
    for c in getattr(report, "chains", ()):
        if c.status == "folded":
            chains[c.layer] = _Chain(
                c.layer, _ancestry(c.layer), (c.layer,), f"{c.layer} → {c.chain}"
            )
    return chains


def _ancestry(path: str) -> tuple[str, ...]:
    """``path`` and its ancestors, innermost first (the root left out)."""
    parts = path.split(".")
    return tuple(".".join(parts[:i]) for i in range(len(parts), 0, -1))


def _folded_outputs(folded: Any, feed: Feed, chains: Mapping[str, _Chain]) -> dict[str, Any]:
    """The folded model's output of each chain's layer (first call) on ``feed``."""
    if folded is None:
        return {}
    runner = TorchRunner(folded, list(feed), name="torch-folded")
    _, kept = record_calls(runner, feed, set(chains))
    return kept


def _resolve(
    view: GraphView,
    by_key: Mapping[str, Call],
    counts: Mapping[str, int],
    chains: Mapping[str, _Chain],
    kept: Mapping[str, Any],
    folded_out: Mapping[str, Any],
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Value → the unfolded calls that return it; and the calls found unmappable, with why."""
    table_counts: dict[str, int] = {}
    for row in view.table:
        table_counts[row.module] = max(table_counts.get(row.module, 0), row.call + 1)
    ends: dict[str, str | None] = {}
    for row in view.table:
        if row.module in chains and row.call == 0:
            ends[row.value] = _chain_end(chains[row.module], kept, folded_out.get(row.module))
    values: dict[str, list[str]] = {}
    unmapped: dict[str, str] = {}
    for row in view.table:
        key = call_key(row.module, row.call)
        if row.value in ends:
            end = ends[row.value]
            chain = next(ch for ch in chains.values() if ch.target in _owners(view, row.value))
            if end is None:
                unmapped[key] = (
                    f"returns the folded chain {chain.text}, whose end is no module's output"
                )
                continue
            if row.module == chain.target and row.module != end:
                unmapped[key] = (
                    f"fused: the file computes {chain.text} in one layer, compared at {end}"
                )
                key = end
            elif not end.startswith(row.module + ".") and row.module != end:
                unmapped[key] = f"wraps {chain.target} without the rest of {chain.text}"
                continue
        if key not in by_key:
            if row.module not in chains:
                unmapped.setdefault(
                    key, "in the file's table, not a module call of the PyTorch model"
                )
            continue
        if table_counts.get(row.module, 0) > counts.get(row.module, 0):
            unmapped[key] = "called a different number of times in the file and the PyTorch model"
            continue
        values.setdefault(row.value, []).append(key)
    return values, unmapped


def _owners(view: GraphView, value: str) -> set[str]:
    return {row.module for row in view.table if row.value == value}


def _chain_end(chain: _Chain, kept: Mapping[str, Any], folded: Any) -> str | None:
    """The innermost candidate whose unfolded output matches the folded layer's (None if none)."""
    if folded is None:
        return None
    ref = np.asarray(folded, dtype=np.float64)
    scale = float(np.abs(ref).max()) or 1.0
    for module in chain.candidates:
        out = kept.get(module)
        if out is None or np.shape(out) != ref.shape:
            continue
        if float(np.abs(np.asarray(out, dtype=np.float64) - ref).max()) <= CHAIN_MATCH_RTOL * scale:
            return module
    return None


def _layers(
    view: GraphView,
    values: Mapping[str, list[str]],
    by_key: Mapping[str, Call],
    chains: Mapping[str, _Chain],
) -> list[Layer]:
    """One layer per mapped value, named by its first call to return (the innermost module)."""
    layers = []
    for value, keys in values.items():
        calls = sorted((by_key[k] for k in dict.fromkeys(keys)), key=lambda c: c.order)
        first = calls[0]
        if (
            not first.shape
            or not first.dtype.startswith("float")
            or not _shape_fits(view, value, first)
        ):
            continue
        layers.append(
            Layer(
                key=first.key,
                module=first.module,
                call=first.call,
                kind=first.kind,
                value=value,
                order=first.order,
                position=view.position(value),
                size=int(np.prod(first.shape)),
                aliases=[c.key for c in calls[1:]],
                chain=_chain_of(first.module, chains),
                cut=value in view.cuts,
            )
        )
    layers.sort(key=lambda x: x.order)
    stops = {x.value for x in layers}
    for x in layers:
        x.nodes = view.computing_nodes(x.value, stops - {x.value})
    return layers


def _shape_fits(view: GraphView, value: str, call: Call) -> bool:
    """The graph's dims for ``value`` (where static) are the PyTorch output's."""
    dims = view.shapes.get(value)
    if dims is None:
        return True
    return len(dims) == len(call.shape) + 1 and all(
        d is None or d == s for d, s in zip(dims[1:], call.shape, strict=True)
    )


def _chain_of(module: str, chains: Mapping[str, _Chain]) -> str | None:
    """The folded chain ``module`` ends or is a member (or inside a member) of."""
    for ch in chains.values():
        if (
            module in ch.members
            or module in ch.candidates
            or any(module.startswith(m + ".") for m in ch.members)
        ):
            return ch.text
    return None


def _output_layers(
    view: GraphView, reference: TorchRunner, order: int, layers: Sequence[Layer]
) -> list[Layer]:
    """The model's outputs, last in execution order (the gate compared them already)."""
    names = reference.output_names or view.outputs
    out = []
    for i, name in enumerate(names):
        value = view.outputs[i] if i < len(view.outputs) else name
        same = next((x for x in layers if x.value == value), None)
        if same is not None:
            same.output = name
            continue
        dims = view.shapes.get(value, ())
        size = int(np.prod([d or 1 for d in dims[1:]])) if dims else 1
        out.append(
            Layer(
                key=f"{OUTPUT_PREFIX}{name}",
                module="",
                call=0,
                kind="output",
                value=value,
                order=order + i,
                position=view.position(value),
                size=size,
                cut=value in view.cuts,
                output=name,
            )
        )
    stops = {x.value for x in layers}
    for x in out:
        x.nodes = view.computing_nodes(x.value, stops)
    return out


def _reason(call: Call, chains: Mapping[str, _Chain], view: GraphView) -> str:
    """Why a module call has no value in the graph."""
    if view.source == "none":
        return "the file records no module paths"
    if call.kind in IDENTITY_TYPES:
        return f"{call.kind} is the identity in eval mode: no node computes it"
    if call.identity:
        return (
            "returns its input tensor itself (an identity here, or in place): no value of its own"
        )
    for ch in chains.values():
        if any(call.module == m or call.module.startswith(m + ".") for m in ch.members):
            return f"folded: {ch.text} is computed in one layer"
    if not call.shape:
        return "returns no single tensor"
    return "its output is computed inside other nodes (fused or inlined): no value of its own"
