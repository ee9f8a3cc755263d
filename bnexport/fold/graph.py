"""FX graph helpers for folding: tracing, constants, affine chains, BatchNorm sites, node rewrites.

The rules that make a rewrite safe live here: a layer module is replaced in place only when exactly
one node calls it and nothing else reaches it; otherwise the folding call gets a *new* module and
every other call keeps the original (never the pytorch#104593 bug of rewriting a shared module).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from bnexport.errors import FoldError
from bnexport.fold import math as fm
from bnexport.fold.batchnorm import BNParams, functional_args, needs_probe, read_batchnorm
from bnexport.nets import TemperatureBatchNorm2d


def fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _fmt_num(v: float) -> str:
    return f"{v:.6g}"


# --- constants --------------------------------------------------------------------------------

_PURE_FUNCS: dict[Any, str] = {
    operator.mul: "mul",
    operator.truediv: "div",
    operator.add: "add",
    operator.sub: "sub",
    operator.neg: "neg",
    operator.pow: "pow",
    torch.mul: "mul",
    torch.div: "div",
    torch.add: "add",
    torch.sub: "sub",
    torch.neg: "neg",
    torch.exp: "exp",
    torch.log: "log",
    torch.sqrt: "sqrt",
    torch.rsqrt: "rsqrt",
    torch.reciprocal: "reciprocal",
    torch.abs: "abs",
    torch.sigmoid: "sigmoid",
    torch.pow: "pow",
    torch.reshape: "reshape",
    torch.unsqueeze: "unsqueeze",
    F.softplus: "softplus",
}
_PURE_METHODS = frozenset(
    {
        "exp",
        "log",
        "sqrt",
        "rsqrt",
        "reciprocal",
        "abs",
        "neg",
        "sigmoid",
        "pow",
        "mul",
        "div",
        "add",
        "sub",
        "view",
        "reshape",
        "unsqueeze",
        "squeeze",
        "flatten",
        "detach",
        "clone",
        "contiguous",
    }
)


@dataclass
class Const:
    """A value known at fold time: ``value`` in float64, a label for the report, the nodes computing
    it (removed once unused) and the learnable parameters it was read from."""

    value: torch.Tensor
    label: str
    nodes: list[fx.Node] = field(default_factory=list)
    params: list[str] = field(default_factory=list)


def const_of(arg: Any, gm: fx.GraphModule, depth: int = 0) -> Const | None:
    """``arg`` as a constant: a Python number, a ``get_attr`` buffer/parameter/tensor constant, or a
    pure elementwise/reshape op of constants (``self.log_t.exp()``). None if it depends on an input.
    """
    if isinstance(arg, bool | int | float):
        return Const(torch.tensor(float(arg), dtype=torch.float64), _fmt_num(float(arg)))
    if not isinstance(arg, fx.Node) or depth > 8:
        return None
    if arg.op == "get_attr":
        obj = fetch_attr(gm, str(arg.target))
        if not isinstance(obj, torch.Tensor) or obj.is_complex() or obj.dtype == torch.bool:
            return None
        value = obj.detach().to("cpu", torch.float64)
        if isinstance(obj, nn.Parameter):
            kind = "param"
        elif str(arg.target).split(".")[-1].startswith("_tensor_constant"):
            kind = "constant"
        else:
            kind = "buffer"
        name = "" if kind == "constant" else f" {arg.target}"
        if value.numel() == 1:
            label = f"{kind}{name}={_fmt_num(float(value.reshape(-1)[0]))}"
        else:
            label = f"{kind}{name}{list(value.shape)}"
        params = [str(arg.target)] if kind == "param" else []
        return Const(value, label, [arg], params)
    if arg.op == "call_function" and arg.target in _PURE_FUNCS:
        fn: Any = arg.target
        name = _PURE_FUNCS[arg.target]
    elif arg.op == "call_method" and arg.target in _PURE_METHODS:
        method = str(arg.target)

        def fn(self_: Any, *a: Any, **k: Any) -> Any:
            return getattr(self_, method)(*a, **k)

        name = method
    else:
        return None
    parts: list[Const] = []

    def sub(a: Any) -> Any:
        if isinstance(a, fx.Node):
            c = const_of(a, gm, depth + 1)
            if c is None:
                raise LookupError
            parts.append(c)
            return c.value
        return a

    try:
        args = fx.node.map_aggregate(arg.args, sub)
        kwargs = fx.node.map_aggregate(arg.kwargs, sub)
        if not parts:
            return None
        with torch.no_grad():
            value = fn(*args, **kwargs)
    except Exception:
        return None
    if not isinstance(value, torch.Tensor):
        return None
    value = value.detach().to(torch.float64)
    label = f"{name}({', '.join(p.label for p in parts)})"
    nodes = [arg, *(n for p in parts for n in p.nodes)]
    return Const(value, label, nodes, [q for p in parts for q in p.params])


# --- affine chains ----------------------------------------------------------------------------

_ARITH_FUNCS: dict[Any, tuple[str, bool]] = {
    operator.mul: ("mul", False),
    operator.truediv: ("div", False),
    operator.add: ("add", False),
    operator.sub: ("sub", False),
    operator.neg: ("neg", False),
    operator.imul: ("mul", True),
    operator.itruediv: ("div", True),
    operator.iadd: ("add", True),
    operator.isub: ("sub", True),
    torch.mul: ("mul", False),
    torch.multiply: ("mul", False),
    torch.div: ("div", False),
    torch.divide: ("div", False),
    torch.true_divide: ("div", False),
    torch.add: ("add", False),
    torch.sub: ("sub", False),
    torch.subtract: ("sub", False),
    torch.neg: ("neg", False),
    torch.negative: ("neg", False),
}
_ARITH_METHODS: dict[str, str] = {
    "mul": "mul",
    "multiply": "mul",
    "div": "div",
    "divide": "div",
    "true_divide": "div",
    "add": "add",
    "sub": "sub",
    "subtract": "sub",
    "neg": "neg",
    "negative": "neg",
}


def arith_op(node: fx.Node) -> tuple[str, bool] | None:
    """``(op, in_place)`` for a mul/div/add/sub/neg node in any spelling, else None."""
    if node.op == "call_function" and node.target in _ARITH_FUNCS:
        return _ARITH_FUNCS[node.target]
    if node.op == "call_method" and isinstance(node.target, str):
        name = node.target
        inplace = name.endswith("_")
        op = _ARITH_METHODS.get(name.removesuffix("_") if inplace else name)
        if op is not None:
            return op, inplace
    return None


@dataclass
class Step:
    """One affine step ``z ↦ a·z + b`` (``a``, ``b`` float64 ``[C]``) and its report label."""

    a: torch.Tensor
    b: torch.Tensor
    label: str
    const: Const | None


@dataclass
class Stop:
    """An arithmetic op after the BN that can't join the chain, and why (it stays in the graph)."""

    reason: str


