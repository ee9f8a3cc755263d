"""Folding a model whose own ``forward`` can't be traced (Python branching on tensor values at the
top level, ``if x.abs().max() > 1e3:``): each direct child is folded on its own, with the inputs it
receives when the model runs the example inputs, and the model keeps its own forward.

Each child is folded and self-checked like a model of its own (`fold_model`, recursively: a child
whose forward can't be traced is split the same way). What can't be folded this way is reported:
a BatchNorm the top-level forward calls itself, a child called more than once (its inputs may
differ from call to call) or not at all.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bnexport.errors import FoldError
from bnexport.fold.batchnorm import is_batchnorm_class
from bnexport.fold.report import ChainEntry, FoldEntry, FoldReport


@dataclass
class ChildrenFold:
    """The model with its foldable children replaced by their folded modules, and the report."""

    module: nn.Module
    entries: list[FoldEntry] = field(default_factory=list)
    chains: list[ChainEntry] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)  # each child's self-check
    steps: list[dict[str, Any]] = field(default_factory=list)  # each child's localized steps
    notes: list[str] = field(default_factory=list)


def child_calls(model: nn.Module, inputs: tuple[Any, ...]) -> dict[str, list[tuple[Any, ...]]]:
    """The positional inputs of every call of each direct child of ``model`` on ``inputs``."""
    calls: dict[str, list[tuple[Any, ...]]] = {}
    handles = []
    for name, child in model.named_children():

        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], n: str = name):
            calls.setdefault(n, []).append(args if not kwargs else ())

        handles.append(child.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _left(path: str, module: nn.Module, code: str, reason: str) -> list[FoldEntry]:
    """A left entry for every BatchNorm in ``module`` (at ``path``)."""
    return [
        FoldEntry(
            bn=f"{path}.{name}" if name else path,
            bn_type=type(sub).__name__,
            status="left",
            chain=type(sub).__name__,
            reason_code=code,
            reason=reason,
        )
        for name, sub in module.named_modules()
        if is_batchnorm_class(sub)
    ]


def _prefixed(report: FoldReport, path: str) -> tuple[list[FoldEntry], list[ChainEntry]]:
    """The child's entries with their module paths under ``path``."""
    entries = [copy.copy(e) for e in report.entries]
    for e in entries:
        e.bn = f"{path}.{e.bn}"
        e.into = f"{path}.{e.into}" if e.into else e.into
        e.new_module = f"{path}.{e.new_module}" if e.new_module else e.new_module
    chains = [copy.copy(c) for c in report.chains]
    for c in chains:
        c.layer = f"{path}.{c.layer}"
    return entries, chains


def fold_children(
    model: nn.Module,
    inputs: tuple[Any, ...],
    why: str,
    fold: Callable[[nn.Module, tuple[Any, ...]], Any],
) -> ChildrenFold:
    """Fold each direct child of ``model`` (eval mode, not modified) with ``fold(child, args)``
    (a `fold_model`); ``why``: why the model's own forward can't be traced."""
    calls = child_calls(model, inputs)
    shell = copy.copy(model)  # the model's forward and attributes, its own dict of children
    shell._modules = dict(model._modules)
    result = ChildrenFold(shell)
    top = type(model).__name__
    for name, child in model.named_children():
        if not any(is_batchnorm_class(m) for m in child.modules()):
            continue
        if is_batchnorm_class(child):
            reason = f"called by {top}.forward itself, which torch.fx can't trace ({why})"
            result.entries += _left(name, child, "not_traceable", reason)
            continue
        n = len(calls.get(name, []))
        if n != 1 or not calls[name][0]:
            how = "not called" if n == 0 else f"called {n} times" if n > 1 else "called by keyword"
            reason = (
                f"inside {name}, {how} by {top}.forward, which torch.fx can't trace ({why}): "
                "folded only when called once with positional inputs"
            )
            result.entries += _left(name, child, "not_traceable", reason)
            continue
        try:
            folded = fold(child, calls[name][0])
        except FoldError as exc:
            result.entries += _left(name, child, "not_traceable", f"{name} can't be folded: {exc}")
            continue
        shell._modules[name] = folded.module
        entries, chains = _prefixed(folded.report, name)
        result.entries += entries
        result.chains += chains
        result.notes += [f"{name}: {note}" for note in folded.report.notes]
        if folded.report.verification:
            result.checks.append(folded.report.verification)
        for step in (folded.report.localization or {}).get("steps", []):
            result.steps.append(
                {**step, "bn": f"{name}.{step['bn']}", "into": f"{name}.{step['into']}"}
            )
    result.notes.insert(
        0,
        f"{top}.forward can't be traced ({why}): each of its children was folded on its own, "
        "with the inputs it receives, and self-checked; the model keeps its forward",
    )
    return result
