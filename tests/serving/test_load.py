"""`bnexport load` against `bnexport serve` on loopback: perf_analyzer's CSV columns, raw
latencies in the JSON, no errors, a wrong name or a down server in one line within the timeout."""

from __future__ import annotations

import json
import time
from pathlib import Path

from servers import Server, free_ports
from typer.testing import CliRunner

from bnexport.cli.app import app
from bnexport.serving.load import CSV_COLUMNS

runner = CliRunner()
SHORT = ["--duration", "0.3", "--max-windows", "3"]


def test_load_reports_levels_in_perf_analyzer_columns(server: Server, tmp_path: Path) -> None:
    csv, report = tmp_path / "load.csv", tmp_path / "load.json"
    args = ["load", "--url", server.url, "--name", "net", "--concurrency", "1,4", *SHORT]
    result = runner.invoke(app, [*args, "--csv", str(csv), "--json", str(report)])
    assert result.exit_code == 0, result.output
    lines = csv.read_text().splitlines()
    assert lines[0].split(",") == list(CSV_COLUMNS)
    rows = [line.split(",") for line in lines[1:]]
    assert [r[0] for r in rows] == ["1", "4"] and all(float(r[1]) > 0 for r in rows)
    data = json.loads(report.read_text())
    for level in data["levels"]:
        assert level["errors"] == 0 and level["requests"] == len(level["latencies_s"])
        p = level["latency_s"]
        assert 0 < p["p50"] <= p["p90"] <= p["p95"] <= p["p99"]
        assert 0 <= level["client_cpu"] < 4
    assert "concurrency" in result.stdout and "infer/s" in result.stdout


def test_load_over_grpc(server: Server) -> None:
    args = ["load", "--url", server.grpc_url, "--grpc", "--name", "pair", "--concurrency", "2"]
    result = runner.invoke(app, [*args, "--batch-size", "3", *SHORT])
    assert result.exit_code == 0, result.output


def test_wrong_name_and_down_server_are_one_line_within_the_timeout(server: Server) -> None:
    down = f"127.0.0.1:{free_ports(1)[0]}"
    for url, name, message in (
        (server.url, "nope", "model 'nope' is not ready"),
        (down, "net", "no v2 server answers"),
    ):
        start = time.monotonic()
        result = runner.invoke(app, ["load", "--url", url, "--name", name, "--timeout", "1"])
        assert time.monotonic() - start < 5
        assert result.exit_code == 2
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
