"""Pure tensor math for folding BatchNorm (and constant scale/shift chains) into a layer.

Everything here works on raw tensors, in float64, and knows nothing about FX graphs or modules.

A BatchNorm in eval mode is a per-channel affine map::

    BN(y) = γ·(y − μ)/√(σ² + ε) + β = s·y + t,   s = γ/√(σ² + ε),   t = β − μ·s

A chain of constant steps after it (``·a``, ``/a``, ``+b``, ``−b``, ``b − ·``, ``−·``) keeps it
affine: each step ``z ↦ a·z + b`` turns ``(s, t)`` into ``(a·s, a·t + b)``. With a temperature ``T``
(``T·BN(y)``) that gives ``s = T·γ/√(σ² + ε)`` and ``t = T·(β − μ·γ/√(σ² + ε))``.

**BN after a layer** ``y = W ∗ x + b``: ``s·y + t = (W·s) ∗ x + (s·b + t)``, so ``W' = W·s`` along
the layer's *output-channel* axis and ``b' = s·b + t`` (= ``(b − μ)·s + T·β`` for a plain BN with
temperature). The output-channel axis is 0 for Conv ``[out, in/g, k…]`` and Linear ``[out, in]``;
for ConvTranspose ``[in, out/g, k…]`` it is axis 1 *per group*: output channel ``o = g·(out/g) + j``
lives at ``W[g·(in/g):(g+1)·(in/g), j]``.

**BN before a layer** ``layer(s·x + t)``: the scale moves to the *input-channel* axis
(Linear ``W' = W·diag(s)``; Conv axis 1, per group; ConvTranspose axis 0) and the shift becomes a
bias: Linear ``b' = b + W·t``; Conv ``b'_o = b_o + Σ_{i,k} W[o,i,k]·t_{g(o)·(in/g)+i}``.
That is exact for a Conv only when every output position sees the full kernel over (shifted)
inputs: no zero padding, or a zero shift (zero-padded borders would see ``0`` instead of ``t``).
Copying paddings (reflect, replicate, circular) copy ``s·x + t`` itself, so they stay exact. A
ConvTranspose spreads a constant input unevenly near its borders, so BN → ConvTranspose is exact
only with a zero shift.

Results are cast once to the layer's dtype by `cast_checked`, which refuses non-finite or
overflowing values and flushes subnormals to zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from bnexport.errors import FoldError

LayerKind = Literal["conv", "conv_transpose", "linear"]

#: How many offending channels an error message lists.
MAX_LISTED = 5

F64 = torch.float64


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=F64)


def offenders(bad: torch.Tensor, values: torch.Tensor) -> str:
    """``channels [3, 7] (values nan, -0.5)`` for the first few True entries of ``bad``."""
    idx = torch.nonzero(bad.reshape(-1)).reshape(-1)
    n = int(idx.numel())
    shown = idx[:MAX_LISTED].tolist()
    vals = ", ".join(f"{v:.6g}" for v in values.reshape(-1)[idx[:MAX_LISTED]].tolist())
    more = f" and {n - len(shown)} more" if n > len(shown) else ""
    return f"channels {shown}{more} (values {vals})"


def validate_bn(
    name: str,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> None:
    """Raise `FoldError` naming the BatchNorm when its statistics/parameters can't fold exactly.

    Checks: every tensor finite, ``eps`` finite, ``running_var + eps > 0``.
    """
    fix_stats = (
        "the checkpoint's BatchNorm statistics are corrupt: recompute them (run the model in train "
        "mode over a few batches of real data) or load an intact checkpoint"
    )
    if not torch.isfinite(torch.tensor(float(eps), dtype=F64)):
        raise FoldError(f"BatchNorm {name!r}: eps is {eps}; fix: give the BatchNorm a finite eps")
    for label, t in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        if t is None:
            continue
        t64 = _f64(t)
        bad = ~torch.isfinite(t64)
        if bool(bad.any()):
            fix = fix_stats if label.startswith("running") else "retrain or reload the parameters"
            raise FoldError(
                f"BatchNorm {name!r}: {label} has non-finite values at {offenders(bad, t64)}; "
                f"fix: {fix}"
            )
    var_eps = _f64(running_var) + float(eps)
    bad = var_eps <= 0
    if bool(bad.any()):
        raise FoldError(
            f"BatchNorm {name!r}: running_var + eps <= 0 at {offenders(bad, var_eps)} "
            f"(eps={eps:g}); a variance can't be negative, so {fix_stats}"
        )


def bn_affine(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``(scale, shift)`` in float64: ``s = γ/√(σ²+ε)``, ``t = β − μ·s``.

    ``weight``/``bias`` of None (``affine=False``) mean γ = 1, β = 0.
    """
    mean = _f64(running_mean)
    scale = torch.rsqrt(_f64(running_var) + float(eps))
    if weight is not None:
        scale = scale * _f64(weight)
    shift = -mean * scale
    if bias is not None:
        shift = shift + _f64(bias)
    return scale, shift


