"""The summation-order draw (`bnexport.parity.orders`): PyTorch's long sums added in lanes, in
order, as onnxruntime's CPU reductions add them; it raises the noise floor of the samples where
that order changes the result (the constant images of conv → global average pool over a 64×64
map), and a fault 8× PyTorch's own floor on the other samples still fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bnexport.noise import NoiseTolerance, order_floors, relative_error, worst_sample
from bnexport.parity.engine import measure_baseline, run_reference
from bnexport.parity.inputs import InputConfig, build_inputs
from bnexport.parity.orders import (
    ACCUMULATION_LANES,
    MIN_REORDERED_LENGTH,
    ReorderedRunner,
    lane_sum,
    lane_sums_mode,
)
from bnexport.runners import OnnxRuntimeRunner, TorchRunner
from bnexport.signature import TensorSpec


def _sequential_lanes(x: np.ndarray, lanes: int) -> np.ndarray:
    """An independent float32 lane sum: lane k adds values k, k+lanes, … in order; then the lanes
    are added in order."""
    acc = np.zeros((*x.shape[:-1], lanes), dtype=np.float32)
    for i in range(x.shape[-1]):
        acc[..., i % lanes] = np.float32(acc[..., i % lanes] + x[..., i])
    total = acc[..., 0].copy()
    for lane in range(1, lanes):
        total = (total + acc[..., lane]).astype(np.float32)
    return total


@pytest.mark.parametrize("n", [1, 7, 8, 100, 1000])
def test_lane_sum_is_the_sequential_lane_order_bit_for_bit(n: int) -> None:
    x = np.random.default_rng(n).standard_normal((3, n)).astype(np.float32) + 10
    got = lane_sum(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, _sequential_lanes(x, ACCUMULATION_LANES))


def _ops() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g) + 3
    tokens = torch.randn(2, 2, 80, 8, generator=g)
    weight, bias = torch.randn(256, generator=g), torch.randn(256, generator=g)
    f = torch.nn.functional
    return [
        x.mean((2, 3)),
        x.sum((1, 2, 3), keepdim=True),
        x.mean(),
        f.adaptive_avg_pool2d(x, 1),
        f.avg_pool2d(x, 16),
        f.adaptive_avg_pool3d(x[:, None], 1),
        torch.softmax(x.flatten(1), -1),
        torch.log_softmax(x.flatten(1), -1),
        f.layer_norm(x.reshape(2, 4, 256), (256,), weight, bias),
        f.scaled_dot_product_attention(tokens, tokens, tokens),
        f.scaled_dot_product_attention(tokens, tokens, tokens, is_causal=True),
        f.layer_norm(x.reshape(2, 64, 16), (16,)),  # 16 values: left to PyTorch
        x[:, :, :4, :4].mean((2, 3)),  # 16 values: left to PyTorch
    ]


def test_the_reordered_ops_compute_what_pytorch_computes() -> None:
    lengths: dict[str, int] = {}
    with torch.inference_mode():
        plain = _ops()
        with lane_sums_mode(lengths):
            reordered = _ops()
    for a, b in zip(reordered, plain, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(reordered[-2:], plain[-2:], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # untouched
    assert (lengths["mean"], lengths["sum"]) == (2048, 1024)  # x.mean(): every value
    assert lengths["adaptive_avg_pool2d"] == lengths["avg_pool2d"] == 256
    assert lengths["softmax"] == lengths["log_softmax"] == 1024
    assert lengths["scaled_dot_product_attention"] == 80
    assert lengths["layer_norm"] == 256
    assert MIN_REORDERED_LENGTH > 16


class ConvGap(torch.nn.Module):
    """Conv → BN → global average pool over a 64×64 map (a false alarm of the fixed floor)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        with torch.no_grad():
            self.bn.running_mean.normal_(0, 0.2)
            self.bn.running_var.uniform_(0.5, 2)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.bn(self.conv(x))).flatten(1)


