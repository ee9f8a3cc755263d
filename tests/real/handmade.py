"""Hand-written corner cases for the real-model zoo: small models that real code bases
contain and that broke the gate or the fold.

* `ConvGap`: conv → BN → global average pool over a 64×64 map. onnxruntime's ``ReduceMean`` sums
  4,096 values in another order than PyTorch; on the near-constant maps of the edge-case inputs
  the difference is legitimate accumulation-order noise, not a fault.
* `MetaNamed`: a submodule called ``meta`` (``body.meta``), a name `torch.fx.GraphModule` reserves.
* `ShapeBranch`: ``if x.shape[-1] > 32:`` in the top-level ``forward``.
* `ShapeLoop`: a loop whose bound comes from a shape.
* `TokenNorm`: timm LeViT's ``LinearNorm``, ``bn(linear(x).flatten(0, 1)).reshape_as(...)``: a
  BatchNorm1d over reshaped tokens that keeps the feature axis.
"""

from __future__ import annotations

import torch
from torch import nn

GAP_CHANNELS = 16  # ConvGap's output features
WIDTH = 16  # channels of the other corner cases
TOKENS = 16  # TokenNorm's tokens per sample (a 4×4 patch grid)


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3×3 conv → BN → ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class ConvGap(nn.Module):
    """Conv → BN → global average pool; output ``[N, 16]`` (the 64×64 map's channel means)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, GAP_CHANNELS, 3, padding=1)
        self.bn = nn.BatchNorm2d(GAP_CHANNELS)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.bn(self.conv(x))).flatten(1)


class _Head(nn.Module):
    """Pool → flatten → Linear."""

    def __init__(self, width: int, classes: int = 10) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x).flatten(1))


class _MetaBlock(nn.Module):
    """Conv → BN → ReLU with the conv stored as ``self.meta``."""

    def __init__(self) -> None:
        super().__init__()
        self.meta = nn.Conv2d(WIDTH, WIDTH, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(WIDTH)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.meta(x)))


class MetaNamed(nn.Module):
    """A conv called ``meta`` (a name ``torch.fx.GraphModule`` reserves) inside ``body``; torch's
    exporter handles it there (at the top level it fails too, as of torch 2.13)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, WIDTH, 2)
        self.body = _MetaBlock()
        self.head = _Head(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


class ShapeBranch(nn.Module):
    """Python control flow on a shape in the top-level ``forward``: large maps are downsampled."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, WIDTH)
        self.down = conv_bn(WIDTH, WIDTH, 2)
        self.body = conv_bn(WIDTH, WIDTH)
        self.head = _Head(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.shape[-1] > 32:
            x = self.down(x)
        return self.head(self.body(x))


class ShapeLoop(nn.Module):
    """A loop bound from a shape: the shared block runs until the map is 16 pixels wide."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, WIDTH)
        self.down = conv_bn(WIDTH, WIDTH, 2)
        self.head = _Head(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for _ in range(max(0, x.shape[-1].bit_length() - 5)):
            x = self.down(x)
        return self.head(x)


class LinearNorm(nn.Module):
    """timm LeViT's ``LinearNorm``: Linear, then BatchNorm1d over ``[N·T, C]`` tokens."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class TokenNorm(nn.Module):
    """Patches → tokens ``[N, 16, C]`` → two `LinearNorm` with a GELU → token mean → Linear."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, WIDTH, 16, stride=16)
        self.mlp1 = LinearNorm(WIDTH, 2 * WIDTH)
        self.act = nn.GELU()
        self.mlp2 = LinearNorm(2 * WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.mlp2(self.act(self.mlp1(tokens)))
        return self.head(tokens.mean(1))


#: zoo name (after ``handmade/``) → class; every one takes a 3×64×64 image.
HANDMADE = {
    "conv_gap": ConvGap,
    "meta_named": MetaNamed,
    "shape_branch": ShapeBranch,
    "shape_loop": ShapeLoop,
    "token_norm": TokenNorm,
}
