#!/usr/bin/env bash
# A/B of server options on one GPU: one bench-model server per variant, side by side (each gets 0.9/N of the GPU's
# memory), then ROUNDS rounds of one load (default: the bursts of tools/gpu_serve_loadtest.sh) sent to each server in
# turn, so that drifts of the machine fall on every variant alike. Prints one line per run: variant, round,
# tokens/s, TTFT p50 / p90 / p99 ms. Everything goes under $OUT (default ./out).
#   bash tools/gpu_serve_ab.sh ROUNDS "NAME=server options" "NAME=server options" ...
#   e.g. bash tools/gpu_serve_ab.sh 4 "default=" "gil1=--gil-switch-ms 1"
# PY, PRESET, LAYERS, MAX_BATCH, MAX_SEQ_LEN and LOADS ("name:bench.serve options", several separated by ";", each
# sent ROUNDS rounds in the order given) may be set in the environment.
set -u
OUT=${OUT:-out}; ROUNDS=$1; shift
mkdir -p "$OUT"
if ! ${PY:-python3} -c "import fastapi, uvicorn" 2>/dev/null; then
  ${PY:-python3} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
PY=${PY:-python3}
LOADS=${LOADS:-"bursts:--requests 384 --arrival bursty --burst 128 --rate 128 --prompt-len 128:512 --output-len 256:256 --vocab-hi 150000"}
FRACTION=$($PY -c "print(round(0.9 / $#, 3))")
names=(); pids=()
i=0
for variant in "$@"; do
  name=${variant%%=*}; opts=${variant#*=}
  XLA_PYTHON_CLIENT_MEM_FRACTION=$FRACTION $PY tools/serve_bench_model.py --preset ${PRESET:-qwen3-30b-a3b} \
    --layers ${LAYERS:-4} --max-batch ${MAX_BATCH:-128} --max-seq-len ${MAX_SEQ_LEN:-4096} --max-queue 1024 \
    --dtype bfloat16 --port $((8800 + i)) $opts > "$OUT/server-$name.log" 2>&1 &
  names+=("$name"); pids+=($!); i=$((i + 1))
done
for i in "${!names[@]}"; do
  for _ in $(seq 900); do
    curl -sf "http://127.0.0.1:$((8800 + i))/health" > /dev/null && break
    kill -0 ${pids[$i]} 2>/dev/null || { echo "server ${names[$i]} died"; tail -30 "$OUT/server-${names[$i]}.log"; exit 1; }
    sleep 1
  done
  head -2 "$OUT/server-${names[$i]}.log"
done
IFS=';' read -ra loads <<< "$LOADS"
for load in "${loads[@]}"; do
  lname=${load%%:*}; lopts=${load#*:}
  echo "# $lname ($lopts): variant round tokens/s TTFT-p50 p90 p99 (ms)"
  for round in $(seq "$ROUNDS"); do
    for i in "${!names[@]}"; do
      json="$OUT/$lname-${names[$i]}-$round.json"
      $PY -m mixjax.bench.serve --url "http://127.0.0.1:$((8800 + i))" $lopts --json "$json" > "$json.log" 2>&1
      $PY -c "import json,sys; d=json.load(open(sys.argv[1])); t=d['ttft_ms']; print(sys.argv[2], sys.argv[3], round(d['throughput_tok_s']), round(t['p50']), round(t['p90']), round(t['p99']), '' if not d['errors'] else f\"errors {d['errors']}\")" "$json" "${names[$i]}" "$round" || tail -5 "$json.log"
    done
  done
done
kill "${pids[@]}"; wait 2>/dev/null
