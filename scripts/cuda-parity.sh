#!/usr/bin/env bash
# The parity check on onnxruntime's CUDA provider, for a machine with an NVIDIA GPU (docs/cuda-parity.md).
# The shipped model exported twice (bnexport's folded file, and the unfolded one with its
# BatchNormalization and temperature Mul), each checked on the CPU and CUDA providers at three
# optimization levels, then the suite's CUDA tests. Needs bnexport installed with the `gpu` extra
# (onnxruntime-gpu in place of onnxruntime) and the `dev` extra; torch itself may be the CPU build.
# Usage: scripts/cuda-parity.sh [OUT_DIR]   (default out/cuda-parity; BIN picks the environment)
# Writes each check's JSON, Markdown and JUnit reports and cuda-parity.log (versions, GPU, date).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${1:-out/cuda-parity}
mkdir -p "$OUT"
{
  echo "## date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$BIN/python" -c "import sys, torch, onnx, numpy, onnxruntime as o; print('python', sys.version.split()[0], '| torch', torch.__version__, '| onnx', onnx.__version__, '| numpy', numpy.__version__, '| onnxruntime', o.__version__, o.get_available_providers())"
  "$BIN/python" -c "from bnexport.ort import probe_cuda; print(probe_cuda())"
  "$BIN/bnexport" onnx models/net.pt -o "$OUT/net-folded.onnx" --no-check
  "$BIN/bnexport" onnx models/net.pt -o "$OUT/net-unfolded.onnx" --no-fold --no-check
  status=0
  for m in net-folded net-unfolded; do
    echo "## bnexport check $m.onnx --against models/net.pt --providers cpu,cuda --opt-levels disabled,basic,all"
    "$BIN/bnexport" check "$OUT/$m.onnx" --against models/net.pt --providers cpu,cuda \
      --opt-levels disabled,basic,all --verbose --json "$OUT/$m.json" --markdown "$OUT/$m.md" \
      --junit "$OUT/$m.xml"
    rc=$?
    echo "exit $rc"
    [ "$rc" -eq 0 ] || status=1
  done
  echo "## pytest -m cuda"
  "$BIN/python" -m pytest -q -m cuda -p no:cacheprovider tests/parity/test_check_parity.py \
    tests/cli/test_check.py
  rc=$?
  echo "exit $rc"
  [ "$rc" -eq 0 ] || status=1
  exit "$status"
} 2>&1 | tee "$OUT/cuda-parity.log"
