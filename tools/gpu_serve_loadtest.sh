#!/usr/bin/env bash
# The server load test of docs/BENCHMARKS.md ("Serving on one H200") in one device call: the HTTP server on the
# bench model under three loads (light, Poisson 64/s, bursts of 128), its /metrics after each, then the bursts
# submitted to the engine directly (--direct). Everything goes under $OUT (default ./out). The GPU image lacks the
# HTTP packages: carry them as wheels in .whl (see BENCHMARKS), this script installs them into /tmp/site.
#   bash tools/gpu_serve_loadtest.sh [TAG] [extra server options, e.g. --decode-rows none]
# PY, PRESET, LAYERS, MAX_BATCH, MAX_SEQ_LEN and the loads (LIGHT, POISSON, BURSTS: bench.serve options) may be set in the
# environment, e.g. for a smoke run on the CPU with the tiny preset.
set -u
OUT=${OUT:-out}; TAG=${1:-run}; shift || true
mkdir -p "$OUT"
if ! ${PY:-python3} -c "import fastapi, uvicorn" 2>/dev/null; then
  ${PY:-python3} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
PORT=8800; PY=${PY:-python3}
SERVER="$PY tools/serve_bench_model.py --preset ${PRESET:-qwen3-30b-a3b} --layers ${LAYERS:-4} --max-batch ${MAX_BATCH:-128} \
  --max-seq-len ${MAX_SEQ_LEN:-4096} --max-queue 1024 --dtype bfloat16"
LIGHT=${LIGHT:-"--requests 32 --rate 2 --prompt-len 512:2048 --output-len 64:128 --vocab-hi 150000"}
POISSON=${POISSON:-"--requests 512 --rate 64 --prompt-len 128:1024 --output-len 128:256 --vocab-hi 150000"}
BURSTS=${BURSTS:-"--requests 384 --arrival bursty --burst 128 --rate 128 --prompt-len 128:512 --output-len 256:256 --vocab-hi 150000"}
summary() { $PY -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], json.dumps({k: d[k] for k in ('ok', 'errors', 'wall_s', 'throughput_tok_s', 'ttft_ms', 'itl_ms')}))" "$1" "$2"; }

$SERVER "$@" --port $PORT > "$OUT/server-$TAG.log" 2>&1 &
PID=$!
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $PID 2>/dev/null || { echo "server died"; tail -30 "$OUT/server-$TAG.log"; exit 1; }
  sleep 1
done
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
$SERVER "$@" --direct "$BURSTS --json $OUT/serve-direct-bursts-$TAG.json" \
  --direct "$LIGHT --json $OUT/serve-direct-light-$TAG.json" > "$OUT/direct-$TAG.log" 2>&1
head -1 "$OUT/direct-$TAG.log"
summary "$OUT/serve-direct-bursts-$TAG.json" direct-bursts
summary "$OUT/serve-direct-light-$TAG.json" direct-light
if [ -n "${ALSO_ALL_ROWS:-}" ]; then
  echo "--- the engine alone, every call on all slots (--decode-rows none): light"
  $SERVER "$@" --decode-rows none --direct "$LIGHT --json $OUT/serve-direct-light-allrows-$TAG.json" \
    > "$OUT/direct-allrows-$TAG.log" 2>&1
  head -1 "$OUT/direct-allrows-$TAG.log"
  summary "$OUT/serve-direct-light-allrows-$TAG.json" direct-light-all-rows
fi
