#!/usr/bin/env bash
# CUDA parity run for the accelerator machine (see shared/docs/gpu-checks.md and docs/cuda-parity.md).
# Expects onnxruntime-gpu unpacked in /tmp/site and, in .gpu/assets/, net.pt (a checkpoint), net.onnx
# (its dynamo export, temperature kept as a Mul) and net-folded.onnx (bnexport fold + export).
# Writes JSON/Markdown/JUnit reports and a log under $OUT (default /tmp/out).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
R=$PWD
A=$R/.gpu/assets
# bnexport.cli lives in cli/ (setuptools package-dir): lay out an importable copy, run from there.
rm -rf /tmp/shim && mkdir -p /tmp/shim/bnexport && cp -r bnexport/. /tmp/shim/bnexport/ \
  && cp -r cli /tmp/shim/bnexport/cli
cd /tmp/shim || exit 1
export PYTHONPATH=/tmp/site:/tmp/shim${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
{
  echo "## date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python3 -c "import sys, torch, onnx, numpy, onnxruntime as o, bnexport.cli.app as a; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| onnx', onnx.__version__, '| numpy', numpy.__version__, '| onnxruntime', o.__version__, o.__file__, o.get_available_providers(), '| bnexport from', a.__file__)"
  python3 -c "from bnexport.ort import probe_cuda; print(probe_cuda())"
  for m in net net-folded; do
    echo "## bnexport check $m.onnx --against net.pt --providers cpu,cuda --opt-levels disabled,basic,all"
    /usr/bin/time -f "wall %e s" python3 -m bnexport check "$A/$m.onnx" --against "$A/net.pt" \
      --providers cpu,cuda --opt-levels disabled,basic,all --json "$OUT/$m.json" \
      --markdown "$OUT/$m.md" --junit "$OUT/$m.xml"
    echo "exit $?"
  done
  echo "## pytest -m cuda"
  python3 -m pytest -q -m cuda -p no:cacheprovider "$R/tests/parity/test_check_parity.py" \
    "$R/tests/cli/test_check.py"
  echo "exit $?"
} 2>&1 | tee "$OUT/cuda-parity.log"
