#!/usr/bin/env bash
# Several mixjax.serve processes on this machine, joined by jax.distributed into one mesh (one node per process).
#
#   examples/multihost_local.sh                      # 2 processes x 4 CPU devices: mesh 2x4, HTTP on :8000
#   N=4 DEVICES=2 PORT=8001 examples/multihost_local.sh --max-batch 8     # extra flags go to every process
#
# On CPU each process simulates DEVICES devices and the processes talk over gloo (TCP). On a machine with GPUs,
# give each process its own GPUs instead, e.g. CUDA_VISIBLE_DEVICES=0,1,2,3 and 4,5,6,7, and set CPU=0.
# Process 0 serves HTTP; Ctrl-C or SIGTERM to this script stops process 0, which stops the others; the script
# exits with the first non-zero status of a process (3: the cluster broke, see docs/MULTIHOST.md).
set -uo pipefail
N=${N:-2}
DEVICES=${DEVICES:-4}
PORT=${PORT:-8000}
COORDINATOR=${COORDINATOR:-127.0.0.1:12355}
PY=${PY:-python}
CPU=${CPU:-1}

pids=()
for ((i = 0; i < N; i++)); do
  if [ "$CPU" = 1 ]; then
    XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES" JAX_PLATFORMS=cpu \
      "$PY" -m mixjax.serve --mesh "${N}x${DEVICES}" --strategy hybrid_fused --port "$PORT" \
      --coordinator "$COORDINATOR" --num-processes "$N" --process-id "$i" "$@" &
  else
    CUDA_VISIBLE_DEVICES=$(seq -s, $((i * DEVICES)) $(((i + 1) * DEVICES - 1))) \
      "$PY" -m mixjax.serve --mesh "${N}x${DEVICES}" --strategy hybrid_fused --port "$PORT" \
      --coordinator "$COORDINATOR" --num-processes "$N" --process-id "$i" "$@" &
  fi
  pids+=($!)
done
# the other processes ignore SIGINT/SIGTERM and stop when process 0 does
trap 'kill -TERM "${pids[0]}" 2>/dev/null' INT TERM
rc=0
for pid in "${pids[@]}"; do
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
  wait "$pid" && s=0 || s=$?
  if [ "$s" -ne 0 ] && [ "$rc" -eq 0 ]; then rc=$s; fi
done
exit "$rc"
