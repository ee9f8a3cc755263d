"""Localization on real models (marker ``real``): a representative subset of the acceptance set
(`real.localize_faults`; the whole set is ``scripts/localize_faults.py``, its result in
docs/parity.md). Each fault's first failing layer is the injected module or its fold chain; a
correct export reports no failing layer."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from real.localize_faults import (
    Fault,
    Prepared,
    conv_faults,
    eps_faults,
    node_faults,
    prepare,
)

pytestmark = pytest.mark.real

CASES = [
    ("torchvision/resnet18", "channel", "middle"),
    ("torchvision/resnet18", "eps", "early"),
    ("torchvision/mobilenet_v3_small", "node", "middle"),
    ("torchvision/mobilenet_v3_small", "bias", "late"),
    ("timm/rexnet_100", "channel", "early"),
]


@functools.cache
def _prepared(name: str, folder: Path) -> Prepared:
    return prepare(name, folder)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("localize")


def _fault(prep: Prepared, kind: str, position: str) -> Fault:
    if kind in ("channel", "bias"):
        faults = conv_faults(prep, (position,), (kind,))
    elif kind == "node":
        faults = node_faults(prep, (position,))
    else:
        faults = eps_faults(prep, (position,))
    return faults[0]


@pytest.mark.parametrize(
    ("name", "kind", "position"),
    [pytest.param(*case, marks=pytest.mark.xdist_group(case[0])) for case in CASES],
)
def test_the_injected_layer_is_found(name: str, kind: str, position: str, folder: Path) -> None:
    prep = _prepared(name, folder)
    fault = _fault(prep, kind, position)
    report = prep.check(fault.data)
    fault.judge(report)
    assert fault.result["hit"], (fault.detail, fault.expected, fault.result)
    assert not report.passed  # calibrated to fail the gate (channel, bias) or far beyond it
    loc = report.layers
    assert loc.first_failing.layer.nodes  # the ONNX node(s) are named
    if loc.strategy == "bisect":
        assert loc.sessions <= 4 and len(loc.results) < len(loc.layer_map.layers)


@pytest.mark.xdist_group("torchvision/resnet18")
def test_a_correct_export_has_no_failing_layer(folder: Path) -> None:
    """Every layer of the correct folded export is within its budget, and as check runs it."""
    prep = _prepared("torchvision/resnet18", folder)
    for strategy in ("all", "auto"):
        report = prep.check(prep.folded, strategy=strategy)
        assert report.passed
        assert report.layers.first_failing is None, [
            (r.layer.key, r.comparison.noise_ratio) for r in report.layers.results if not r.passed
        ]
    assert len(report.layers.layer_map.layers) > 32  # so "auto" bisected
