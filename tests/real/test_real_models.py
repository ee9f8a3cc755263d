"""Real torchvision/timm models (marker ``real``): every BatchNorm accounted for by module path,
folded wherever it follows a layer (or a channel concat of layers), the folded module as accurate
as PyTorch's own fp32 forward, and bnexport's ONNX never heavier than torch's own export.

References are independent of bnexport: the BatchNorm modules are found by the zoo's own walk
(`batchnorm_modules`), the truth is a float64 forward of the original model, and the op counts to
beat come from ``torch.onnx.export(model, args, dynamo=True)`` of the unfolded model.
"""

from __future__ import annotations

import copy
import functools
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from real.zoo import REAL_MODELS, batchnorm_modules, requirement
from torch.utils._pytree import tree_leaves

from bnexport.export import export_onnx, quiet_exporter
from bnexport.fold import fold_model

pytestmark = pytest.mark.real

#: Ops that a BatchNorm (and a temperature or scale/shift chain) leaves behind when not fused.
COUNTED_OPS = ("BatchNormalization", "Mul", "Div", "Add", "Sub")

#: Models where some BatchNorm has no layer to fold into, and the only reasons allowed for them.
#: densenet121: BN after a concat that includes a pooled tensor, then ReLU, then conv;
#: resnetv2_50: pre-activation (BN → ReLU → conv, after a residual add or a pool); repvgg_a0: the
#: identity-branch BNs (their input is the previous block's ReLU); efficientformerv2_s0: the last
#: norm, followed by a mean over tokens.
PARTLY_FOLDABLE = {
    "torchvision/densenet121": {"nonlinearity", "no_adjacent_layer", "multi_user"},
    "timm/resnetv2_50": {"nonlinearity", "no_adjacent_layer"},
    "timm/repvgg_a0": {"no_adjacent_layer"},
    "timm/efficientformerv2_s0": {"no_adjacent_layer"},
}

#: Models on which bnexport's export pipeline itself keeps a few ops torch's own optimizer removes
#: (convnext_tiny: a Shape → Range index computation, 1 Mul and 3 Add more, with or without the
#: fold): for them the reference is bnexport's export of the unfolded model, so the check still
#: says the fold never adds ops.
EXPORTER_DIFFERS = {"torchvision/convnext_tiny"}

#: The folded fp32 module's error against the float64 truth may be this many times PyTorch fp32's
#: own error (plus a floor for outputs the fp32 model computes almost exactly).
ERROR_MULTIPLE = 4.0
ERROR_FLOOR = 1e-6

#: Output names of the models whose outputs are not a single tensor.
OUTPUT_NAMES = {
    "torchvision/deeplabv3_mobilenet_v3_large": ("out",),
    "handmade/two_input_net": ("logits", "embedding"),
}

_CALL = re.compile(r" \(call \d+ of \d+\)$")

#: One parameter per zoo model; a model's tests stay on one xdist worker (``--dist loadgroup``),
#: so it is built and folded once.
MODELS = [pytest.param(name, marks=pytest.mark.xdist_group(name)) for name in REAL_MODELS]


@functools.cache
def _model(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    return REAL_MODELS[name]()


@functools.cache
def _folded(name: str) -> Any:
    model, inputs = _model(name)
    return fold_model(model, inputs)


def _build(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], Any]:
    needs = requirement(name)
    if needs:
        pytest.importorskip(needs)
    model, inputs = _model(name)
    return model, inputs, _folded(name)


def _outputs(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t for t in tree_leaves(module(*inputs)) if isinstance(t, torch.Tensor)]


def _max_err(got: list[torch.Tensor], truth: list[torch.Tensor]) -> float:
    return max(
        float((g.double() - t).abs().max() / t.abs().max()) for g, t in zip(got, truth, strict=True)
    )


@pytest.mark.parametrize("name", MODELS)
def test_every_batchnorm_is_accounted_for_and_folded_where_it_can(name: str) -> None:
    model, _, result = _build(name)
    expected = {path for path, _ in batchnorm_modules(model)}
    reported = [_CALL.sub("", e.bn) for e in result.report.entries]
    assert set(reported) == expected, "BatchNorms missing from (or invented by) the report"
    assert not any(re.fullmatch(r"batch_norm(_\d+)?", n) for n in reported), "an FX node name"
    allowed = PARTLY_FOLDABLE.get(name, set())
    for entry in result.report.left:
        assert entry.reason_code in allowed, f"{entry.bn}: {entry.reason}"
        assert entry.reason
    if not allowed:
        assert result.report.left == []


@pytest.mark.parametrize("name", MODELS)
def test_folded_module_is_as_accurate_as_pytorch_fp32(name: str) -> None:
    model, inputs, result = _build(name)
    truth = _outputs(copy.deepcopy(model).double(), tuple(x.double() for x in inputs))
    fp32_err = _max_err(_outputs(model, inputs), truth)
    folded_err = _max_err(_outputs(result.module, inputs), truth)
    assert folded_err <= ERROR_MULTIPLE * fp32_err + ERROR_FLOOR, (folded_err, fp32_err)


def _torch_export_counts(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> Counter:
    with quiet_exporter():
        program = torch.onnx.export(model, inputs, dynamo=True, verbose=False)
    return Counter(node.op_type for node in program.model_proto.graph.node)


@pytest.mark.parametrize("name", MODELS)
def test_onnx_is_never_heavier_than_torch_export(name: str, tmp_path: Path) -> None:
    model, inputs, result = _build(name)
    exported = export_onnx(result.module, inputs, tmp_path / "m.onnx", fuse_batchnorm=True)
    ours = Counter(exported.op_counts)
    if name in EXPORTER_DIFFERS:  # the same pipeline on the unfolded model is the reference
        theirs = Counter(export_onnx(model, inputs, tmp_path / "plain.onnx").op_counts)
    else:
        theirs = _torch_export_counts(model, inputs)
    # A BatchNorm folded into a layer whose ONNX node takes no bias (a MatMul over tokens) leaves
    # its shift as one Add in place of the BatchNormalization node.
    swapped = max(theirs["BatchNormalization"] - ours["BatchNormalization"], 0)
    allowed = {op: theirs[op] + (swapped if op == "Add" else 0) for op in COUNTED_OPS}
    worse = {op: (ours[op], theirs[op]) for op in COUNTED_OPS if ours[op] > allowed[op]}
    assert not worse, f"bnexport vs the reference export: {worse}"
    if result.report.folded and not result.report.left:  # (weight standardization may call
        assert ours["BatchNormalization"] == 0  # batch_norm on weights: not a BatchNorm layer)
    names = OUTPUT_NAMES.get(name)
    if names is not None:
        assert exported.output_names == names
