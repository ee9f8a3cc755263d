#!/usr/bin/env bash
# The environment of the real Triton front end the serving tests check against: PyTriton 0.7.0
# (Triton 2.51, Python backend), onnxruntime, numpy < 2 (PyTriton answers HTTP 500 on every infer
# under numpy 2), apart from bnexport's own .venv (numpy 2). Pins: constraints-triton.txt.
# Idempotent: a venv built from the same pins and script is kept; another one is rebuilt. Two
# callers at once (make test's two workers) take turns on a lock.
# Usage: scripts/pytriton_env.sh [VENV]   (default .venv-triton; PYTHON picks the interpreter,
# which must be a shared-libpython build: Triton's Python-backend stub links its libpython)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${BNEXPORT_TRITON_VENV:-.venv-triton}}
PYTHON=${PYTHON:-python3}
PINS=constraints-triton.txt
stamp="$VENV/.bnexport-$(cat "$PINS" "$0" | sha256sum | cut -c1-16)"
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if [ -f "$stamp" ]; then
    exit 0
fi
start=$(date +%s)
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
if ! "$VENV/bin/python" -m pip install -q --no-input -c "$PINS" \
    nvidia-pytriton numpy onnxruntime 'tritonclient[grpc,http]' >"$VENV/pip.log" 2>&1; then
    grep -v "is ignored" "$VENV/pip.log" >&2
    echo "pytriton_env: pip could not install the pins of $PINS into $VENV" >&2
    exit 1
fi
"$VENV/bin/python" - <<'PY'
import numpy, onnxruntime, pytriton.triton  # noqa: F401  the server script's imports
from tritonclient.grpc import model_config_pb2  # noqa: F401
assert numpy.__version__.split(".")[0] == "1", f"PyTriton needs numpy < 2, got {numpy.__version__}"
PY
touch "$stamp"
echo "pytriton_env: built $VENV in $(( $(date +%s) - start )) s"