def _operands(node: fx.Node) -> tuple[Any, Any, dict[str, Any]]:
    args = list(node.args)
    kwargs = dict(node.kwargs)
    first = args.pop(0) if args else kwargs.pop("input", kwargs.pop("self", None))
    other = args.pop(0) if args else kwargs.pop("other", None)
    if args:
        kwargs["alpha"] = args.pop(0)
    return first, other, kwargs


def affine_step(
    node: fx.Node,
    x: fx.Node,
    gm: fx.GraphModule,
    shape: Sequence[int],
    dtype: torch.dtype,
    bn_name: str,
) -> Step | Stop | None:
    """``node`` as an affine step of ``x`` with a constant scalar/per-channel operand.

    None: not arithmetic (the chain simply ends). `Stop`: arithmetic that can't fold, with the
    reason. A non-finite constant or a division by zero raises `FoldError` naming the BN and the
    node.
    """
    found = arith_op(node)
    if found is None:
        return None
    op, inplace = found
    where = f"{node.name} ({op})"
    first, other, kwargs = _operands(node)
    if kwargs.get("out") is not None:
        return Stop(f"{where} writes to out=")
    if kwargs.get("rounding_mode") is not None:
        return Stop(f"{where} uses rounding_mode={kwargs['rounding_mode']!r}: not affine")
    alpha = kwargs.get("alpha", 1)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        return Stop(f"{where} has a non-constant alpha")
    meta = node.meta.get("tensor_meta")
    if meta is None or tuple(meta.shape) != tuple(shape):
        return Stop(f"{where} changes the shape {list(shape)}")
    if meta.dtype != dtype:
        return Stop(
            f"{where} changes the dtype from {str(dtype).removeprefix('torch.')} to "
            f"{str(meta.dtype).removeprefix('torch.')} (a constant of another dtype)"
        )
    channels = int(shape[1])
    ones = torch.ones(channels, dtype=torch.float64)
    if op == "neg":
        if first is not x:
            return None
        return Step(-ones, 0 * ones, "neg", None)
    if (first is x) == (other is x):
        return Stop(f"{where} uses the BatchNorm output as both operands (not affine)")
    x_first = first is x
    if inplace and not x_first:
        return Stop(f"{where} writes in place into its other operand")
    c_arg = other if x_first else first
    c = const_of(c_arg, gm)
    if c is None and op in ("add", "sub"):
        return None  # e.g. a residual connection: the chain just ends here
    if c is None:
        what = c_arg.name if isinstance(c_arg, fx.Node) else repr(c_arg)
        return Stop(
            f"{where}: its other operand {what} is not constant (it depends on the model's input), "
            "so this scale/shift can't fold"
        )
    vec = fm.per_channel(c.value, shape)
    if vec is None:
        return Stop(
            f"{where}: constant {c.label} (shape {list(c.value.shape)}) is not a scalar or a "
            f"per-channel [C] value along dim 1 of the {list(shape)} output"
        )
    bad = ~torch.isfinite(vec)
    if bool(bad.any()):
        raise FoldError(
            f"BatchNorm {bn_name!r}: the constant {c.label} in {node.name} ({op}) after it is "
            f"non-finite at {fm._offenders(bad, vec)}; fix: give it a finite value (e.g. a finite "
            "temperature)"
        )
    zero = 0 * ones
    if op == "mul":
        return Step(vec, zero, f"×{c.label}", c)
    if op == "div":
        if not x_first:
            return Stop(f"{where}: {c.label} / x is not affine in x, so it can't fold")
        if bool((vec == 0).any()):
            raise FoldError(
                f"BatchNorm {bn_name!r}: {node.name} divides by {c.label}, which is zero at "
                f"{fm._offenders(vec == 0, vec)}; fix: the model's output is infinite there — "
                "use a nonzero divisor"
            )
        return Step(1 / vec, zero, f"÷{c.label}", c)
    alpha_txt = "" if alpha == 1 else f"{_fmt_num(float(alpha))}·"
    if op == "add":
        if x_first:
            return Step(ones, float(alpha) * vec, f"+{alpha_txt}{c.label}", c)
        return Step(float(alpha) * ones, vec, f"{c.label}+{alpha_txt}x", c)
    if x_first:
        return Step(ones, -float(alpha) * vec, f"−{alpha_txt}{c.label}", c)
    return Step(-float(alpha) * ones, vec, f"{c.label}−{alpha_txt}x", c)


