"""The rewrite state of one fold: the GraphModule being folded, the folded parameters in float64,
and the node rewrites that keep shared modules intact.

The rules that make a rewrite safe live here: a layer module is replaced in place only when exactly
one node calls it and nothing else reaches it; otherwise the folding call gets a *new* module and
every other call keeps the original (never the pytorch#104593 bug of rewriting a shared module).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from bnexport.fold import math as fm
from bnexport.fold.constants import float64_copy, has_path
from bnexport.fold.sites import BNSite
from bnexport.fold.view import GraphView


@dataclass(frozen=True)
class Probe:
    """One fold step as the graphs see it, for localizing a fold that went wrong: the value the
    folded graph computes (node ``folded``) replaces the unfolded graph's value ``reference``
    (the BN chain's end, or the layer's output for a fold before it). ``key``: the BatchNorm's (or
    chain layer's) name in the graph, the key to leave it unfolded (`FoldContext.excluded`)."""

    key: str
    into: str
    folded: str
    reference: str


class FoldContext(GraphView):
    """The GraphModule being folded, with the bookkeeping for safe node rewrites."""

    def __init__(
        self,
        gm: fx.GraphModule,
        memo64: dict[int, torch.Tensor] | None = None,
        excluded: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(gm)
        #: BatchNorms (and chain layers) to leave unfolded, by name, with the reason.
        self.excluded: Mapping[str, str] = excluded or {}
        #: Every fold step done, in the order done (`Probe`).
        self.probes: list[Probe] = []
        #: Float64 copies of the layers' original parameters (tensor id → copy), shared with the
        #: self-check (`bnexport.fold.verify.run_float64`), which needs the same copies.
        self.memo64: dict[int, torch.Tensor] = {} if memo64 is None else memo64
        self.removed_attrs: set[str] = set()
        #: The folded parameters in float64, before their one cast (``path.weight`` → tensor):
        #: later folds into the same layer start from them, and the self-check runs with them.
        self.exact: dict[str, torch.Tensor] = {}
        self._path_counts: dict[int, int] | None = None

    def _paths_to(self, module: nn.Module) -> int:
        """How many module paths reach ``module`` (a module registered twice is shared). The
        count for the modules of the traced graph is taken once: folding only adds new modules
        (one path each) or replaces a module at its own path."""
        if self._path_counts is None:
            self._path_counts = {}
            for _, m in self.gm.named_modules(remove_duplicate=False):
                self._path_counts[id(m)] = self._path_counts.get(id(m), 0) + 1
        return self._path_counts.get(id(module), 1)

    def params64(self, node: fx.Node) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias of the layer ``node`` calls in float64: the exact values if already
        folded, else float64 copies of its parameters."""
        layer: Any = self.module(node)
        path = str(node.target)
        weight, bias = self.exact.get(f"{path}.weight"), self.exact.get(f"{path}.bias")
        return (
            self._f64(layer.weight) if weight is None else weight,
            self._f64(layer.bias) if bias is None else bias,
        )

    def _f64(self, t: torch.Tensor | None) -> Any:
        return None if t is None else float64_copy(t, self.memo64)

    def record(self, node: fx.Node, folded: fm.Folded) -> None:
        """Keep the float64 parameters of the layer ``node`` now calls (after `install`)."""
        path = str(node.target)
        self.exact[f"{path}.weight"] = folded.weight
        self.exact[f"{path}.bias"] = folded.bias

    def install(self, node: fx.Node, new_module: nn.Module) -> str | None:
        """Make ``node`` call ``new_module``; return the new module's name if one was created.

        In place only when ``node`` is the module's one call and nothing else reaches the module (no
        other call, no get_attr into it, no second path to it, not inside a called leaf module);
        otherwise a new module ``<target>_folded[N]`` is added for this call only.
        """
        target = str(node.target)
        old = self.gm.get_submodule(target)
        calls, reached = 0, False  # other calls; a get_attr into it, or a called module around it
        for n in self.gm.graph.nodes:
            t = str(n.target)
            if n.op == "call_module":
                calls += t == target
                reached = reached or target.startswith(t + ".")
            elif n.op == "get_attr":
                reached = reached or t == target or t.startswith(target + ".")
        if calls <= 1 and not reached and self._paths_to(old) <= 1:
            parent, _, leaf = target.rpartition(".")
            setattr(self.gm.get_submodule(parent), leaf, new_module)
            self.set_module(target, new_module)
            return None
        base = f"{target}_folded"
        name, k = base, 1
        while has_path(self.gm, name):
            k += 1
            name = f"{base}{k}"
        self.gm.add_submodule(name, new_module)
        self.set_module(name, new_module)
        node.target = name
        return name

    def remove_site(self, site: BNSite, keep_node: bool = False) -> None:
        """Erase the chain and BN nodes (their uses already rerouted) and now-dead constants;
        ``keep_node``: the site's node is the layer itself (a chain without BatchNorm)."""
        nodes = site.chain_nodes if keep_node else [site.node, *site.chain_nodes]
        for n in reversed(nodes):
            self.gm.graph.erase_node(n)
        self.erase_dead([*site.args, *(n for c in site.consts for n in c.nodes)])

    def erase_dead(self, nodes: Iterable[fx.Node]) -> None:
        """Erase the constant-computing ``nodes`` nothing reads any more, and their inputs in
        turn; remember the attributes they read (`finish` drops those left unused)."""
        for n in nodes:
            if n._erased or n.users or n.op not in ("get_attr", "call_function", "call_method"):
                continue
            inputs = list(n.all_input_nodes)
            if n.op == "get_attr":
                self.removed_attrs.add(str(n.target))
            self.gm.graph.erase_node(n)
            self.erase_dead(inputs)

    def finish(self) -> None:
        """Lint, drop unused submodules and orphaned constants, recompile."""
        graph = self.gm.graph
        graph.lint()
        live_attrs = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
        called = [str(n.target) for n in graph.nodes if n.op == "call_module"]
        for target in sorted(self.removed_attrs - live_attrs):
            owner_path, _, fieldname = target.rpartition(".")
            if any(c == owner_path or owner_path.startswith(c + ".") for c in called if owner_path):
                continue  # a called (leaf) module may read it in its own forward
            if not has_path(self.gm, target):
                continue
            owner = self.gm.get_submodule(owner_path)
            if fieldname in owner._parameters:
                del owner._parameters[fieldname]
            elif fieldname in owner._buffers:
                del owner._buffers[fieldname]
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()
