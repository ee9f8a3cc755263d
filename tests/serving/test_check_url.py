"""`bnexport check --url`: the parity gate against a live endpoint — passes on `bnexport serve`
(HTTP and gRPC, one input and two inputs with a dict output), exits 1 on a parity fault in the
served file and on a server that mixes rows, reorders them or drops an output, exits 2 in one
line on a down server, a wrong name or metadata that does not fit, within the timeout."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fake_v2 import fake_server
from servers import Server, free_ports, start_server
from serving_models import with_parity_fault
from typer.testing import CliRunner
from url_checks import NET, assert_net_and_pair_pass, check

from bnexport.cli.app import app

runner = CliRunner()


@pytest.mark.parametrize("grpc", [False, True])
def test_passes_against_bnexport_serve(server: Server, tmp_path: Path, grpc: bool) -> None:
    assert_net_and_pair_pass(server.grpc_url if grpc else server.url, grpc, tmp_path / "p.json")


def test_a_parity_fault_in_the_served_file_exits_1(net_onnx: Path, tmp_path: Path) -> None:
    with_parity_fault(net_onnx, tmp_path / "bad.onnx")
    result = runner.invoke(
        app, ["package", str(tmp_path / "bad.onnx"), "-r", str(tmp_path / "r"), "--name", "net"]
    )
    assert result.exit_code == 0, result.output
    server = start_server(tmp_path / "r", tmp_path / "serve.log")
    try:
        result = check(server.url, "net", "--against", NET)
    finally:
        server.stop()
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.stdout


@pytest.mark.parametrize("mode", ["mix", "reverse", "drop"])
def test_a_server_that_mixes_reorders_or_drops_fails(net_onnx: Path, mode: str) -> None:
    with fake_server(net_onnx, "net", mode) as url:
        result = check(url, "net", "--against", NET)
    assert result.exit_code == 1, result.output
    if mode == "mix":  # each request alone is right only at batch 1
        assert "v2-http-mixed" in result.stdout


def test_down_server_wrong_name_and_bad_metadata_are_one_line(server: Server, net_onnx: Path):
    down = f"127.0.0.1:{free_ports(1)[0]}"
    with fake_server(net_onnx, "net", "shape") as fake:
        for url, name, message in (
            (down, "net", "no v2 server answers"),
            (server.url, "nope", "model 'nope' is not ready"),
            (fake, "net", "does not fit the reference: input 'input' is [-1, 3, 28, 28]"),
        ):
            start = time.monotonic()
            result = check(url, name, "--against", NET, "--timeout", "1")
            assert time.monotonic() - start < 10
            assert result.exit_code == 2, result.output
            lines = [ln for ln in result.output.splitlines() if ln.startswith("bnexport: error")]
            assert len(lines) == 1 and message in lines[0], result.output


def test_url_and_a_file_together_are_refused(net_onnx: Path) -> None:
    result = runner.invoke(
        app, ["check", str(net_onnx), "--url", "127.0.0.1:1", "--name", "n", "--against", NET]
    )
    assert result.exit_code == 2 and "not both" in result.output
    result = runner.invoke(app, ["check", "--url", "127.0.0.1:1", "--against", NET])
    assert result.exit_code == 2 and "needs --name" in result.output
