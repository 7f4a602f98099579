#!/usr/bin/env bash
# The bench model's engine alone, without HTTP (tools/serve_bench_model.py --direct): the loads of
# tools/serve_bench_common.sh submitted in-process, on one warmed-up engine, to compare with the server's figures.
# One line per run: load, tokens/s, TTFT p50 / p90 / p99 ms, each request's longest pause p50 / p90 / p99 ms.
#   bash tools/gpu_engine_direct.sh [LOAD ...]   (names: light, poisson, bursts, mixed; default: bursts bursts bursts)
# Server options may be given in SERVER_OPTS; the outputs go under $OUT (default ./out).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
source tools/serve_bench_common.sh
loads=("$@"); [ ${#loads[@]} -gt 0 ] || loads=(bursts bursts bursts)
args=(); i=0
for name in "${loads[@]}"; do
  o=$(load_options "$name") || exit 1
  i=$((i + 1)); args+=(--direct "$o --json $OUT/direct-$i-$name.json")
done
$BENCH_SERVER ${SERVER_OPTS:-} "${args[@]}" > "$OUT/direct.log" 2>&1 || { tail -20 "$OUT/direct.log"; exit 1; }
head -1 "$OUT/direct.log"
i=0
for name in "${loads[@]}"; do
  i=$((i + 1))
  $PY -c "import json,sys; d=json.load(open(sys.argv[1])); t, s = d['ttft_ms'], d['stall_ms']; print(sys.argv[2], round(d['throughput_tok_s']), '| TTFT', *(round(t[p]) for p in ('p50', 'p90', 'p99')), '| stall', *(round(s[p]) for p in ('p50', 'p90', 'p99')))" "$OUT/direct-$i-$name.json" "$name"
done
