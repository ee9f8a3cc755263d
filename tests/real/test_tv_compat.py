"""The torchvision shim (`tv_compat`): torchvision imports on this torch, a matching build is left
alone, and torchvision's ops still refuse to run without their kernels.

Operator registrations are process-wide, so each case runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.real]

TESTS = Path(__file__).resolve().parents[1]


def _run(code: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=TESTS,
        env={**os.environ, "PYTHONPATH": str(TESTS)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_torchvision_imports_and_runs_a_model() -> None:
    pytest.importorskip("torchvision")
    out = _run(
        """
        import json, torch
        from real.tv_compat import ensure_torchvision_ops
        ops = ensure_torchvision_ops()
        import torchvision
        model = torchvision.models.resnet18(num_classes=7).eval()
        with torch.no_grad():
            shape = list(model(torch.randn(2, 3, 64, 64)).shape)
        try:
            torchvision.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)
            nms = "ran"
        except RuntimeError as exc:
            nms = str(exc)
        print(json.dumps({
            "stubbed": list(ops.stubbed),
            "has_ops": torchvision.extension._has_ops(),
            "shape": shape,
            "nms": nms,
            "again": ensure_torchvision_ops() is ops,
        }))
        """
    )
    assert out["shape"] == [2, 7]
    assert out["again"]
    if out["stubbed"]:  # a torchvision built for another torch: its ops stay unavailable, loudly
        assert out["stubbed"] == ["nms", "qnms"]
        assert not out["has_ops"]
        assert out["nms"].startswith("Couldn't load custom C++ ops")
    else:  # a matching build: its own ops, untouched
        assert out["has_ops"]
        assert out["nms"] == "ran"


def test_registered_ops_are_left_alone() -> None:
    """A build whose ops exist (simulated: defined with a kernel first) gets nothing redefined."""
    pytest.importorskip("torchvision")
    out = _run(
        """
        import json, torch
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for name in ("nms", "qnms"):
            lib.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.impl(name, lambda dets, scores, iou: torch.arange(3), "CPU")
        from real.tv_compat import ensure_torchvision_ops
        ops = ensure_torchvision_ops()
        kept = torch.ops.torchvision.nms(torch.rand(3, 4), torch.rand(3), 0.5).tolist()
        print(json.dumps({"stubbed": list(ops.stubbed), "reason": ops.reason, "kept": kept}))
        """
    )
    assert out["stubbed"] == []
    assert out["reason"] == "the operators are already registered"
    assert out["kept"] == [0, 1, 2], "the registered kernel was replaced"
