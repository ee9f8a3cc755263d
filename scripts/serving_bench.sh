#!/usr/bin/env bash
# Serving figures for docs/serving.md, side by side on this machine, same client, same protocol
# (`bnexport load`: tritonclient's asyncio client, HTTP JSON, batch-1 requests):
#   1. `bnexport serve` (the batching `package` writes), the same with batching off, and PyTriton
#      (a real Triton 2.51 front end) on the same file with the same batching, all three up at
#      once and loaded in turn, ROUNDS rounds (alternating), concurrency 1 and 16;
#   2. 10,000 requests at concurrency 32 on a fresh `bnexport serve`: errors, and the server's
#      memory after the first and the last thousand (scripts/serving_soak.py);
#   3. a file tuned for batch 1 (`bnexport tune`) opened by bnexport's session factory against
#      onnxruntime's defaults on torch's own export, at batch 1 (`bnexport bench --tuned`).
# Loopback only; every server is stopped. Usage: scripts/serving_bench.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${1:-out/serving-bench}
ROUNDS=${ROUNDS:-5}
export OMP_NUM_THREADS=1
scripts/pytriton_env.sh
TRITON_PY=${TRITON_PY:-.venv-triton/bin/python}
mkdir -p "$OUT"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) ($(getconf _NPROCESSORS_ONLN) CPUs)"
"$BIN/bnexport" onnx models/net.pt -o "$OUT/net.onnx" --no-check >/dev/null
for batching in 64 0; do
    "$BIN/bnexport" package "$OUT/net.onnx" -r "$OUT/repo-$batching" --name net \
        --max-batch-size "$batching" --force >/dev/null
done
PIDS=()
stop_all() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait || true; }
trap stop_all EXIT
ready() {  # port name log
    for _ in $(seq 1 300); do
        curl -sf "127.0.0.1:$1/v2/models/net/ready" >/dev/null && return
        sleep 0.2
    done
    echo "$2 did not start:"; cat "$3"; exit 1
}
serve() {  # name repo port → a bnexport serve in the background
    "$BIN/bnexport" serve "$2" --port "$3" --grpc-port $(($3 + 1)) --metrics-port $(($3 + 2)) \
        >"$OUT/$1.log" 2>&1 &
    PIDS+=($!)
    ready "$3" "$1" "$OUT/$1.log"
}
serve serve "$OUT/repo-64" 18480
serve serve-nobatch "$OUT/repo-0" 18490
"$TRITON_PY" scripts/pytriton_server.py "$OUT/repo-64" --http-port 18500 --grpc-port 18501 \
    --metrics-port 18502 >"$OUT/pytriton.log" 2>&1 &
PIDS+=($!)
ready 18500 pytriton "$OUT/pytriton.log"
cpu() {  # CPU seconds of a process and its descendants
    "$BIN/python" -c 'import sys; sys.path.insert(0, "scripts"); import serving_soak as s
print(s.cpu_seconds(int(sys.argv[1])))' "$1"
}
declare -A PID_OF=([serve]=${PIDS[0]} [serve-nobatch]=${PIDS[1]} [pytriton]=${PIDS[2]})
for round in $(seq 1 "$ROUNDS"); do
    for target in serve:18480 pytriton:18500 serve-nobatch:18490; do
        name=${target%:*}
        c0=$(cpu "${PID_OF[$name]}"); t0=$(date +%s.%N)
        "$BIN/bnexport" load --url "127.0.0.1:${target#*:}" --name net --concurrency 1,16 \
            --duration 3 --max-windows 5 --json "$OUT/load-$name-$round.json" \
            >/dev/null 2>&1 || echo "round $round $name: errors (see its JSON)"
        echo "$(cpu "${PID_OF[$name]}") $c0 $(date +%s.%N) $t0" >"$OUT/cpu-$name-$round.txt"
    done
done
stop_all
PIDS=()
"$BIN/python" - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def levels(target):
    runs = [json.load(open(f"{out}/load-{target}-{r}.json"))["levels"] for r in range(1, rounds + 1)]
    return {c: [next(lv for lv in run if lv["concurrency"] == c) for run in runs] for c in (1, 16)}
rows = {t: levels(t) for t in ("serve", "pytriton", "serve-nobatch")}
med = statistics.median
print(f"{'server (HTTP JSON, batch 1)':32s} {'c=1 req/s':>10s} {'c=1 p50 ms':>11s} "
      f"{'c=16 req/s':>11s} {'c=16 p50 ms':>12s}  (median of {rounds} alternating rounds)")
fig = {}
for t, lv in rows.items():
    fig[t] = (med(x["throughput_infer_per_s"] for x in lv[1]), med(x["latency_s"]["p50"] for x in lv[1]) * 1e3,
              med(x["throughput_infer_per_s"] for x in lv[16]), med(x["latency_s"]["p50"] for x in lv[16]) * 1e3)
    per_round = ", ".join(f"{x['throughput_infer_per_s']:.0f}" for x in lv[16])
    print(f"{t:32s} {fig[t][0]:10.0f} {fig[t][1]:11.2f} {fig[t][2]:11.0f} {fig[t][3]:12.2f}  "
          f"(c=16 rounds: {per_round})")
for t in rows:  # the server's CPU over each load run (warm-up included), per request answered
    use = []
    for r in range(1, rounds + 1):
        c1, c0, t1, t0 = map(float, open(f"{out}/cpu-{t}-{r}.txt").read().split())
        runs = json.load(open(f"{out}/load-{t}-{r}.json"))["levels"]
        rate = sum(x["throughput_infer_per_s"] * x["seconds"] for x in runs) / sum(x["seconds"] for x in runs)
        use.append(((c1 - c0) / (t1 - t0), (c1 - c0) / (t1 - t0) / rate * 1e3))
    print(f"{t:32s} server CPU {med(u for u, _ in use):.2f} cores while loaded, "
          f"~{med(m for _, m in use):.2f} CPU-ms a request (median of {rounds})")
s, p, n = fig["serve"], fig["pytriton"], fig["serve-nobatch"]
print(f"serve / PyTriton throughput at 16: {s[2] / p[2]:.2f}x (target >= 1.0)")
print(f"serve / PyTriton p50 at 1: {s[1] / p[1]:.2f}x (target <= 1.2)")
print(f"batching as packaged / batching off at 16: {s[2] / n[2]:.2f}x (target >= 1.0)")
PY
serve soak "$OUT/repo-64" 18480
"$BIN/python" scripts/serving_soak.py --url 127.0.0.1:18480 --name net --pid "${PIDS[0]}" \
    --json "$OUT/soak.json" || true
stop_all
PIDS=()
"$BIN/bnexport" tune "$OUT/net.onnx" -o "$OUT/net.tuned.onnx" --batch-size 1 >"$OUT/tune.log" 2>&1
grep "^picked" "$OUT/tune.log"
"$BIN/bnexport" bench models/net.pt --onnx "$OUT/net.onnx" --tuned "$OUT/net.tuned.onnx" \
    --batch-sizes 1 --json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
"$BIN/python" - "$OUT/bench.json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
for c in data["comparisons"]:
    r = c["ratio"]
    print(f"batch {c['batch_size']}: {c['candidate']} vs {c['reference']} (onnxruntime defaults on "
          f"torch's export): {r['median']:.2f}x [{r['p10']:.2f}-{r['p90']:.2f}] (target >= 1.15)")
PY
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
