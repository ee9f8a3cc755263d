"""Zoo models as ``--model`` factories (``real.cli_models:resnet18``): each call builds the same
seeded model, as a user's seeded factory would. Any zoo model is reachable with ``/`` written as
``__`` (``real.cli_models:timm__efficientnet_b0``)."""

from __future__ import annotations

from real.zoo import REAL_MODELS
from torch import nn

#: factory name → zoo model, and each factory's ``--input-shape`` options.
MODELS = {
    "resnet18": "torchvision/resnet18",
    "mobilenet_v2": "torchvision/mobilenet_v2",
    "shufflenet_v2_x1_0": "torchvision/shufflenet_v2_x1_0",
    "two_input_net": "handmade/two_input_net",
    "conv_gap": "handmade/conv_gap",  # its floor is raised by summation order
}
INPUT_SHAPES = {
    "two_input_net": ["--input-shape", "3,32,32", "--input-shape", "8"],
}
DEFAULT_SHAPE = ["--input-shape", "3,64,64"]


def attribute(zoo_name: str) -> str:
    """The factory's attribute name for a zoo model (``timm/x`` → ``timm__x``)."""
    return zoo_name.replace("/", "__")


def __getattr__(name: str) -> object:
    """A factory for a short name of `MODELS` or any zoo model's `attribute` name."""
    zoo_name = MODELS.get(name, name.replace("__", "/", 1))
    if zoo_name not in REAL_MODELS:
        raise AttributeError(name)

    def factory() -> nn.Module:
        return REAL_MODELS[zoo_name]()[0]

    return factory
