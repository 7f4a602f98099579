#!/usr/bin/env bash
# The server load test of docs/BENCHMARKS.md ("Serving on one H200") in one device call: the HTTP server on the
# bench model under three loads (light, Poisson 64/s, bursts of 128), its /metrics after each, then the bursts
# submitted to the engine directly (--direct). Everything goes under $OUT (default ./out). Carry the HTTP packages as
# wheels in .whl (see BENCHMARKS; tools/serve_bench_common.sh installs them).
#   bash tools/gpu_serve_loadtest.sh [TAG] [extra server options, e.g. --decode-rows none]
# PY, PRESET, LAYERS, MAX_BATCH, MAX_SEQ_LEN and the loads (LIGHT, POISSON, BURSTS: tools/serve_bench_common.sh) may be set in the
# environment, e.g. for a smoke run on the CPU with the tiny preset.
set -u
OUT=${OUT:-out}; TAG=${1:-run}; shift || true
mkdir -p "$OUT"
source tools/serve_bench_common.sh
PORT=8800
summary() { $PY -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], json.dumps({k: d[k] for k in ('ok', 'errors', 'wall_s', 'throughput_tok_s', 'ttft_ms', 'itl_ms', 'tpot_ms', 'stall_ms')}))" "$1" "$2"; }

$BENCH_SERVER "$@" --port $PORT > "$OUT/server-$TAG.log" 2>&1 &
PID=$!
wait_healthy $PORT $PID "$OUT/server-$TAG.log" || exit 1
head -3 "$OUT/server-$TAG.log"
for load in light poisson bursts; do
  case $load in light) L=$LIGHT;; poisson) L=$POISSON;; bursts) L=$BURSTS;; esac
  $PY -m mixjax.bench.serve --url "http://127.0.0.1:$PORT" $L --json "$OUT/serve-$load-$TAG.json" \
    > "$OUT/client-$load-$TAG.txt" 2>&1
  summary "$OUT/serve-$load-$TAG.json" $load
  curl -s "http://127.0.0.1:$PORT/metrics" > "$OUT/metrics-$load-$TAG.txt"
done
kill $PID; wait $PID 2>/dev/null
echo "--- the engine alone (--direct): bursts, then light"
$BENCH_SERVER "$@" --direct "$BURSTS --json $OUT/serve-direct-bursts-$TAG.json" \
  --direct "$LIGHT --json $OUT/serve-direct-light-$TAG.json" > "$OUT/direct-$TAG.log" 2>&1
head -1 "$OUT/direct-$TAG.log"
summary "$OUT/serve-direct-bursts-$TAG.json" direct-bursts
summary "$OUT/serve-direct-light-$TAG.json" direct-light
if [ -n "${ALSO_ALL_ROWS:-}" ]; then
  echo "--- the engine alone, every call on all slots (--decode-rows none): light"
  $BENCH_SERVER "$@" --decode-rows none --direct "$LIGHT --json $OUT/serve-direct-light-allrows-$TAG.json" \
    > "$OUT/direct-allrows-$TAG.log" 2>&1
  head -1 "$OUT/direct-allrows-$TAG.log"
  summary "$OUT/serve-direct-light-allrows-$TAG.json" direct-light-all-rows
fi
