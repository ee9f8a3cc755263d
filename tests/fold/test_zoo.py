"""The model zoo through `fold_model` and the ONNX export.

For every zoo model: the number of BNs folded / left with the right reason, the folded module
within ``1e-5 * max(1, max|ref|)`` of the unfolded float64 model, the input untouched, and no BN
still executed where all fold. The folded models are exported to ONNX: fully foldable ones hold
no BatchNormalization and none of the folded Mul/Div/Add/Sub, and onnxruntime matches float64.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from zoo import (
    ONNX_ARITH_OPS,
    REASON_WORDS,
    ZOO,
    Comparison,
    Snapshot,
    ZooCase,
    arith_calls,
    batchnorm_calls,
    compare,
    count_batchnorms,
    float64_reference,
    reference_output,
    traced_calls,
)

from bnexport.fold import fold_model


@dataclass
class Folded:
    """One zoo model folded once and checked against its float64 reference."""

    case: ZooCase
    model: nn.Module
    x: torch.Tensor
    ref_out: torch.Tensor
    result: Any
    calls: Counter[str]
    comparison: Comparison
    snapshot: Snapshot


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_CACHE: dict[str, Folded] = {}


def folded(case: ZooCase) -> Folded:
    """Fold ``case``'s model once per session (numerics, report and ONNX tests share it)."""
    if case.name not in _CACHE:
        model = case.build()
        x = case.example_input()
        ref_out = reference_output(float64_reference(model), x)
        snapshot = Snapshot.take(model, x)
        result = fold_model(model, (x,))
        out, calls = traced_calls(result.module, x)
        _CACHE[case.name] = Folded(
            case, model, x, ref_out, result, calls, compare(out, ref_out), snapshot
        )
    return _CACHE[case.name]


_IDS = [c.name for c in ZOO]


@pytest.mark.parametrize("case", ZOO, ids=_IDS)
def test_folded_module_matches_float64(case: ZooCase) -> None:
    """The folded module gives the original model's output (float64) within 1e-5 of scale."""
    f = folded(case)
    assert f.comparison.ok, f"{case.name}: {f.comparison}\n{f.result.report}"


@pytest.mark.parametrize("case", ZOO, ids=_IDS)
def test_input_model_untouched(case: ZooCase) -> None:
    """fold_model never modifies the model it is given (weights, modules, temperatures, output)."""
    f = folded(case)
    f.snapshot.assert_unchanged(f.model, f.x)


@pytest.mark.parametrize("case", ZOO, ids=_IDS)
def test_report_counts_and_reasons(case: ZooCase) -> None:
    """Every BN gets an entry: the expected number folded; the rest left with the right reason."""
    f = folded(case)
    report = f.result.report
    text = str(report)
    assert len(report.entries) == count_batchnorms(f.model), text
    assert len(report.folded) == case.folded, f"{case.name}: folded\n{text}"
    assert sorted(e.reason_code for e in report.left) == sorted(case.left_reasons), text
    for entry in report.folded:
        assert entry.into, f"{entry.bn}: folded into nothing?\n{text}"
    for entry in report.left:
        words = REASON_WORDS[entry.reason_code]
        assert any(w in entry.reason.lower() for w in words), f"{entry.bn}: {entry.reason!r}"
        assert entry.reason in text, f"str(report) does not show why {entry.bn} was left"
    data = json.loads(json.dumps(report.to_dict()))
    assert len(data["entries"]) == len(report.entries)


@pytest.mark.parametrize("case", ZOO, ids=_IDS)
def test_no_batchnorm_runs_after_folding(case: ZooCase) -> None:
    """BNs reported folded no longer execute; those left still do (once per call here)."""
    f = folded(case)
    assert batchnorm_calls(f.calls) == case.left, f"{case.name}: {dict(f.calls)}"


def test_shared_conv_both_calls_stay_correct() -> None:
    """pytorch#104593: folding the BN of one call must not rewrite the conv the other call uses."""
    f = folded(next(c for c in ZOO if c.name == "shared_conv_twice"))
    assert f.comparison.ok, f"shared conv: {f.comparison}"  # both calls feed this output
    (entry,) = f.result.report.folded
    assert entry.bn == "bn"
    kept = [
        t for t in f.result.module.state_dict().values() if t.shape == f.model.conv.weight.shape
    ]
    assert any(torch.equal(t, f.model.conv.weight) for t in kept), "unfolded call lost its weights"
    assert any(not torch.equal(t, f.model.conv.weight) for t in kept), (
        "no folded copy for the BN call"
    )


def test_seed_net_folds_temperature_into_conv() -> None:
    """The seed's Net with a negative temperature: one BN folded, its chain includes T."""
    f = folded(next(c for c in ZOO if c.name == "seed_net_negative_temperature"))
    (entry,) = f.result.report.entries
    assert entry.status == "folded"
    assert entry.into == "conv1"
    assert arith_calls(f.calls) == 0, f"temperature Mul still runs: {dict(f.calls)}"


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------


def export(module: nn.Module, x: torch.Tensor, path: Path) -> onnx.ModelProto:
    """Export with bnexport's exporter (BN fusion off, so the graph shows what folding did)."""
    from bnexport.export import export_onnx

    export_onnx(module, x, path)
    return onnx.load(str(path))


def ort_run(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    return out


_ONNX = [c for c in ZOO if c.onnx_arith is not None]


@pytest.mark.parametrize("case", _ONNX, ids=[c.name for c in _ONNX])
def test_onnx_export_of_folded_model(case: ZooCase, tmp_path: Path) -> None:
    """Exported folded graph: no BN and no folded arithmetic left; onnxruntime ≈ float64."""
    f = folded(case)
    path = tmp_path / f"{case.name}.onnx"
    proto = export(f.result.module, f.x, path)
    ops = Counter(n.op_type for n in proto.graph.node)
    assert ops["BatchNormalization"] == 0, f"{case.name}: {dict(ops)}"
    left = {op: ops[op] for op in ONNX_ARITH_OPS if ops[op]}
    assert left == case.onnx_arith, f"{case.name}: Mul/Div/Add/Sub left {left}: {dict(ops)}"
    cmp_ = compare(torch.from_numpy(ort_run(path, f.x)), f.ref_out)
    assert cmp_.ok, f"{case.name}: onnxruntime vs float64: {cmp_}"
