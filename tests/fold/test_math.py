"""bnexport.fold.math against independent float64 references written with torch.nn.functional.

The reference applies the layer, then ``F.batch_norm`` (eval), then ``T·`` and a per-channel shift,
exactly as a model would; the folded parameters must reproduce it with one layer call.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from bnexport.errors import FoldError
from bnexport.fold import math as fm

F64 = torch.float64
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

# (kind, rank, in_channels, out_channels, groups): groups 1, grouped and depthwise, every rank.
LAYERS = [
    *(("conv", d, 4, 6, g) for d in (1, 2, 3) for g in (1, 2)),
    *(("conv", d, 4, 4, 4) for d in (1, 2, 3)),  # depthwise
    *(("conv_transpose", d, 4, 6, g) for d in (1, 2, 3) for g in (1, 2)),
    *(("conv_transpose", d, 4, 4, 4) for d in (1, 2, 3)),  # depthwise transposed
    ("linear", 0, 5, 7, 1),
]


def _ids(p: tuple) -> str:
    kind, d, cin, cout, g = p
    return f"{kind}{d or ''}d-{cin}x{cout}-g{g}" if kind != "linear" else "linear"


def _layer(kind: str, d: int, cin: int, cout: int, g: int, bias: bool, gen: torch.Generator):
    """Random float64 weight/bias and the functional call (stride 2, dilation 2 for convs)."""
    if kind == "linear":
        w = torch.randn(cout, cin, generator=gen, dtype=F64)

        def call(x, w_, b_):
            return F.linear(x, w_, b_)

        shape = (3, cin)
    elif kind == "conv":
        w = torch.randn(cout, cin // g, *(3,) * d, generator=gen, dtype=F64)

        def call(x, w_, b_):
            return CONV[d](x, w_, b_, stride=2, padding=0, dilation=2, groups=g)

        shape = (2, cin, *(9,) * d)
    else:
        w = torch.randn(cin, cout // g, *(3,) * d, generator=gen, dtype=F64)

        def call(x, w_, b_):
            return CONVT[d](x, w_, b_, stride=2, padding=1, output_padding=1, groups=g, dilation=2)

        shape = (2, cin, *(4,) * d)
    b = torch.randn(cout, generator=gen, dtype=F64) if bias else None
    x = torch.randn(*shape, generator=gen, dtype=F64)
    return w, b, call, x


def _bn(c: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "running_mean": torch.randn(c, generator=gen, dtype=F64),
        "running_var": torch.rand(c, generator=gen, dtype=F64) + 0.1,
        "weight": torch.randn(c, generator=gen, dtype=F64),
        "bias": torch.randn(c, generator=gen, dtype=F64),
    }


def _per_channel(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * (y.dim() - 2)))


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    scale = max(1.0, float(ref.abs().max()))
    assert float((got - ref).abs().max()) <= 1e-10 * scale


@pytest.mark.parametrize("layer", LAYERS, ids=_ids)
@pytest.mark.parametrize(
    ("bias", "temperature"),
    [(True, 1.5), (False, -0.7), (True, 0.0)],
    ids=["bias-T1.5", "nobias-T-0.7", "bias-T0"],
)
def test_fold_after_matches_layer_bn_temperature_shift(layer, bias, temperature) -> None:
    kind, d, cin, cout, g = layer
    gen = torch.Generator().manual_seed(zlib.crc32(repr((layer, bias, temperature)).encode()))
    w, b, call, x = _layer(kind, d, cin, cout, g, bias, gen)
    bn = _bn(cout, gen)
    offset = torch.randn(cout, generator=gen, dtype=F64)
    eps = 1e-3

    y = call(x, w, b)
    ref = F.batch_norm(y, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"],
                       training=False, eps=eps)  # fmt: skip
    ref = temperature * ref + _per_channel(y, offset)

    s, t = fm.bn_affine(bn["running_mean"], bn["running_var"], eps, bn["weight"], bn["bias"])
    s, t = fm.compose(s, t, temperature, 0.0)
    s, t = fm.compose(s, t, 1.0, offset)
    folded = fm.fold_after(kind, w, b, s, t, groups=g)
    assert folded.weight.shape == w.shape
    _close(call(x, folded.weight, folded.bias), ref)


BEFORE = [
    *(("conv", d, 4, 6, g) for d in (1, 2, 3) for g in (1, 2)),
    ("conv", 2, 4, 8, 4),  # depthwise with multiplier 2
    ("linear", 0, 5, 7, 1),
]


@pytest.mark.parametrize("layer", BEFORE, ids=_ids)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("temperature", [2.0, -1.25])
def test_fold_before_matches_bn_then_layer(layer, bias, temperature) -> None:
    """BN → Linear and BN → Conv (padding 0): scale on the input axis, shift into the bias."""
    kind, d, cin, cout, g = layer
    gen = torch.Generator().manual_seed(zlib.crc32(repr((layer, bias, temperature, "b")).encode()))
    w, b, call, x = _layer(kind, d, cin, cout, g, bias, gen)
    bn = _bn(cin, gen)
    eps = 1e-5
    z = F.batch_norm(x, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"],
                     training=False, eps=eps)  # fmt: skip
    ref = call(temperature * z, w, b)

    s, t = fm.bn_affine(bn["running_mean"], bn["running_var"], eps, bn["weight"], bn["bias"])
    s, t = fm.compose(s, t, temperature, 0.0)
    folded = fm.fold_before(kind, w, b, s, t, groups=g)
    _close(call(x, folded.weight, folded.bias), ref)


@pytest.mark.parametrize("g", [1, 2, 4])
def test_fold_before_conv_transpose_with_zero_shift(g: int) -> None:
    gen = torch.Generator().manual_seed(g)
    w, b, call, x = _layer("conv_transpose", 2, 4, 4, g, True, gen)
    s = torch.rand(4, generator=gen, dtype=F64) + 0.5
    ref = call(x * _per_channel(x, s), w, b)
    folded = fm.fold_before("conv_transpose", w, b, s, torch.zeros(4, dtype=F64), groups=g)
    _close(call(x, folded.weight, folded.bias), ref)


def test_fold_before_conv_transpose_refuses_a_shift() -> None:
    w = torch.randn(4, 2, 3, 3, dtype=F64)
    with pytest.raises(ValueError, match="zero shift"):
        fm.fold_before("conv_transpose", w, None, torch.ones(4), torch.full((4,), 0.5), groups=2)


def test_conv_transpose_scales_axis_one_per_group() -> None:
    """Output channel o = g·(out/g) + j of a grouped ConvTranspose is W[g·in/g:(g+1)·in/g, j]."""
    w = torch.ones(4, 3, 1, 1, dtype=F64)  # in=4, groups=2 -> out = 2·3 = 6
    s = torch.arange(1.0, 7.0, dtype=F64)
    got = fm.scale_output_channels("conv_transpose", w, s, groups=2)
    assert got[:2, :, 0, 0].tolist() == [[1, 2, 3], [1, 2, 3]]
    assert got[2:, :, 0, 0].tolist() == [[4, 5, 6], [4, 5, 6]]


def test_bn_affine_formula_and_defaults() -> None:
    mean, var = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.25])
    s, t = fm.bn_affine(mean, var, 1.0, None, None)  # affine=False: γ = 1, β = 0
    assert s.dtype == F64
    assert s.tolist() == pytest.approx([0.5, 1 / math.sqrt(1.25)])
    assert t.tolist() == pytest.approx([-0.5, 2 / math.sqrt(1.25)])


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("running_mean", float("nan"), "running_mean has non-finite values at channels [2]"),
        ("running_var", float("inf"), "running_var has non-finite values"),
        ("weight", float("nan"), "weight has non-finite values"),
        ("running_var", -1.0, "running_var + eps <= 0 at channels [2]"),
    ],
)
def test_validate_bn_names_layer_channels_and_fix(field, value, needle) -> None:
    params = {
        "running_mean": torch.zeros(4),
        "running_var": torch.ones(4),
        "weight": torch.ones(4),
        "bias": torch.zeros(4),
    }
    params[field][2] = value
    with pytest.raises(FoldError) as exc:
        fm.validate_bn("features.3", eps=1e-5, **params)
    msg = str(exc.value)
    assert "'features.3'" in msg
    assert needle in msg
    assert "fix" in msg or "recompute" in msg


def test_validate_bn_zero_variance_with_zero_eps() -> None:
    with pytest.raises(FoldError, match=r"running_var \+ eps <= 0 at channels \[0, 1\]"):
        fm.validate_bn("bn", torch.zeros(2), torch.zeros(2), 0.0)


def test_cast_checked_fp16_overflow_names_layer() -> None:
    with pytest.raises(FoldError, match=r"'conv7' overflows float16.*channels \[1\]"):
        fm.cast_checked(torch.tensor([1.0, 7e4, -3.0]), torch.float16, layer="conv7", what="weight")


def test_cast_checked_non_finite() -> None:
    with pytest.raises(FoldError, match="non-finite bias"):
        fm.cast_checked(torch.tensor([1.0, float("nan")]), torch.float32, layer="fc", what="bias")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cast_checked_flushes_and_counts_subnormals(dtype: torch.dtype) -> None:
    tiny = torch.finfo(dtype).tiny
    values = torch.tensor([tiny / 4, -tiny / 8, tiny * 2, 0.0, 1.0], dtype=F64)
    out = fm.cast_checked(values, dtype, layer="l", what="weight")
    assert out.subnormals_flushed == 2
    assert out.tensor.dtype == dtype
    assert out.tensor[:2].tolist() == [0.0, 0.0]
    assert out.tensor[2] != 0


def test_cast_checked_keeps_the_smallest_normal_and_takes_empty_tensors() -> None:
    tiny = torch.finfo(torch.float32).tiny
    values = torch.tensor([tiny, -tiny], dtype=F64)
    out = fm.cast_checked(values, torch.float32, layer="l", what="w")
    assert out.subnormals_flushed == 0
    assert out.tensor.tolist() == [tiny, -tiny]
    empty = fm.cast_checked(torch.empty(0, 3, dtype=F64), torch.float32, layer="l", what="w")
    assert empty.tensor.shape == (0, 3) and empty.subnormals_flushed == 0


def test_max_relative_change_is_max_scale_deviation() -> None:
    w = torch.tensor([[1.0, -2.0], [0.0, 4.0]])
    new = torch.tensor([[1.5, -3.0], [0.0, 1.0]])
    assert fm.max_relative_change(w, new) == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("shape", "ok"),
    [((), True), ((1,), True), ((1, 5, 1, 1), True), ((5, 1, 1), True), ((1, 1, 1, 1), True),
     ((5,), False), ((1, 5, 3, 1), False), ((2, 5, 1, 1), False), ((1, 1, 5, 1, 1), False)],
)  # fmt: skip
def test_per_channel_accepts_only_channel_aligned_constants(shape, ok) -> None:
    got = fm.per_channel(torch.ones(shape), (2, 5, 3, 3))
    assert (got is not None) == ok
    if ok:
        assert got.shape == (5,)


def test_per_channel_rank2_accepts_feature_vector() -> None:
    assert fm.per_channel(torch.arange(5.0), (2, 5)).tolist() == [0, 1, 2, 3, 4]
