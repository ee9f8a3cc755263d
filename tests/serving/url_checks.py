"""`bnexport check --url` as the serving tests run it, against any v2 server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from bnexport.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
NET = str(ROOT / "models" / "net.pt")
PAIR = ["--model", "serving.serving_models:two_input_dict"]
PAIR += ["--input-shape", "3,8,8", "--input-shape", "4"]
FAST = ["--samples", "8", "--no-bundled", "--batch-sizes", "1,8"]
runner = CliRunner()


def check(url: str, name: str, *extra: str) -> Any:
    """``bnexport check --url URL --name NAME`` on a few samples (the CliRunner result)."""
    return runner.invoke(app, ["check", "--url", url, "--name", name, *FAST, *extra])


def assert_net_and_pair_pass(url: str, grpc: bool, report: Path) -> None:
    """The Net (with a JSON report: one plain and one mixed-size runner) and the two-input
    dict-output model both pass against ``url``."""
    flags = ["--grpc"] if grpc else []
    result = check(url, "net", "--against", NET, "--json", str(report), *flags)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    protocol = "grpc" if grpc else "http"
    assert [r["name"] for r in data["runners"]] == [f"v2-{protocol}", f"v2-{protocol}-mixed"]
    assert data["passed"] and "PASS" in result.stdout
    result = check(url, "pair", *PAIR, *flags)
    assert result.exit_code == 0, result.output
