"""`bnexport check --html`: one self-contained page, seen as a person sees it — headless Chromium
renders it to a PNG (not blank) and its text names the first failing layer.

Chromium is Debian's ``chromium`` (``.ci/run`` installs it). Without it the test is skipped here
and fails in CI (``CI=true``): the page must have been looked at."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper
from typer.testing import CliRunner

from bnexport.cli.app import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "models" / "net.pt"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return found


@pytest.fixture(scope="module")
def report_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HTML report of the shipped Net exported with one ReLU replaced by LeakyRelu(0.01)."""
    folder = tmp_path_factory.mktemp("html")
    good = folder / "net.onnx"
    result = runner.invoke(app, ["onnx", str(CHECKPOINT), "-o", str(good), "--no-check"])
    assert result.exit_code == 0, result.output
    proto = onnx.load(str(good))
    relu = next(n for n in proto.graph.node if n.op_type == "Relu")
    relu.op_type = "LeakyRelu"
    relu.attribute.append(helper.make_attribute("alpha", 0.01))
    bad = folder / "leaky.onnx"
    onnx.save(proto, str(bad))
    page = folder / "report.html"
    args = ["check", str(bad), "--against", str(CHECKPOINT), "--samples", "8", "--no-bundled"]
    result = runner.invoke(app, [*args, "--batch-sizes", "1", "--html", str(page)])
    assert result.exit_code == 1, result.output
    return page


def test_the_page_is_self_contained(report_page: Path) -> None:
    text = report_page.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert "<svg" in text and text.count("<figure>") >= 2  # the output and the layer profile
    # nothing is fetched at view time: no external script, style, image or font
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "<script" not in text
    for section in ("Outputs: error against budget", "Layers", "Worst samples", "Fold"):
        assert section in text
    assert "Machine and versions" in text and "onnxruntime" in text


def test_chromium_renders_it(report_page: Path, tmp_path: Path) -> None:
    """The PNG is not blank (many colours, a fair share of ink) and the DOM names the layer."""
    from PIL import Image

    chromium = _chromium()
    url = report_page.resolve().as_uri()
    png = tmp_path / "page.png"
    common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run(
        [*common, "--window-size=1100,1800", f"--screenshot={png}", url],
        check=True,
        capture_output=True,
        timeout=120,
    )
    image = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    assert image.shape[:2] == (1800, 1100)
    ink = (np.abs(image - 255).sum(axis=2) > 60).mean()
    colours = len(np.unique(image.reshape(-1, 3)[::7], axis=0))
    assert ink > 0.03 and colours > 50, (ink, colours)
    red = ((image[..., 0] > 150) & (image[..., 1] < 90) & (image[..., 2] < 90)).mean()
    assert red > 0.001  # the FAIL badge and the failing bars are drawn
    dom = subprocess.run(
        [*common, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    assert "First failing layer: <b>relu</b>" in dom
    assert "LeakyRelu node_relu" in dom
