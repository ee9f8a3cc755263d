"""BatchNorm sites: a BatchNorm call (module or functional) or a layer call, with the constant
scale/shift chain after it composed into one per-channel affine map, or the reason it can't fold
at all (batch statistics; a module whose forward is not the BatchNorm it claims)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from bnexport.errors import FoldError
from bnexport.fold import math as fm
from bnexport.fold.affine import Step, Stop, affine_step, arith_op, writes_into
from bnexport.fold.batchnorm import BNParams, functional_args, needs_probe, read_batchnorm
from bnexport.fold.constants import Const, const_of, fmt_num
from bnexport.fold.view import GraphView
from bnexport.nets import TemperatureBatchNorm2d

UNTRACKED_REASON = (
    "track_running_stats=False: {name} normalizes with the statistics of each batch even in eval "
    "mode, so it is not a fixed affine map; fix: train it with track_running_stats=True (or "
    "recompute running statistics) to fold it"
)

#: How far a BatchNorm-like module's output may be from the formula in the float64 probe,
#: relative to the output's scale, and still count as a BatchNorm.
PROBE_TOLERANCE = 1e-9


@dataclass
class BNSite:
    """A BatchNorm call (or a layer, for a chain without BatchNorm) plus the constant chain after
    it, composed into one per-channel affine map.

    ``scale``/``shift`` (float64 ``[C]``): ``end``'s output = ``scale·x + shift`` with ``x`` the BN
    input. ``head`` starts the chain's description (``BatchNorm2d``, ``batch_norm``); ``args`` are
    the nodes computing a functional BatchNorm's constants (erased once unused).
    """

    node: fx.Node
    name: str
    type_name: str
    channels: int
    head: str
    temperature: float | None
    scale: torch.Tensor
    shift: torch.Tensor
    chain_nodes: list[fx.Node] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    consts: list[Const] = field(default_factory=list)
    chain_stop: str | None = None
    notes: list[str] = field(default_factory=list)
    args: list[fx.Node] = field(default_factory=list)

    @property
    def end(self) -> fx.Node:
        return self.chain_nodes[-1] if self.chain_nodes else self.node

    @property
    def input(self) -> fx.Node | None:
        arg = self.node.args[0] if self.node.args else self.node.kwargs.get("input")
        return arg if isinstance(arg, fx.Node) else None

    @property
    def chain(self) -> str:
        return " → ".join([self.head, *self.labels])


def check_temperature(name: str, temperature: Any) -> float:
    """The temperature as one finite float; `FoldError` naming the BatchNorm otherwise."""
    t = torch.as_tensor(
        temperature.detach() if isinstance(temperature, torch.Tensor) else temperature,
        dtype=torch.float64,
    ).reshape(-1)
    if t.numel() != 1 or not bool(torch.isfinite(t).all()):
        raise FoldError(
            f"BatchNorm {name!r}: temperature is {t.tolist()}; it must be one finite number; "
            "fix: pass a finite temperature (e.g. --temperature 1.5)"
        )
    return float(t[0])


def probe_mismatch(module: nn.Module, params: BNParams, shape: Sequence[int]) -> float:
    """Relative max error of ``module`` (a float64 copy, batch 1 of ``shape``) against the
    BatchNorm formula with ``params``: 0 for a module that computes exactly a BatchNorm."""
    assert params.running_mean is not None and params.running_var is not None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, *shape[1:]), generator=gen, dtype=torch.float64)
    scale, shift = fm.bn_affine(
        params.running_mean, params.running_var, params.eps, params.weight, params.bias
    )
    if params.temperature is not None:
        t = float(torch.as_tensor(params.temperature, dtype=torch.float64))
        scale, shift = scale * t, shift * t
    view = [1, -1, *([1] * (len(shape) - 2))]
    expected = x * scale.reshape(view) + shift.reshape(view)
    probe = copy.deepcopy(module).to(device="cpu", dtype=torch.float64).eval()
    try:
        with torch.no_grad():
            got = probe(x)
    except Exception:
        return float("inf")
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return float("inf")
    err = float((got - expected).abs().max())
    return err / max(float(expected.abs().max()), 1e-300)


def bn_site(view: GraphView, node: fx.Node, name: str) -> BNSite | tuple[str, str]:
    """The `BNSite` of a BatchNorm-like module call, or ``(reason code, reason)`` why it can't
    fold at all (batch statistics; a module whose forward is not the BatchNorm it claims).

    Validates statistics, parameters and the chain's constants (`FoldError` if non-finite etc.).
    """
    module = view.module(node)
    params = read_batchnorm(module)
    assert module is not None and params is not None
    if params.running_mean is None or params.running_var is None:
        return "untracked_stats", UNTRACKED_REASON.format(name=name)
    fm.validate_bn(
        name, params.running_mean, params.running_var, params.eps, params.weight, params.bias
    )
    if params.temperature is not None:
        check_temperature(name, params.temperature)  # a non-finite temperature is an error
    shape = view.shape(node)
    if needs_probe(module) and shape is not None and len(shape) >= 2:
        err = probe_mismatch(module, params, shape)
        if not err <= PROBE_TOLERANCE:
            return "not_batchnorm", (
                f"{name} ({type(module).__name__}) has BatchNorm statistics but its forward "
                f"computes something else (relative difference {err:.3g} from γ·(x − μ)/"
                "√(σ² + ε) + β on a probe input), so it stays as it is; fix: if it is a "
                "BatchNorm followed by more (an activation…), don't keep it as a leaf module "
                "so it is traced through"
            )
    head = type(module).__name__
    if params.temperature is not None and isinstance(module, TemperatureBatchNorm2d):
        head = type(module.bn).__name__
    return _new_site(view, node, name, type(module).__name__, head, params)


def functional_site(
    view: GraphView, node: fx.Node, name: str, type_name: str
) -> BNSite | tuple[str, str]:
    """The `BNSite` of an ``F.batch_norm``/``torch.batch_norm`` call, or ``(code, reason)`` why
    it can't fold (training mode, batch statistics, non-constant statistics)."""
    named = functional_args(node.target, node.args, dict(node.kwargs))
    if named.get("training") is not False:
        return "functional_training", (
            f"{name} is called with training={named.get('training')!r}: it normalizes with "
            "batch statistics, so it is not a fixed affine map"
        )
    consts: dict[str, Const | None] = {}
    for key in ("running_mean", "running_var", "weight", "bias"):
        arg = named.get(key)
        c = None if arg is None else const_of(arg, view.gm)
        if arg is not None and c is None:
            return "functional_input", (
                f"the {key} of {name} is computed from the model's input, not a constant "
                "(buffer/parameter), so it can't fold"
            )
        consts[key] = c
    if consts["running_mean"] is None or consts["running_var"] is None:
        return "untracked_stats", UNTRACKED_REASON.format(name=name)
    eps = named.get("eps", 1e-5)
    if not isinstance(eps, int | float):
        return "functional_input", f"the eps of {name} is not a constant number"

    def value(key: str) -> torch.Tensor | None:
        c = consts[key]
        return c.value.reshape(-1) if c is not None else None

    params = BNParams(
        value("running_mean"), value("running_var"), float(eps), value("weight"), value("bias")
    )
    fm.validate_bn(
        name, params.running_mean, params.running_var, params.eps, params.weight, params.bias
    )
    site = _new_site(view, node, name, type_name, "batch_norm", params)
    site.args = [n for c in consts.values() if c is not None for n in c.nodes]
    return site


