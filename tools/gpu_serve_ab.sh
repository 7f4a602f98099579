#!/usr/bin/env bash
# A/B of server options on one GPU: one bench-model server per variant, side by side (each gets 0.9/N of the GPU's
# memory), then ROUNDS rounds of one load (default: the bursts of tools/gpu_serve_loadtest.sh) sent to each server in
# turn, so that drifts of the machine fall on every variant alike. Prints one line per run: variant, round,
# tokens/s, TTFT p50 / p90 / p99 ms, stall (each request's longest pause between
# two tokens) p50 / p90 / p99 ms. Everything goes under $OUT (default ./out).
#   bash tools/gpu_serve_ab.sh ROUNDS "NAME=server options" "NAME=server options" ...
#   e.g. bash tools/gpu_serve_ab.sh 4 "default=" "gil1=--gil-switch-ms 1"
# PY, PRESET, LAYERS, MAX_BATCH, MAX_SEQ_LEN (tools/serve_bench_common.sh) and LOADS ("name:bench.serve options",
# or the name alone of a load of tools/serve_bench_common.sh (light, poisson, bursts, mixed), several separated by
# ";", each sent ROUNDS rounds in the order given; default the bursts) may be set in the environment.
set -u
OUT=${OUT:-out}; ROUNDS=$1; shift
mkdir -p "$OUT"
source tools/serve_bench_common.sh
LOADS=${LOADS:-"bursts:$BURSTS"}
FRACTION=$($PY -c "print(round(0.9 / $#, 3))")
names=(); pids=()
i=0
for variant in "$@"; do
  name=${variant%%=*}; opts=${variant#*=}
  XLA_PYTHON_CLIENT_MEM_FRACTION=$FRACTION $BENCH_SERVER --port $((8800 + i)) $opts > "$OUT/server-$name.log" 2>&1 &
  names+=("$name"); pids+=($!); i=$((i + 1))
done
for i in "${!names[@]}"; do
  wait_healthy $((8800 + i)) ${pids[$i]} "$OUT/server-${names[$i]}.log" || { kill "${pids[@]}"; exit 1; }
  head -2 "$OUT/server-${names[$i]}.log"
done
IFS=';' read -ra loads <<< "$LOADS"
for load in "${loads[@]}"; do
  lname=${load%%:*}; lopts=${load#*:}
  if [[ $load != *:* ]]; then  # a name alone: that load of tools/serve_bench_common.sh
    lopts=$(load_options "$load") || { kill "${pids[@]}"; exit 1; }
  fi
  echo "# $lname ($lopts): variant round tokens/s TTFT-p50 p90 p99 | stall-p50 p90 p99 (ms; stall: each request's longest pause between two tokens) | the engine's own gaps over 0.1 and 0.25 s | the server's GC time and pauses over 0.1 s"
  for round in $(seq "$ROUNDS"); do
    for i in "${!names[@]}"; do
      json="$OUT/$lname-${names[$i]}-$round.json"
      url="http://127.0.0.1:$((8800 + i))"
      curl -sf "$url/metrics" > "$json.before" || true
      $PY -m mixjax.bench.serve --url "$url" $lopts --json "$json" > "$json.log" 2>&1
      curl -sf "$url/metrics" > "$json.after" || true
      $PY tools/ab_line.py "$json" "${names[$i]}" "$round" "$json.before" "$json.after" || tail -5 "$json.log"
    done
  done
done
kill "${pids[@]}"; wait 2>/dev/null
