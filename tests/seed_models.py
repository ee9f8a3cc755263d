"""The blog post's classes, copied as written (shared/seed/), to prove their state dicts load.

`SeedNet` is the post's `Net` (plain `nn.BatchNorm2d`); `myBN` is its temperature BN; `SeedNetMyBN`
is the same Net with `bn1 = myBN(32, temperature=...)`, the layout the post's section 3.2 implies.
"""

import torch.nn as nn


class SeedNet(nn.Module):
    def __init__(self):
        super(SeedNet, self).__init__()  # noqa: UP008 - as in the post
        self.conv1 = nn.Conv2d(1, 32, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Linear(32 * 28 * 28, 10, bias=False)

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = x.view(x.size(0), -1)
        x = self.fc1(x)
        return x


class myBN(nn.Module):
    def __init__(
        self,
        num_features,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        track_running_stats=True,
        temperature=1.0,
    ):
        super(myBN, self).__init__()  # noqa: UP008
        self.bn = nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
        self.temperature = temperature

    def forward(self, x):
        out = self.bn(x)
        out = self.temperature * out
        return out


class SeedNetMyBN(SeedNet):
    def __init__(self, temperature=1.0, track_running_stats=True):
        super().__init__()
        self.bn1 = myBN(32, temperature=temperature, track_running_stats=track_running_stats)
