"""Parity test helpers: a Net with temperature 1.5 and sane random BN statistics, its checkpoint,
its dynamo-exported ONNX (made once per test session and shared by tests/parity and
tests/cli/test_check.py), fault injection into that ONNX, and an independent float64 forward.

Import it as ``parity_helpers`` (tests/parity is on sys.path; tests/cli/test_check.py adds it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from bnexport.checkpoint import save_checkpoint
from bnexport.data import FASHION_MNIST_NORMALIZE
from bnexport.nets import Net
from bnexport.ort import probe_cuda

TEMPERATURE = 1.5


def make_net(seed: int = 0, temperature: float = TEMPERATURE) -> Net:
    """The seed Net with random conv/fc weights and non-trivial BN stats (eval mode)."""
    torch.manual_seed(seed)
    net = Net(temperature=temperature)
    gen = torch.Generator().manual_seed(seed + 1)
    bn = net.bn1.bn
    with torch.no_grad():
        bn.weight.copy_(torch.rand(32, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(32, generator=gen) * 0.3)
        bn.running_mean.copy_(torch.randn(32, generator=gen) * 0.2)
        bn.running_var.copy_(torch.rand(32, generator=gen) + 0.3)
    return net.eval()


def net_f64(state: dict[str, torch.Tensor], x: np.ndarray, temperature: float) -> np.ndarray:
    """The Net in float64 from the raw state_dict (torch.nn.functional, not the code under test)."""
    sd = {k: v.double() for k, v in state.items()}
    y = F.conv2d(torch.from_numpy(x).double(), sd["conv1.weight"], padding=1)
    s = (1, -1, 1, 1)
    y = (y - sd["bn1.bn.running_mean"].view(s)) / torch.sqrt(
        sd["bn1.bn.running_var"].view(s) + 1e-5
    )
    y = torch.relu(temperature * (y * sd["bn1.bn.weight"].view(s) + sd["bn1.bn.bias"].view(s)))
    return (y.flatten(1) @ sd["fc1.weight"].T).numpy()


class HandFolded(torch.nn.Module):
    """Conv (with bias) → ReLU → fc: the Net with BN and temperature folded in float64 by hand:
    ``s = T·γ/√(σ²+ε)``, ``W' = W·s``, ``b' = T·β − μ·s`` (``eps``: the ε used, 1e-5 is the
    Net's own; scripts/parity_separation.py folds with 0 for its no-eps fault)."""

    def __init__(self, net: Net, eps: float = 1e-5) -> None:
        super().__init__()
        sd = {k: v.double() for k, v in net.state_dict().items()}
        t = net.bn1.temperature
        s = t * sd["bn1.bn.weight"] / torch.sqrt(sd["bn1.bn.running_var"] + eps)
        self.conv = torch.nn.Conv2d(1, 32, 3, padding=1, bias=True)
        self.fc = torch.nn.Linear(32 * 28 * 28, 10, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_((sd["conv1.weight"] * s.view(-1, 1, 1, 1)).float())
            self.conv.bias.copy_((t * sd["bn1.bn.bias"] - sd["bn1.bn.running_mean"] * s).float())
            self.fc.weight.copy_(sd["fc1.weight"].float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def export(model: torch.nn.Module, path: Path, example: torch.Tensor | None = None) -> Path:
    """torch.onnx.export(dynamo=True) with a dynamic batch, input 'input', output 'logits'."""
    example = torch.randn(2, 1, 28, 28) if example is None else example
    program = torch.onnx.export(
        model,
        (example,),
        None,
        dynamo=True,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    program.save(str(path))
    return path


_ARTIFACTS: dict[str, Path] = {}


def artifacts(base: Path) -> dict[str, Path]:
    """The checkpoint and ONNX export of ``make_net()``, written once under ``base``."""
    if not _ARTIFACTS:
        folder = base / "parity-artifacts"
        folder.mkdir(parents=True, exist_ok=True)
        model = make_net()
        ckpt = folder / "net.pt"
        save_checkpoint(ckpt, model, normalize=FASHION_MNIST_NORMALIZE, metadata={"test": True})
        _ARTIFACTS["checkpoint"] = ckpt
        _ARTIFACTS["onnx"] = export(model, folder / "net.onnx")
    return _ARTIFACTS


@pytest.fixture(scope="session")
def net() -> Net:
    return make_net()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return artifacts(tmp_path_factory.getbasetemp())["checkpoint"]


@pytest.fixture(scope="session")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Net exported by the dynamo exporter (it keeps the temperature as a Mul node)."""
    return artifacts(tmp_path_factory.getbasetemp())["onnx"]


# ---- fault injection (edits initializers and nodes with onnx) ------------------------------------


def _init(model: onnx.ModelProto, name: str) -> tuple[int, np.ndarray]:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            return i, numpy_helper.to_array(t).copy()
    raise KeyError(name)


def _set_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    i, _ = _init(model, name)
    model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def _conv(model: onnx.ModelProto) -> onnx.NodeProto:
    (conv,) = [n for n in model.graph.node if n.op_type == "Conv"]
    return conv


def fault_bias_channel(model: onnx.ModelProto) -> None:
    """One conv-bias channel off by 0.05."""
    conv = _conv(model)
    assert len(conv.input) == 3, "the exported conv has a bias"
    _, b = _init(model, conv.input[2])
    b[5] += 0.05
    _set_init(model, conv.input[2], b)


def fault_drop_temperature(model: onnx.ModelProto) -> None:
    """Remove the Mul by the temperature (its consumer reads the conv output directly)."""
    (mul,) = [n for n in model.graph.node if n.op_type == "Mul"]
    consts = [i for i in mul.input if any(t.name == i for t in model.graph.initializer)]
    (const,) = consts
    assert float(_init(model, const)[1]) == pytest.approx(TEMPERATURE)
    (data,) = [i for i in mul.input if i != const]
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name == mul.output[0]:
                node.input[k] = data
    model.graph.node.remove(mul)


def fault_transpose_kernel(model: onnx.ModelProto) -> None:
    """The 3×3 conv kernels transposed spatially (W[o, i, h, w] → W[o, i, w, h])."""
    name = _conv(model).input[1]
    _, w = _init(model, name)
    _set_init(model, name, w.transpose(0, 1, 3, 2))


def fault_nan_weight(model: onnx.ModelProto) -> None:
    """One NaN in the conv weights."""
    name = _conv(model).input[1]
    _, w = _init(model, name)
    w[3, 0, 1, 1] = np.nan
    _set_init(model, name, w)


FAULTS = {
    "bias-channel": fault_bias_channel,
    "temperature-dropped": fault_drop_temperature,
    "kernel-transposed": fault_transpose_kernel,
    "nan-weight": fault_nan_weight,
}


def inject(src: Path, dst: Path, fault: str) -> Path:
    model = onnx.load(str(src))
    FAULTS[fault](model)
    onnx.save(model, str(dst))
    return dst


cuda = pytest.mark.cuda


def cuda_or_skip() -> None:
    probe = probe_cuda()
    if not probe.available:
        pytest.skip(f"onnxruntime CUDA provider does not run here: {probe.reason}")