def _new_site(
    view: GraphView, node: fx.Node, name: str, type_name: str, head: str, params: BNParams
) -> BNSite:
    """The site of a BatchNorm with ``params`` (temperature included), its chain grown."""
    assert params.running_mean is not None and params.running_var is not None
    scale, shift = fm.bn_affine(
        params.running_mean, params.running_var, params.eps, params.weight, params.bias
    )
    labels: list[str] = []
    temp_value: float | None = None
    if params.temperature is not None:
        temp_value = check_temperature(name, params.temperature)
        scale, shift = fm.compose(scale, shift, temp_value, 0.0)
        labels.append(f"×{fmt_num(temp_value)} (temperature)")
    site = BNSite(
        node=node,
        name=name,
        type_name=type_name,
        channels=params.num_features,
        head=head,
        temperature=temp_value,
        scale=scale,
        shift=shift,
        labels=labels,
    )
    _extend_chain(view, site)
    return site


def layer_site(view: GraphView, node: fx.Node, name: str, channels: int) -> BNSite:
    """A layer call with the constant scale/shift chain after it (no BatchNorm): identity
    start, grown like a BatchNorm's chain."""
    ones = torch.ones(channels, dtype=torch.float64)
    site = BNSite(
        node=node,
        name=name,
        type_name="",
        channels=channels,
        head=name,
        temperature=None,
        scale=ones,
        shift=0 * ones,
    )
    _extend_chain(view, site)
    return site


