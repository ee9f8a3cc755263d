"""Independent float64 references, written from raw state dicts with torch.nn.functional.

They never go through bnexport's code, so a test comparing against them can catch its bugs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def randomize_net_state(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BN sane, non-trivial statistics and affine params (a fresh BN is ~identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                if module.affine:
                    module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    module.bias.copy_(torch.randn(c, generator=gen) * 0.3)
                if module.track_running_stats:
                    module.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                    module.running_var.copy_(torch.rand(c, generator=gen) + 0.3)
    return model


def net_forward_f64(
    state_dict: dict[str, torch.Tensor], x: torch.Tensor, temperature: float, eps: float = 1e-5
) -> torch.Tensor:
    """The seed Net in float64: conv1 (pad 1) → T·BN → ReLU → flatten → fc1 (no biases)."""
    sd = {k.replace("bn1.bn.", "bn1."): v.double() for k, v in state_dict.items()}
    y = F.conv2d(x.double(), sd["conv1.weight"], stride=1, padding=1)
    shape = (1, -1, 1, 1)
    y = (y - sd["bn1.running_mean"].view(shape)) / torch.sqrt(
        sd["bn1.running_var"].view(shape) + eps
    )
    y = y * sd["bn1.weight"].view(shape) + sd["bn1.bias"].view(shape)
    y = torch.relu(temperature * y)
    return y.flatten(1) @ sd["fc1.weight"].T
