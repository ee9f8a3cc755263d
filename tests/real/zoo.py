"""Seeded real models for the tests: torchvision and timm architectures with realistic BatchNorms.

``REAL_MODELS[name]()`` returns ``(model, example_inputs)``: the model in eval mode and a tuple of
positional example inputs (batch `EXAMPLE_BATCH`). Names are ``<source>/<model>``
(``torchvision/resnet18``, ``timm/efficientnet_b0``, ``handmade/two_input_net``); `requirement`
says which package a name needs.

Weights are random but the BatchNorms are not trivial: with the global RNG seeded from the name
(`seed_of`, restored afterwards), the factory builds the model, draws every BN's γ ~ U(0.5, 1.5)
and β ~ N(0, 0.1), then sets the running statistics to those of one train-mode batch of
`STATS_BATCH` random inputs (momentum 1 for that batch, on one thread). Frozen BNs (buffers only,
e.g. torchvision's ``FrozenBatchNorm2d``) get μ ~ N(0, 0.1) and σ² ~ U(0.5, 2). Two calls give the
same model, bit for bit, whatever the thread count. Inputs are small (`IMAGE_SIZE`, except where
an architecture needs more).

torchvision is made importable first on CPU-only torch builds (`tv_compat`).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from real.handmade import HANDMADE
from real.tv_compat import ensure_torchvision_ops
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

ensure_torchvision_ops()

Inputs = tuple[torch.Tensor, ...]
Factory = Callable[[], tuple[nn.Module, Inputs]]

IMAGE_SIZE = 64  # input height/width wherever the architecture allows
INCEPTION_SIZE = 299  # inception_v3's native size
EFFICIENTFORMER_SIZE = 224  # efficientformer_l1's attention biases are sized for 224×224
VIDEO_FRAMES = 8  # r3d_18's clip length
TWO_INPUT_SIZE = 32  # TwoInputNet's image
TWO_INPUT_FEATURES = 8  # TwoInputNet's feature vector
EXAMPLE_BATCH = 2  # batch of the example inputs a factory returns
STATS_BATCH = 4  # batch of the train-mode forward that sets the running statistics

GAMMA_RANGE = (0.5, 1.5)  # γ ~ U(lo, hi)
BETA_STD = 0.1  # β ~ N(0, std)
FROZEN_MEAN_STD = 0.1  # frozen BN: μ ~ N(0, std)
FROZEN_VAR_RANGE = (0.5, 2.0)  # frozen BN: σ² ~ U(lo, hi)

_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


class TwoInputNet(nn.Module):
    """Two positional inputs, a dict output and a temperature-scaled head.

    ``image`` [N, 3, 32, 32] → conv → BN → ReLU → pool; ``features`` [N, 8] → Linear → BatchNorm1d;
    both concatenated into ``embedding``; ``logits = head(embedding) / temperature``.
    """

    def __init__(self, classes: int = 10, width: int = 16, temperature: float = 1.7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(TWO_INPUT_FEATURES, width)
        self.bn1d = nn.BatchNorm1d(width)
        self.head = nn.Linear(2 * width, classes)
        self.register_buffer("temperature", torch.tensor(temperature))

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.pool(self.relu(self.bn(self.conv(image)))).flatten(1)
        f = self.bn1d(self.fc(features))
        z = torch.cat([x, f], dim=1)
        return {"logits": self.head(z) / self.temperature, "embedding": z}


# --------------------------------------------------------------------------------------------
# BatchNorm-like modules and realistic statistics
# --------------------------------------------------------------------------------------------


def is_frozen_bn(module: nn.Module) -> bool:
    """A BN kept as plain buffers (torchvision/timm ``FrozenBatchNorm2d`` and look-alikes)."""
    buffers = module._buffers
    return (
        not isinstance(module, _BatchNorm)
        and all(isinstance(buffers.get(b), torch.Tensor) for b in _FROZEN_BUFFERS)
        and not any(True for _ in module.parameters(recurse=False))
    )


def batchnorm_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every BatchNorm-like module with its path: `_BatchNorm` subclasses and frozen BNs."""
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) or is_frozen_bn(module):
            yield name, module