def compose(
    scale: torch.Tensor, shift: torch.Tensor, a: torch.Tensor | float, b: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one affine step ``z ↦ a·z + b`` after ``z = scale·y + shift``: ``(a·s, a·t + b)``."""
    return scale * a, shift * a + b


def _bcast(v: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _check_channels(what: str, vec: torch.Tensor, expected: int) -> None:
    if vec.numel() != expected:
        raise ValueError(f"{what} has {vec.numel()} channels, the layer has {expected}")


def scale_output_channels(
    kind: LayerKind, weight: torch.Tensor, scale: torch.Tensor, groups: int = 1
) -> torch.Tensor:
    """``W·s`` along the output-channel axis (float64).

    Conv ``[out, in/g, k…]`` and Linear ``[out, in]``: axis 0. ConvTranspose ``[in, out/g, k…]``:
    axis 1 per group, i.e. ``W.view(g, in/g, out/g, k…) · s.view(g, 1, out/g, 1…)``.
    """
    w = _f64(weight)
    s = _f64(scale).reshape(-1)
    if kind == "conv_transpose":
        cin, opg = w.shape[0], w.shape[1]
        _check_channels("scale", s, opg * groups)
        wg = w.reshape(groups, cin // groups, opg, *w.shape[2:])
        sg = s.reshape(groups, 1, opg, *([1] * (w.dim() - 2)))
        return (wg * sg).reshape(w.shape)
    _check_channels("scale", s, w.shape[0])
    return w * _bcast(s, 0, w.dim())


def scale_input_channels(
    kind: LayerKind, weight: torch.Tensor, scale: torch.Tensor, groups: int = 1
) -> torch.Tensor:
    """``W·s`` along the input-channel axis (float64).

    Linear ``[out, in]``: axis 1. Conv ``[out, in/g, k…]``: axis 1, where output channel ``o`` of
    group ``g = o // (out/g)`` reads input channels ``g·(in/g) … (g+1)·(in/g) − 1``. ConvTranspose
    ``[in, out/g, k…]``: axis 0 (it already spans all input channels).
    """
    w = _f64(weight)
    s = _f64(scale).reshape(-1)
    if kind == "linear":
        _check_channels("scale", s, w.shape[1])
        return w * s.reshape(1, -1)
    if kind == "conv_transpose":
        _check_channels("scale", s, w.shape[0])
        return w * _bcast(s, 0, w.dim())
    return w * _conv_input_per_output(w, s, groups)


def _conv_input_per_output(w: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Per-input-channel vector ``v [in]`` laid out as ``[out, in/g, 1…]`` for a Conv weight."""
    out, ipg = w.shape[0], w.shape[1]
    _check_channels("input vector", v, ipg * groups)
    per_group = v.reshape(groups, ipg)
    per_out = per_group.repeat_interleave(out // groups, dim=0)  # [out, in/g]
    return per_out.reshape(out, ipg, *([1] * (w.dim() - 2)))


@dataclass(frozen=True)
class Folded:
    """Folded parameters in float64 (before the one cast to the layer's dtype)."""

    weight: torch.Tensor
    bias: torch.Tensor


def fold_after(
    kind: LayerKind,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    groups: int = 1,
) -> Folded:
    """Fold ``z = s·layer(x) + t`` into the layer: ``W' = W·s`` (output axis), ``b' = s·b + t``."""
    s = _f64(scale).reshape(-1)
    t = _f64(shift).reshape(-1)
    w = scale_output_channels(kind, weight, s, groups)
    b = s * _f64(bias) if bias is not None else torch.zeros_like(s)
    return Folded(w, b + t)


def fold_before(
    kind: LayerKind,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    groups: int = 1,
) -> Folded:
    """Fold ``layer(s·x + t)`` into the layer: scale on the input axis, shift into the bias.

    Linear: ``b' = b + W·t``. Conv: ``b'_o = b_o + Σ_{i,k} W[o,i,k]·t_{g(o)·(in/g)+i}`` (exact only
    without zero padding or with ``t = 0``; the caller checks). ConvTranspose: only ``t = 0``
    (raises `ValueError` otherwise).
    """
    w0 = _f64(weight)
    s = _f64(scale).reshape(-1)
    t = _f64(shift).reshape(-1)
    w = scale_input_channels(kind, w0, s, groups)
    out_ch = w0.shape[0] if kind != "conv_transpose" else w0.shape[1] * groups
    b = _f64(bias) if bias is not None else torch.zeros(out_ch, dtype=F64)
    if kind == "linear":
        b = b + w0 @ t
    elif kind == "conv":
        tw = _conv_input_per_output(w0, t, groups)  # [out, in/g, 1…]
        b = b + (w0 * tw).reshape(w0.shape[0], -1).sum(dim=1)
    elif bool((t != 0).any()):
        raise ValueError("BN → ConvTranspose folds only with a zero shift")
    return Folded(w, b)


@dataclass(frozen=True)
class Cast:
    """A folded tensor cast to the layer's dtype, and how many subnormals were flushed to zero."""

    tensor: torch.Tensor
    subnormals_flushed: int


def cast_checked(values: torch.Tensor, dtype: torch.dtype, *, layer: str, what: str) -> Cast:
    """Cast float64 ``values`` once to ``dtype``; refuse non-finite/overflowing results.

    Values with ``0 < |v| < finfo(dtype).tiny`` would become subnormals (slow on many CPUs) and
    are flushed to zero and counted. ``FoldError`` names the layer, the values and the fix.
    """
    v = _f64(values)
    info = torch.finfo(dtype)
    out = v.to(dtype)  # one pass; the checks below read the (smaller) result
    magnitude = out.abs()
    # One more read gives both bounds (a NaN propagates through aminmax).
    low, peak = (float(b) for b in torch.aminmax(magnitude)) if out.numel() else (1.0, 0.0)
    if not math.isfinite(peak):
        if not bool(torch.isfinite(v).all()):
            raise FoldError(
                f"folding into {layer!r} gives a non-finite {what} at "
                f"{offenders(~torch.isfinite(v), v)}; fix: check the BatchNorm statistics and the "
                "constants after it (a division by zero, an infinite temperature)"
            )
        raise FoldError(
            f"folding into {layer!r} overflows {str(dtype).removeprefix('torch.')}: {what} at "
            f"{offenders(~torch.isfinite(out), v)} exceeds the largest finite value "
            f"{info.max:.6g}; fix: fold while the model is in float32 (call .half()/.bfloat16() "
            "after folding), or keep this layer in float32"
        )
    flushed = 0
    if low < info.tiny:  # zeros, or subnormals to flush
        tiny = (magnitude < info.tiny) & (out != 0)
        flushed = int(tiny.sum())
        out = out.masked_fill(tiny, 0)
    return Cast(out, flushed)


def max_relative_change(old: torch.Tensor, new: torch.Tensor) -> float:
    """Largest ``|new − old| / |old|`` over the nonzero entries of ``old`` (float64).

    For a fold after a layer this is ``max |s_c − 1|`` over the channels; zero entries stay zero.
    """
    o = _f64(old)
    n = _f64(new)
    nz = o != 0
    if not bool(nz.any()):
        return 0.0
    return float(((n[nz] - o[nz]).abs() / o[nz].abs()).max())


def per_channel(value: torch.Tensor, out_shape: Sequence[int]) -> torch.Tensor | None:
    """``value`` as a float64 ``[C]`` vector if it broadcasts against ``out_shape`` per channel.

    Per channel means: right-aligned broadcasting leaves ``out_shape`` unchanged and ``value``
    varies only along dim 1 (``[C]`` for a rank-2 output, ``[1, C, 1, 1]``, a scalar…). Anything
    else (varies along batch or spatial dims, would broadcast the output bigger) returns None.
    """
    rank = len(out_shape)
    if rank < 2 or value.dim() > rank:
        return None
    shape = [1] * (rank - value.dim()) + list(value.shape)
    for i, (a, b) in enumerate(zip(shape, out_shape, strict=True)):
        if a not in (1, b) or (i != 1 and a != 1):
            return None
    channels = int(out_shape[1])
    return _f64(value).reshape(-1).expand(channels).clone()
