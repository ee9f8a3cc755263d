"""The seed's models: `TemperatureBatchNorm2d` (the blog's `myBN`) and `Net` (its MNIST CNN)."""

from __future__ import annotations

import torch
from torch import nn

INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10


class TemperatureBatchNorm2d(nn.Module):
    """BatchNorm2d followed by a constant scale: ``y = temperature * bn(x)``.

    Same constructor and submodule layout as the seed's ``myBN`` (``self.bn``), so state_dict keys
    are ``<name>.bn.weight``, ``<name>.bn.bias``, ``<name>.bn.running_mean``, ...
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temperature * self.bn(x)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class Net(nn.Module):
    """The seed's CNN: conv1 (1→32, 3×3, pad 1, no bias) → bn1 (with temperature) → ReLU → fc1."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = TemperatureBatchNorm2d(32, temperature=temperature)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Linear(32 * 28 * 28, NUM_CLASSES, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = x.view(x.size(0), -1)
        return self.fc1(x)
