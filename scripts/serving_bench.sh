#!/usr/bin/env bash
# Serving figures for docs/serving.md: `bnexport serve` on the shipped Net with the batching
# `package` writes and with batching off, in-process and with one worker process; `bnexport load`
# at concurrency 1 and 16 (HTTP JSON, batch-1 requests), then 10,000+ requests at concurrency 32
# with the server's memory before and after. Loopback only; every server is stopped.
# Usage: scripts/serving_bench.sh [OUT_DIR]   (needs the serve extra)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${1:-out/serving-bench}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
[ -f "$OUT/net.onnx" ] || "$BIN/bnexport" onnx models/net.pt -o "$OUT/net.onnx" --no-check >/dev/null
port=18480
serve() {  # repo workers → starts a server, sets PID
    "$BIN/bnexport" serve "$1" --port $port --grpc-port $((port + 1)) --metrics-port $((port + 2)) \
        --workers "$2" >"$OUT/serve.log" 2>&1 &
    PID=$!
    for _ in $(seq 1 100); do
        curl -sf "127.0.0.1:$port/v2/models/net/ready" >/dev/null && return; sleep 0.2
    done
    echo "server did not start"; cat "$OUT/serve.log"; exit 1
}
stop() { kill -TERM "$PID"; wait "$PID" || true; }
rss() {  # the server's resident memory in KiB, workers included
    local total=0
    for p in $PID $(pgrep -P "$PID" || true); do
        total=$((total + $(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
    done
    echo $total
}
for batching in 64 0; do
    "$BIN/bnexport" package "$OUT/net.onnx" -r "$OUT/repo-$batching" --name net \
        --max-batch-size "$batching" --force >/dev/null
    for workers in 0 1; do
        serve "$OUT/repo-$batching" "$workers"
        "$BIN/bnexport" load --url "127.0.0.1:$port" --name net --concurrency 1,16 \
            --duration 3 --max-windows 5 --json "$OUT/load-b$batching-w$workers.json" \
            2>/dev/null | sed "s/^/batching=$batching workers=$workers  /"
        stop
    done
done
serve "$OUT/repo-64" 1
before=$(rss)
"$BIN/bnexport" load --url "127.0.0.1:$port" --name net --concurrency 32 --duration 6 \
    --max-windows 3 --json "$OUT/soak.json" 2>/dev/null | sed "s/^/soak  /"
after=$(rss)
stop
python3 - "$OUT/soak.json" "$before" "$after" <<'PY'
import json, sys
level = json.load(open(sys.argv[1]))["levels"][0]
before, after = int(sys.argv[2]), int(sys.argv[3])
print(f"soak: {level['requests']} requests in the two counted windows, {level['errors']} errors; "
      f"server RSS {before} KiB before, {after} KiB after ({100 * (after - before) / before:+.1f} %)")
PY
