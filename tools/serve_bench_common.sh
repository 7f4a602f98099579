# Sourced by tools/gpu_serve_loadtest.sh and tools/gpu_serve_ab.sh: the HTTP packages (the GPU image lacks them: carried
# as wheels in .whl, installed into /tmp/site), the bench-model server's command (BENCH_SERVER), the default loads
# (LIGHT, POISSON, BURSTS, MIXED: bench.serve options) and the wait for a server to answer /health.
# PY, PRESET, LAYERS, MAX_BATCH, MAX_SEQ_LEN and the loads may be set in the environment.
PY=${PY:-python3}
if ! $PY -c "import fastapi, uvicorn" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
BENCH_SERVER="$PY tools/serve_bench_model.py --preset ${PRESET:-qwen3-30b-a3b} --layers ${LAYERS:-4} \
  --max-batch ${MAX_BATCH:-128} --max-seq-len ${MAX_SEQ_LEN:-4096} --max-queue 1024 --dtype bfloat16"
LIGHT=${LIGHT:-"--requests 32 --rate 2 --prompt-len 512:2048 --output-len 64:128 --vocab-hi 150000"}
POISSON=${POISSON:-"--requests 512 --rate 64 --prompt-len 128:1024 --output-len 128:256 --vocab-hi 150000"}
BURSTS=${BURSTS:-"--requests 384 --arrival bursty --burst 128 --rate 128 --prompt-len 128:512 --output-len 256:256 --vocab-hi 150000"}
# bursts of long prompts while earlier requests decode: their stalls behind the prefills (--max-prefill-tokens)
MIXED=${MIXED:-"--requests 256 --arrival bursty --burst 32 --rate 64 --prompt-len 1024:2048 --output-len 256:512 --vocab-hi 150000"}

# load_options NAME: the bench.serve options of the load named light, poisson, bursts or mixed (1 for another name)
load_options() {
  case $1 in light) echo "$LIGHT";; poisson) echo "$POISSON";; bursts) echo "$BURSTS";; mixed) echo "$MIXED";;
    *) echo "unknown load $1" >&2; return 1;; esac
}

# wait_healthy PORT PID LOG: until the server on PORT answers /health (0), or its process PID is gone (1: the tail of
# its LOG is printed)
wait_healthy() {
  for _ in $(seq 900); do
    curl -sf "http://127.0.0.1:$1/health" > /dev/null && return 0
    kill -0 "$2" 2>/dev/null || { echo "server on port $1 died"; tail -30 "$3"; return 1; }
    sleep 1
  done
  echo "server on port $1 not ready after 900 s"; return 1
}