@pytest.fixture(scope="module")
def conv_gap(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = ConvGap()
    path = tmp_path_factory.mktemp("orders") / "gap.onnx"
    program = torch.onnx.export(
        model,
        (torch.randn(2, 3, 64, 64),),
        dynamo=True,
        input_names=["x"],
        output_names=["y"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    program.save(str(path))
    return model, path


def test_conv_gap_passes_with_the_order_draw_and_fails_without(
    conv_gap: tuple[torch.nn.Module, Path],
) -> None:
    from bnexport.ort import SessionConfig

    model, path = conv_gap
    spec = TensorSpec("x", (None, 3, 64, 64), np.dtype("float32"))
    inputs = build_inputs([spec], InputConfig(random_count=8))
    ref = TorchRunner(model, ["x"], ["y"])
    truth = TorchRunner(model, ["x"], ["y"], name="torch-fp64", dtype="float64")
    ort = OnnxRuntimeRunner(path, SessionConfig(provider="cpu"), name="ort-cpu-all")
    rule = NoiseTolerance()
    eps = float(np.finfo(np.float32).eps)
    out = run_reference(ort, inputs, 8)["y"]

    without = measure_baseline(ref, inputs, 8, truth=truth)
    base = measure_baseline(ref, inputs, 8, truth=truth, noise_runners=[ReorderedRunner(ref)])
    assert not without.ungated["y"].any() and not base.ungated["y"].any()
    assert base.noise["y"] == without.noise["y"]  # PyTorch's own floor is unchanged
    error = relative_error(out, base.truth["y"]).value
    assert not rule.passes(error, without.noise["y"], eps)  # the fixed floor's false alarm
    e, floor = worst_sample(out, base.truth["y"], base.floors["y"], eps)
    assert rule.passes(e.value, floor, eps)
    draws = base.draws["y"]
    assert max(draws, key=draws.__getitem__).startswith("torch-fp32-reordered")

    # order raises the floor of the constant images only, 4× and more; the random samples keep
    # PyTorch's own, so a fault 8× that floor on a random sample still fails
    raised = base.floors["y"] > base.noise["y"]
    edge = inputs.edge_case_mask()
    assert raised.any() and not (raised & ~edge).any()
    assert base.floors["y"].max() > 4 * base.noise["y"]
    sample = int(np.flatnonzero(~edge)[0])
    channel = int(np.argmax(np.abs(base.truth["y"][sample])))
    scale = float(np.abs(base.truth["y"][sample]).max())
    faulty = out.copy()
    faulty[sample, channel] += 8 * rule.floor(base.noise["y"], eps) * scale
    e, floor = worst_sample(faulty, base.truth["y"], base.floors["y"], eps)
    assert e.sample == sample and not rule.passes(e.value, floor, eps)


def test_order_floors_raise_only_the_samples_the_reordered_draw_errs_more_on() -> None:
    truth = np.ones((3, 4))
    reordered = truth.copy()
    reordered[1, 2] += 1e-5  # sample 1 errs 1e-5 in the other order
    floors = order_floors([reordered], truth, noise=1e-7)
    np.testing.assert_allclose(floors, [1e-7, 1e-5, 1e-7], rtol=1e-9)
    assert order_floors([], truth, noise=1e-7) is None


def test_worst_sample_is_the_largest_error_over_its_own_floor() -> None:
    eps = float(np.finfo(np.float32).eps)
    truth = np.ones((3, 4))
    cand = truth.copy()
    cand[1, 0] += 5e-6  # the largest error, but under its raised floor: 0.5×
    cand[2, 3] += 1e-6  # smaller, over PyTorch's own floor: 10×
    e, floor = worst_sample(cand, truth, np.array([1e-7, 1e-5, 1e-7]), eps)
    assert (e.sample, e.index, floor) == (2, (3,), 1e-7)
    assert e.value == pytest.approx(1e-6)
