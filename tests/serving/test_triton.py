"""`bnexport check --url` against a real Triton front end: PyTriton 0.7.0 (Triton 2.51) serving the
repository `bnexport package` wrote, each model in onnxruntime with the dynamic batching its
``config.pbtxt`` declares (`scripts/pytriton_server.py`).

PyTriton needs numpy < 2, so it runs in an environment of its own that `scripts/pytriton_env.sh`
builds (idempotent; .ci/run builds it first). A machine that cannot build it fails these tests;
they skip only when ``BNEXPORT_NO_PYTRITON=1`` says PyTriton is intentionally absent, and never
in CI (``CI=true``).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from servers import Server, start_pytriton
from serving_models import with_parity_fault
from typer.testing import CliRunner
from url_checks import NET, assert_net_and_pair_pass, check

from bnexport.cli.app import app

pytestmark = pytest.mark.xdist_group("pytriton")  # one worker builds and starts it

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("BNEXPORT_TRITON_VENV", ROOT / ".venv-triton"))
ABSENT_VAR = "BNEXPORT_NO_PYTRITON"
ENV_BUILD_TIMEOUT_S = 900
runner = CliRunner()


@pytest.fixture(scope="module")
def pytriton_python() -> Path:
    """The PyTriton environment's interpreter, built if needed (fails, never skips, in CI)."""
    in_ci = os.environ.get("CI") == "true"
    if os.environ.get(ABSENT_VAR) == "1" and not in_ci:
        pytest.skip(f"{ABSENT_VAR}=1: PyTriton is intentionally absent here")
    script = ROOT / "scripts" / "pytriton_env.sh"
    try:
        built = subprocess.run(
            ["bash", str(script), str(VENV)],
            capture_output=True,
            text=True,
            timeout=ENV_BUILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script} did not finish in {ENV_BUILD_TIMEOUT_S} s")
    if built.returncode != 0:
        pytest.fail(
            f"{script} failed ({built.returncode}), so the real-Triton tests cannot run; set "
            f"{ABSENT_VAR}=1 to skip them outside CI.\n{built.stdout[-3000:]}{built.stderr[-3000:]}"
        )
    return VENV / "bin" / "python"


@pytest.fixture(scope="module")
def triton(pytriton_python: Path, repo: Path, tmp_path_factory: pytest.TempPathFactory):
    """PyTriton serving the repository of the Net and the two-input dict-output model."""
    with serving(pytriton_python, repo, tmp_path_factory.mktemp("triton") / "triton.log") as server:
        yield server


@contextmanager
def serving(python: Path, repository: Path, log: Path) -> Iterator[Server]:
    """PyTriton on ``repository`` while the block runs; it must stop cleanly on SIGTERM."""
    server = start_pytriton(python, repository, log)
    try:
        yield server
    except BaseException:
        server.stop()
        raise
    assert server.stop() == 0, log.read_text()


@pytest.mark.parametrize("grpc", [False, True])
def test_check_url_passes_against_triton(triton: Server, tmp_path: Path, grpc: bool) -> None:
    assert_net_and_pair_pass(triton.grpc_url if grpc else triton.url, grpc, tmp_path / "p.json")


def test_a_parity_fault_served_by_triton_exits_1(
    pytriton_python: Path, net_onnx: Path, tmp_path: Path
) -> None:
    bad = with_parity_fault(net_onnx, tmp_path / "bad.onnx")
    packaged = runner.invoke(app, ["package", str(bad), "-r", str(tmp_path / "r"), "--name", "net"])
    assert packaged.exit_code == 0, packaged.output
    with serving(pytriton_python, tmp_path / "r", tmp_path / "triton.log") as server:
        result = check(server.url, "net", "--against", NET)
    assert result.exit_code == 1, result.output
    assert "FAIL: v2-http" in result.stdout
