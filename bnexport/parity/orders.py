"""Accumulation orders: the fp32 reference run again with its long sums added in another order, a
third draw of the noise floor (after PyTorch at two batch sizes) that measures what summation
order alone changes.

Two correct fp32 implementations of a reduction differ by the order they add in. PyTorch sums a
mean or a pool pairwise (its error grows like log n); onnxruntime's CPU ``ReduceMean`` adds in
`ACCUMULATION_LANES` SIMD lanes, each lane sequentially (its error grows like n / lanes on
same-signed terms). On conv → global average pool over a 64×64 map fed a constant image,
onnxruntime erred 5.2e-6 of the output against the float64 truth, PyTorch 3.0e-7: a legitimate
difference 17× PyTorch's own error (docs/parity.md). The draw (`lane_sums_mode`, through
:class:`ReorderedRunner`) runs the reference with each long reduction the model computes —
``mean``/``sum`` over at least `MIN_REORDERED_LENGTH` values, global average pools, the sums of
softmax, layer norm and attention — as `ACCUMULATION_LANES` lanes, each summed in order, then the
lanes in order. It is measured, per model and input, exactly as the other draws of the floor,
and raises the floor only of the samples where it errs more (`bnexport.noise.order_floors`): on
the separation set, 19 of 21 models' floors are unchanged (docs/parity.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from bnexport.runners import Feed, Runner, TorchRunner

#: fp32 lanes of the vectorized reductions the draw reproduces: onnxruntime's CPU ReduceMean on
#: AVX2 (8 × fp32) matched an 8-lane sequential sum to the last digit on 3 of 5 constant inputs
#: (docs/parity.md). 4-lane code (SSE, NEON) erred up to 3.2× that, inside the default factor 4.
ACCUMULATION_LANES = 8
#: Reductions shorter than this are left to PyTorch: a sum of a few values errs alike in any order.
MIN_REORDERED_LENGTH = 64
#: The name of the draw in reports.
REORDERED_NAME = "torch-fp32-reordered"


def lane_sum(x: Any, lanes: int = ACCUMULATION_LANES) -> Any:
    """Sum the last axis of ``x`` in fp32 as ``lanes`` interleaved lanes, each added in order,
    then the lanes added in order (value ``k`` goes to lane ``k mod lanes``)."""
    import torch

    n = x.shape[-1]
    pad = (-n) % lanes
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    steps = x.reshape(*x.shape[:-1], -1, lanes)
    acc = steps[..., 0, :].clone()
    for k in range(1, steps.shape[-2]):
        acc.add_(steps[..., k, :])
    total = acc[..., 0].clone()
    for lane in range(1, lanes):
        total.add_(acc[..., lane])
    return total


def _reduce_last(x: Any, dims: Sequence[int]) -> tuple[Any, list[int]]:
    """``x`` with ``dims`` moved to the end and flattened into one axis, and the kept dims."""
    nd = x.dim()
    reduced = sorted({d % nd for d in dims}) if dims else list(range(nd))
    kept = [d for d in range(nd) if d not in reduced]
    moved = x.permute(*kept, *reduced)
    return moved.reshape(*[x.shape[d] for d in kept], -1), reduced


#: What a handler returns: the op's result and the length of the sum it reordered, or None for
#: PyTorch to compute the op as usual.
Reordered = tuple[Any, int] | None


def _reordered_sum(x: Any, dims: Sequence[int] | None, keepdim: bool, mean: bool) -> Reordered:
    """``sum`` (or ``mean``) of ``x`` over ``dims`` by `lane_sum` (None: not fp32, or shorter
    than `MIN_REORDERED_LENGTH`)."""
    import torch

    if x.dtype != torch.float32 or x.dim() == 0:
        return None
    flat, reduced = _reduce_last(x, list(dims or ()))
    n = flat.shape[-1]
    if n < MIN_REORDERED_LENGTH:
        return None
    total = lane_sum(flat)
    if mean:
        total = total / n
    if keepdim:
        total = total.reshape([1 if d in reduced else s for d, s in enumerate(x.shape)])
    return total, n


def _mean(x: Any, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Reordered:
    return None if dtype is not None else _reordered_sum(x, dim, keepdim, mean=True)


def _sum(x: Any, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Reordered:
    return None if dtype is not None else _reordered_sum(x, dim, keepdim, mean=False)


def _global_pool(x: Any, output_size: Sequence[int]) -> Reordered:
    """An adaptive average pool to size 1 (a global average pool); None for any other size."""
    if any(int(s) != 1 for s in output_size):
        return None
    return _reordered_sum(x, list(range(-len(output_size), 0)), keepdim=True, mean=True)


def _whole_map_pool(
    x: Any, kernel_size: Sequence[int], stride: Any = (), padding: Any = 0, *rest: Any
) -> Reordered:
    """``avg_pool2d`` with one window over the whole (unpadded) map, as a global pool."""
    kernel = [int(k) for k in kernel_size] * (2 if len(kernel_size) == 1 else 1)
    pads = [int(p) for p in padding] if isinstance(padding, (list, tuple)) else [int(padding)]
    if x.dim() < 3 or kernel != list(x.shape[-2:]) or any(pads):
        return None
    return _global_pool(x, (1, 1))


def _softmax(x: Any, dim: int, dtype: Any = None, log: bool = False) -> Reordered:
    """softmax (or log-softmax) with the sum of the exponentials reordered."""
    import torch

    if dtype not in (None, False) or x.dtype != torch.float32 or x.dim() == 0:
        return None
    if x.shape[dim] < MIN_REORDERED_LENGTH:
        return None
    shifted = x - x.amax(dim, keepdim=True)
    exp = shifted.exp()
    total, n = _reordered_sum(exp, [dim], keepdim=True, mean=False)  # type: ignore[misc]
    return (shifted - total.log() if log else exp / total), n


def _layer_norm(
    x: Any,
    normalized_shape: Sequence[int],
    weight: Any = None,
    bias: Any = None,
    eps: float = 1e-5,
    *rest: Any,
) -> Reordered:
    """``layer_norm`` with its mean and variance summed in lanes."""
    dims = list(range(-len(normalized_shape), 0))
    first = _reordered_sum(x, dims, keepdim=True, mean=True)
    if first is None:
        return None
    mean, n = first
    centered = x - mean
    var, _ = _reordered_sum(centered * centered, dims, keepdim=True, mean=True)  # type: ignore[misc]
    rstd = (var + eps).rsqrt()
    out = centered * rstd
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out, n


def _attention(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Reordered:
    """``scaled_dot_product_attention`` (no dropout) with its softmax's sum reordered."""
    import torch

    if dropout_p or query.dtype != torch.float32 or key.shape[-2] < MIN_REORDERED_LENGTH:
        return None
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeat, -3)
        value = value.repeat_interleave(repeat, -3)
    factor = 1.0 / float(query.shape[-1]) ** 0.5 if scale is None else scale
    scores = query @ key.transpose(-2, -1) * factor
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    weights, n = _softmax(scores, -1)  # type: ignore[misc]
    return weights @ value, n