def realistic_batchnorms(model: nn.Module, stats_inputs: Inputs) -> nn.Module:
    """Randomise every BN's γ/β and give it running statistics (see module docstring); eval().

    Uses the global RNG: call it seeded.
    """
    lo, hi = GAMMA_RANGE
    bns = [m for _, m in batchnorm_modules(model)]
    with torch.no_grad():
        for bn in bns:
            if bn.weight is not None:
                bn.weight.uniform_(lo, hi)
            if bn.bias is not None:
                bn.bias.normal_(0.0, BETA_STD)
            if is_frozen_bn(bn):
                bn.running_mean.normal_(0.0, FROZEN_MEAN_STD)
                bn.running_var.uniform_(*FROZEN_VAR_RANGE)
        trained = [bn for bn in bns if isinstance(bn, _BatchNorm) and bn.track_running_stats]
        momenta = [bn.momentum for bn in trained]
        for bn in trained:
            bn.momentum = 1.0
        model.train()
        model(*stats_inputs)
        for bn, momentum in zip(trained, momenta, strict=True):
            bn.momentum = momentum
    return model.eval()


def seed_of(name: str) -> int:
    """The RNG seed of a zoo model: a stable hash of its name."""
    return zlib.crc32(name.encode())


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    build: Callable[[], nn.Module]
    input_shapes: tuple[tuple[int, ...], ...]  # per positional input, without the batch dim


def _image(size: int = IMAGE_SIZE) -> tuple[tuple[int, ...], ...]:
    return ((3, size, size),)


def _torchvision(name: str, **kwargs: object) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(**kwargs)


def _torchvision_segmentation(name: str, **kwargs: object) -> nn.Module:
    import torchvision

    return getattr(torchvision.models.segmentation, name)(**kwargs)


def _torchvision_video(name: str, **kwargs: object) -> nn.Module:
    import torchvision

    return getattr(torchvision.models.video, name)(**kwargs)


def _frozen_resnet18() -> nn.Module:
    from torchvision.ops.misc import FrozenBatchNorm2d

    return _torchvision("resnet18", norm_layer=FrozenBatchNorm2d)


def _quantizable(name: str) -> nn.Module:
    from torchvision.models import quantization

    return getattr(quantization, name)(quantize=False)


def _timm(name: str, **kwargs: object) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


def _nonzero_gains(name: str) -> nn.Module:
    """A timm NF model whose zero-initialised gains (``conv3.gain``) are drawn U(0.5, 1.5)."""
    model = _timm(name)
    with torch.no_grad():
        for path, param in model.named_parameters():
            if path.endswith("gain") and not bool(param.any()):
                param.uniform_(*GAMMA_RANGE)
    return model


#: torchvision classifiers built with their defaults (``torchvision.models.<name>()``).
TORCHVISION = (
    "resnet18",
    "resnet50",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "densenet121",
    "shufflenet_v2_x1_0",
    "mnasnet0_5",
    "regnet_y_400mf",
    "vgg11_bn",
    # models first tried through the CLI as a new user would
    "efficientnet_v2_s",
    "convnext_tiny",  # LayerNorm, no BatchNorm
    "squeezenet1_1",  # no BatchNorm
)
#: timm models (``timm.create_model(name, pretrained=False)``).
TIMM = (
    "resnet18d",
    "efficientnet_b0",
    "regnetx_002",
    "rexnet_100",
    "ghostnet_100",
    "resnetv2_50",
    "mixnet_s",  # mixed kernels: split → convs → cat → BN
    "tf_mixnet_s",  # the same with run-time "same" padding (Conv2dSame, a probed custom conv)
    # models first tried through the CLI as a new user would
    "resnest14d",
    "repvgg_a0",
    "hrnet_w18_small",
    "ghostnetv2_100",
    "lcnet_050",
    "regnety_002",
    "fbnetv3_b",
    "tinynet_e",
    "rexnetr_100",
    "nf_resnet26",  # scaled weight-standardised convs, no BatchNorm; timm zero-inits conv3.gain
)
#: timm models built with an image size (their attention biases are sized for it).
TIMM_SIZED = {"levit_128s": IMAGE_SIZE, "efficientformerv2_s0": IMAGE_SIZE}

#: Zoo models without any BatchNorm (the fold has nothing to do; the gate still checks them).
NO_BATCHNORM = frozenset(
    {
        "torchvision/convnext_tiny",
        "torchvision/squeezenet1_1",
        "timm/nf_resnet26",
        "timm/nf_resnet26_gains",
    }
)