def _extend_chain(view: GraphView, site: BNSite) -> None:
    """Grow the chain one constant affine step at a time while its value has one reader.

    An in-place step (``y.mul_(2)``) that is the first reader of the value folds even when
    later nodes also read it: they all see the value after the step (the same tensor), so they
    are pointed at the step's node and the chain stays linear. Any other value with several
    users ends the chain, with the reason in ``chain_stop`` if an affine op was among them.
    """
    shape, dtype = view.shape(site.node), view.dtype(site.node)
    if shape is None or dtype is None:
        return
    while True:
        cur = site.end
        users = view.users_in_order(cur)
        if not users:
            return
        first = users[0]
        if len(users) > 1 and not writes_into(first, cur):
            site.chain_stop = _shared_stop(view, site, cur, users, shape, dtype)
            return
        step = affine_step(first, cur, view.gm, shape, dtype, site.name)
        if step is None:
            return
        if isinstance(step, Stop):
            site.chain_stop = step.reason
            return
        for u in users[1:]:  # they read the value the in-place step leaves
            u.replace_input_with(cur, first)
        _append_step(site, first, step)


def _append_step(site: BNSite, node: fx.Node, step: Step) -> None:
    """Compose ``step`` (computed by ``node``) into the site's map, label and notes."""
    site.scale, site.shift = fm.compose(site.scale, site.shift, step.a, step.b)
    site.chain_nodes.append(node)
    site.labels.append(step.label)
    if step.const is not None:
        site.consts.append(step.const)
        for p in step.const.params:
            note = f"learnable parameter {p} folded as a constant (its value now)"
            if note not in site.notes:
                site.notes.append(note)


def _shared_stop(
    view: GraphView,
    site: BNSite,
    cur: fx.Node,
    users: list[fx.Node],
    shape: Sequence[int],
    dtype: torch.dtype,
) -> str | None:
    """Why the first affine op among ``cur``'s several ``users`` (graph order) can't fold; None
    if none of them is an affine op (the chain simply ends, as at a residual add)."""
    owner = (
        f"the BatchNorm's output ({cur.name})"
        if cur is site.node
        else f"the chain's output ({cur.name})"
    )
    for k, user in enumerate(users):
        try:
            step = affine_step(user, cur, view.gm, shape, dtype, site.name)
            if step is None:
                continue  # e.g. a residual add: the chain simply ends there
            if isinstance(step, Stop):
                return step.reason
        except FoldError:
            pass  # a non-finite constant is an error only in an op that would fold
        found = arith_op(user)
        assert found is not None
        where = f"{user.name} ({found[0]})"
        if writes_into(user, cur):
            readers = ", ".join(u.name for u in users[:k])
            return (
                f"{where} writes in place into {owner}, which {readers} already read before "
                "it; folding it would change what they see"
            )
        names = ", ".join(u.name for u in users)
        return (
            f"{where}: {owner} has {len(users)} users ({names}), so this scale/shift can't "
            "fold into a layer without changing what the others see"
        )
    return None