def _writes_into(node: fx.Node, x: fx.Node) -> bool:
    """Whether ``node`` is an in-place arithmetic op overwriting ``x`` (like ``x.mul_(c)``)."""
    found = arith_op(node)
    return found is not None and found[1] and _operands(node)[0] is x


# --- BatchNorm sites --------------------------------------------------------------------------


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


UNTRACKED_REASON = (
    "track_running_stats=False: {name} normalizes with the statistics of each batch even in eval "
    "mode, so it is not a fixed affine map; fix: train it with track_running_stats=True (or "
    "recompute running statistics) to fold it"
)

#: How far a BatchNorm-like module's output may be from the formula in the float64 probe,
#: relative to the output's scale, and still count as a BatchNorm.
PROBE_TOLERANCE = 1e-9


def _temperature(name: str, temperature: Any) -> float:
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


_METADATA_ATTRS = frozenset({"ndim", "shape", "dtype", "device", "is_cuda", "layout"})
_METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "get_device"})


def reads_metadata_only(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` reads only ``node``'s shape/rank/dtype/device (``x.ndim``, ``x.size(0)``),
    which a fold never changes — e.g. timm's ``_assert(x.ndim == 4)`` before each BatchNorm."""
    if user.op == "call_function" and user.target is getattr:
        return user.args[0] is node and user.args[1] in _METADATA_ATTRS
    if user.op == "call_method" and user.target in _METADATA_METHODS:
        return user.args[0] is node
    return user.op == "call_function" and user.target in (len, torch.numel)


def data_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values (not only its metadata)."""
    return [u for u in node.users if not reads_metadata_only(u, node)]


def _tensor_meta(node: Any) -> Any:
    """The node's single-tensor metadata (None for a tuple output, a non-tensor or no meta)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta if hasattr(meta, "shape") else None


def float64_copy(t: torch.Tensor, memo: dict[int, torch.Tensor]) -> torch.Tensor:
    """``t`` in float64, converted once per tensor: ``memo`` maps tensor id → copy (the caller
    keeps ``t`` alive while the memo is used). A float64 tensor is itself."""
    if t.dtype == torch.float64:
        return t
    if id(t) not in memo:
        memo[id(t)] = t.detach().double()
    return memo[id(t)]


class FoldContext:
    """The GraphModule being folded, with the bookkeeping for safe node rewrites."""

    def __init__(self, gm: fx.GraphModule, memo64: dict[int, torch.Tensor] | None = None) -> None:
        self.gm = gm
        #: Float64 copies of the layers' original parameters (tensor id → copy), shared with the
        #: self-check (`bnexport.fold.run_float64`), which needs the same copies.
        self.memo64: dict[int, torch.Tensor] = {} if memo64 is None else memo64
        self.removed_attrs: set[str] = set()
        #: The folded parameters in float64, before their one cast (``path.weight`` → tensor):
        #: later folds into the same layer start from them, and the self-check runs with them.
        self.exact: dict[str, torch.Tensor] = {}
        self._path_counts: dict[int, int] | None = None
        self._modules: dict[str, nn.Module] = {}  # call_module target → module (kept by install)

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

    # lookups
    def module(self, node: Any) -> nn.Module | None:
        if isinstance(node, fx.Node) and node.op == "call_module":
            target = str(node.target)
            if target not in self._modules:
                self._modules[target] = self.gm.get_submodule(target)
            return self._modules[target]
        return None

    def shape(self, node: Any) -> tuple[int, ...] | None:
        meta = _tensor_meta(node)
        return tuple(meta.shape) if meta is not None else None

    def dtype(self, node: Any) -> torch.dtype | None:
        meta = _tensor_meta(node)
        return meta.dtype if meta is not None else None

    def describe(self, node: Any) -> str:
        """``relu (ReLU)``, ``add (call_function add)``, ``output`` — for reasons in the report."""
        if not isinstance(node, fx.Node):
            return repr(node)
        if node.op == "call_module":
            return f"{node.target} ({type(self.module(node)).__name__})"
        if node.op in ("placeholder", "output"):
            return f"the model's {'input' if node.op == 'placeholder' else 'output'} ({node.name})"
        target = getattr(node.target, "__name__", str(node.target))
        return f"{node.name} ({node.op.replace('_', ' ')} {target})"

    # sites
    def bn_site(self, node: fx.Node, name: str) -> BNSite | tuple[str, str]:
        """The `BNSite` of a BatchNorm-like module call, or ``(reason code, reason)`` why it can't
        fold at all (batch statistics; a module whose forward is not the BatchNorm it claims).

        Validates statistics, parameters and the chain's constants (`FoldError` if non-finite etc.).
        """
        module = self.module(node)
        params = read_batchnorm(module)
        assert module is not None and params is not None
        if params.running_mean is None or params.running_var is None:
            return "untracked_stats", UNTRACKED_REASON.format(name=name)
        fm.validate_bn(
            name, params.running_mean, params.running_var, params.eps, params.weight, params.bias
        )
        if params.temperature is not None:
            _temperature(name, params.temperature)  # a non-finite temperature is an error
        shape = self.shape(node)
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
        return self._site(node, name, type(module).__name__, head, params)

    def functional_site(self, node: fx.Node, name: str, type_name: str) -> BNSite | tuple[str, str]:
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
            if arg is None:
                consts[key] = None
                continue
            c = const_of(arg, self.gm)
            if c is None:
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
        site = self._site(node, name, type_name, "batch_norm", params)
        site.args = [n for c in consts.values() if c is not None for n in c.nodes]
        return site

    def _site(
        self, node: fx.Node, name: str, type_name: str, head: str, params: BNParams
    ) -> BNSite:
        assert params.running_mean is not None and params.running_var is not None
        scale, shift = fm.bn_affine(
            params.running_mean, params.running_var, params.eps, params.weight, params.bias
        )
        labels: list[str] = []
        temp_value: float | None = None
        if params.temperature is not None:
            temp_value = _temperature(name, params.temperature)
            scale, shift = fm.compose(scale, shift, temp_value, 0.0)
            labels.append(f"×{_fmt_num(temp_value)} (temperature)")
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
        self._extend_chain(site)
        return site

    def layer_site(self, node: fx.Node, name: str, channels: int) -> BNSite:
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
        self._extend_chain(site)
        return site

    def _users_in_order(self, node: fx.Node) -> list[fx.Node]:
        if len(node.users) <= 1:
            return list(node.users)
        return [n for n in self.gm.graph.nodes if n in node.users]

    def _extend_chain(self, site: BNSite) -> None:
        """Grow the chain one constant affine step at a time while its value has one reader.

        An in-place step (``y.mul_(2)``) that is the first reader of the value folds even when
        later nodes also read it: they all see the value after the step (the same tensor), so they
        are pointed at the step's node and the chain stays linear. Any other value with several
        users ends the chain, with the reason in ``chain_stop`` if an affine op was among them.
        """
        shape, dtype = self.shape(site.node), self.dtype(site.node)
        if shape is None or dtype is None:
            return
        while True:
            cur = site.end
            users = self._users_in_order(cur)
            if not users:
                return
            first = users[0]
            if len(users) > 1:
                if not _writes_into(first, cur):
                    site.chain_stop = self._shared_stop(site, cur, users, shape, dtype)
                    return
                step = affine_step(first, cur, self.gm, shape, dtype, site.name)
                if not isinstance(step, Step):
                    site.chain_stop = step.reason if step is not None else None
                    return
                for u in users[1:]:
                    u.replace_input_with(cur, first)
            else:
                step = affine_step(first, cur, self.gm, shape, dtype, site.name)
            if step is None:
                return
            if isinstance(step, Stop):
                site.chain_stop = step.reason
                return
            site.scale, site.shift = fm.compose(site.scale, site.shift, step.a, step.b)
            site.chain_nodes.append(users[0])
            site.labels.append(step.label)
            if step.const is not None:
                site.consts.append(step.const)
                for p in step.const.params:
                    note = f"learnable parameter {p} folded as a constant (its value now)"
                    if note not in site.notes:
                        site.notes.append(note)

    def _shared_stop(
        self,
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
                step = affine_step(user, cur, self.gm, shape, dtype, site.name)
                if step is None:
                    continue  # e.g. a residual add: the chain simply ends there
                if isinstance(step, Stop):
                    return step.reason
            except FoldError:
                pass  # a non-finite constant is an error only in an op that would fold
            found = arith_op(user)
            assert found is not None
            where = f"{user.name} ({found[0]})"
            if _writes_into(user, cur):
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

    # rewrites
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
            self._modules[target] = new_module
            return None
        base = f"{target}_folded"
        name, k = base, 1
        while _has_path(self.gm, name):
            k += 1
            name = f"{base}{k}"
        self.gm.add_submodule(name, new_module)
        self._modules[name] = new_module
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
            if not _has_path(self.gm, target):
                continue
            owner = self.gm.get_submodule(owner_path)
            if fieldname in owner._parameters:
                del owner._parameters[fieldname]
            elif fieldname in owner._buffers:
                del owner._buffers[fieldname]
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()


def _has_path(root: nn.Module, path: str) -> bool:
    try:
        fetch_attr(root, path)
    except AttributeError:
        return False
    return True