#: The 28 models first tried as a new user would (real models nobody had run, and hand-written
#: corner cases): every one exports and passes ``bnexport check`` with default options.
UNSEEN_MODELS = (
    *(
        f"torchvision/{name}"
        for name in (
            "r3d_18",
            "efficientnet_v2_s",
            "convnext_tiny",
            "deeplabv3_resnet50",
            "googlenet",
            "shufflenet_v2_x1_0",
            "squeezenet1_1",
            "quantizable_mobilenet_v2",
            "mnasnet0_5",
        )
    ),
    *(
        f"timm/{name}"
        for name in (
            "resnest14d",
            "repvgg_a0",
            "hrnet_w18_small",
            "levit_128s",
            "ghostnetv2_100",
            "lcnet_050",
            "regnety_002",
            "efficientformer_l1",
            "efficientformerv2_s0",
            "fbnetv3_b",
            "tinynet_e",
            "rexnetr_100",
            "nf_resnet26",
            "nf_resnet26_gains",
        )
    ),
    *(f"handmade/{name}" for name in HANDMADE),
)


def _specs() -> dict[str, _Spec]:
    tv = {name: _Spec(functools.partial(_torchvision, name), _image()) for name in TORCHVISION}
    tv["googlenet"] = _Spec(
        functools.partial(_torchvision, "googlenet", aux_logits=False, init_weights=False),
        _image(),
    )
    tv["inception_v3"] = _Spec(
        functools.partial(_torchvision, "inception_v3", aux_logits=False, init_weights=False),
        _image(INCEPTION_SIZE),
    )
    tv["deeplabv3_mobilenet_v3_large"] = _Spec(
        functools.partial(
            _torchvision_segmentation,
            "deeplabv3_mobilenet_v3_large",
            weights=None,
            weights_backbone=None,
            aux_loss=False,
        ),
        _image(),
    )
    tv["resnet18_frozen_bn"] = _Spec(_frozen_resnet18, _image())
    tv["r3d_18"] = _Spec(
        functools.partial(_torchvision_video, "r3d_18"),
        ((3, VIDEO_FRAMES, IMAGE_SIZE, IMAGE_SIZE),),
    )
    tv["deeplabv3_resnet50"] = _Spec(
        functools.partial(
            _torchvision_segmentation,
            "deeplabv3_resnet50",
            weights=None,
            weights_backbone=None,
            aux_loss=False,
        ),
        _image(),
    )
    tv["quantizable_mobilenet_v2"] = _Spec(
        functools.partial(_quantizable, "mobilenet_v2"), _image()
    )
    specs = {f"torchvision/{name}": spec for name, spec in tv.items()}
    specs |= {f"timm/{name}": _Spec(functools.partial(_timm, name), _image()) for name in TIMM}
    specs |= {
        f"timm/{name}": _Spec(functools.partial(_timm, name, img_size=size), _image(size))
        for name, size in TIMM_SIZED.items()
    }
    specs["timm/efficientformer_l1"] = _Spec(
        functools.partial(_timm, "efficientformer_l1"), _image(EFFICIENTFORMER_SIZE)
    )
    specs["timm/nf_resnet26_gains"] = _Spec(
        functools.partial(_nonzero_gains, "nf_resnet26"), _image()
    )
    specs |= {f"handmade/{name}": _Spec(cls, _image()) for name, cls in HANDMADE.items()}
    specs["handmade/two_input_net"] = _Spec(
        TwoInputNet, ((3, TWO_INPUT_SIZE, TWO_INPUT_SIZE), (TWO_INPUT_FEATURES,))
    )
    return specs


_SPECS = _specs()


def _make(name: str) -> tuple[nn.Module, Inputs]:
    spec = _SPECS[name]
    threads = torch.get_num_threads()
    # one thread: the running statistics are sums whose rounding follows the thread count, and a
    # factory must give the same weights to `bnexport onnx` and a `check` run with other threads
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_of(name))
            model = spec.build()
            stats = tuple(torch.randn(STATS_BATCH, *shape) for shape in spec.input_shapes)
            realistic_batchnorms(model, stats)
            example = tuple(torch.randn(EXAMPLE_BATCH, *shape) for shape in spec.input_shapes)
    finally:
        torch.set_num_threads(threads)
    return model, example


#: name → factory returning ``(model in eval mode, example inputs tuple)``; deterministic.
REAL_MODELS: dict[str, Factory] = {name: functools.partial(_make, name) for name in _SPECS}


def requirement(name: str) -> str | None:
    """The package a zoo model needs (``torchvision``, ``timm``), or None."""
    source = name.split("/", 1)[0]
    return source if source in ("torchvision", "timm") else None


def input_shapes(name: str) -> tuple[tuple[int, ...], ...]:
    """The shapes (without the batch dimension) of zoo model ``name``'s inputs."""
    return _SPECS[name].input_shapes