def _handlers() -> dict[Any, Callable[..., Reordered]]:
    import torch

    aten = torch.ops.aten
    return {
        aten.mean.dim: _mean,
        aten.mean.default: lambda x, dtype=None: _mean(x, None, False, dtype),
        aten.sum.dim_IntList: _sum,
        aten.sum.default: lambda x, dtype=None: _sum(x, None, False, dtype),
        aten.adaptive_avg_pool2d.default: _global_pool,
        aten._adaptive_avg_pool2d.default: _global_pool,
        aten.adaptive_avg_pool3d.default: _global_pool,
        aten._adaptive_avg_pool3d.default: _global_pool,
        aten.avg_pool2d.default: _whole_map_pool,
        aten.softmax.int: _softmax,
        aten._softmax.default: _softmax,
        aten.log_softmax.int: lambda x, dim, dtype=None: _softmax(x, dim, dtype, log=True),
        aten._log_softmax.default: lambda x, dim, h=False: _softmax(x, dim, h, log=True),
        aten.layer_norm.default: _layer_norm,
        aten.scaled_dot_product_attention.default: _attention,
    }


def lane_sums_mode(lengths: dict[str, int] | None = None) -> Any:
    """A ``TorchDispatchMode`` under which the long reductions of `_handlers` add in lanes;
    ``lengths`` collects the longest sum reordered per op (``{"mean": 4096}``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    handlers = _handlers()
    seen = {} if lengths is None else lengths

    class LaneSums(TorchDispatchMode):
        """Long fp32 sums, means, global pools, softmax and layer-norm sums as `lane_sum`."""

        def __torch_dispatch__(
            self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
        ) -> Any:
            kwargs = kwargs or {}
            handler = handlers.get(func)
            done = handler(*args, **kwargs) if handler is not None else None
            if done is None:
                return func(*args, **kwargs)
            out, n = done
            op = func.overloadpacket.__name__.strip("_")
            seen[op] = max(n, seen.get(op, 0))
            return out

    return LaneSums()


class ReorderedRunner(Runner):
    """The fp32 reference run under `lane_sums_mode`: a noise draw, not a candidate."""

    def __init__(self, reference: TorchRunner) -> None:
        self.reference = reference
        self.name = REORDERED_NAME
        self.kind = reference.kind
        self.gating = False
        self.description = (
            f"{reference.name} with its long sums added in {ACCUMULATION_LANES} lanes, in order "
            "(a draw of the noise floor)"
        )

        self.lengths: dict[str, int] = {}  # the longest sum reordered, per op

    def infer(self, feed: Feed) -> dict[str, Any]:
        with lane_sums_mode(self.lengths):
            return self.reference.infer(feed)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "lanes": ACCUMULATION_LANES, "reordered": dict(self.lengths)}


#: How a report names the ops whose sums the draw reordered.
SHORT_NAMES = {
    "adaptive_avg_pool2d": "pool",
    "adaptive_avg_pool3d": "pool",
    "avg_pool2d": "pool",
    "log_softmax": "softmax",
    "layer_norm": "layernorm",
    "scaled_dot_product_attention": "attention",
}


def reordered_notes(base: Any, runner: ReorderedRunner) -> list[str]:
    """For each output whose floor summation order raised (`bnexport.noise.order_floors`): on
    how many samples, by how much at most, and which sums (``base``: the check's `Baseline`)."""
    lengths: dict[str, int] = {}
    for op, n in runner.lengths.items():
        short = SHORT_NAMES.get(op, op)
        lengths[short] = max(n, lengths.get(short, 0))
    sums = ", ".join(f"{op} {n}" for op, n in lengths.items())
    notes = []
    for output, floors in base.floors.items():
        noise = base.noise[output]
        ungated = base.ungated.get(output)
        raised = (floors > noise) & (True if ungated is None else ~ungated)
        if not noise or not raised.any():
            continue
        notes.append(  # fits 100 columns after "note: " for short names and a few ops
            f"{output!r}: summation order ({ACCUMULATION_LANES}-lane sums: {sums}) raises the "
            f"floor of {int(raised.sum())} of {raised.size} samples, up to "
            f"{float(floors[raised].max()) / noise:.2g}×"
        )
    return notes
