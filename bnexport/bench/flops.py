"""Work and peak: FLOPs per image of a model, and the machine's measured fp32 matrix-product rate.

``count_flops`` counts ``FLOPs = 2 × multiply-accumulates`` of every Conv, ConvTranspose and Linear
call in one batch-1 forward (elementwise ops are not counted). Achieved
``GFLOP/s = FLOPs/image × images/s``; the machine's fp32 peak is measured in the same run as the
best rate of an ``n × n`` float32 matrix product (``2n³`` FLOPs) in PyTorch, same thread count.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from bnexport.defaults import DEFAULT_MIN_TIME_S, DEFAULT_PEAK_N, DEFAULT_PEAK_REPEATS
from bnexport.timing import calibrate, no_gc, time_calls

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LayerFlops:
    """FLOPs (2 × MACs) of one Conv/ConvTranspose/Linear call for one input item."""

    name: str
    kind: str
    flops: int


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per image: the sum over ``layers``."""

    per_image: int
    layers: tuple[LayerFlops, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"per_image": self.per_image, "layers": [asdict(layer) for layer in self.layers]}


@dataclass(frozen=True)
class PeakResult:
    """The machine's measured fp32 matrix-product rate (GFLOP/s): best and median of repeats."""

    gflops: float
    median_gflops: float
    n: int
    threads: int
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_flops(model: torch.nn.Module, input_shape: Sequence[int]) -> FlopCount:
    """FLOPs per image of ``model`` (2 × MACs of Conv/ConvTranspose/Linear), from one forward.

    Conv: ``2·|out|·(C_in/groups)·∏k``; ConvTranspose: ``2·|in|·(C_out/groups)·∏k``;
    Linear: ``2·|in|·out_features`` (``|t|`` = elements of a batch-1 tensor). Layers called twice
    count twice; functional calls (``F.conv2d``) are not seen.
    """
    import torch
    from torch import nn

    layers: list[LayerFlops] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        flops = _layer_flops(module, inputs[0], output)
        layers.append(LayerFlops(names.get(module, "?"), type(module).__name__, flops))

    kinds = (nn.modules.conv._ConvNd, nn.Linear)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.inference_mode():
            model(torch.zeros((1, *input_shape), dtype=torch.float32))
    finally:
        for h in handles:
            h.remove()
    return FlopCount(sum(layer.flops for layer in layers), tuple(layers))


def _layer_flops(module: Any, x: torch.Tensor, output: torch.Tensor) -> int:
    """2 × MACs of one Conv/ConvTranspose/Linear call (formulas in `count_flops`)."""
    from torch import nn

    if isinstance(module, nn.modules.conv._ConvNd):
        k = math.prod(module.kernel_size)
        if module.transposed:
            return int(2 * x.numel() * (module.out_channels // module.groups) * k)
        return int(2 * output.numel() * (module.in_channels // module.groups) * k)
    return int(2 * x.numel() * module.out_features)  # nn.Linear


def measure_peak(
    n: int = DEFAULT_PEAK_N,
    repeats: int = DEFAULT_PEAK_REPEATS,
    min_time_s: float = DEFAULT_MIN_TIME_S,
) -> PeakResult:
    """fp32 GFLOP/s of ``torch.mm`` on two ``n × n`` matrices (``2n³`` FLOPs), best of repeats."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn((n, n), generator=gen)
    b = torch.randn((n, n), generator=gen)
    out = torch.empty((n, n))

    def call() -> None:
        torch.mm(a, b, out=out)

    with no_gc():
        calls = calibrate(call, min_time_s, min_time_s)
        rates = [2 * n**3 / time_calls(call, calls) / 1e9 for _ in range(repeats)]
    return PeakResult(
        gflops=max(rates),
        median_gflops=statistics.median(rates),
        n=n,
        threads=torch.get_num_threads(),
        method=f"torch.mm float32 {n}x{n} @ {n}x{n}, best of {repeats}",
    )
