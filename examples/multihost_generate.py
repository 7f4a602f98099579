"""Greedy generation with mixjax.LLM on several processes: run the same script in every process.

    # two processes of 4 CPU devices each on this machine (the mesh is 2x4: node = process):
    for i in 0 1; do
      XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
      MIXJAX_COORDINATOR=127.0.0.1:12355 MIXJAX_NUM_PROCESSES=2 MIXJAX_PROCESS_ID=$i \\
      python examples/multihost_generate.py "Once upon a time" &
    done; wait

Under srun or mpirun nothing needs to be set: jax.distributed detects the job.
Every process computes the same tokens; process 0 prints them.
"""

import json
import sys

import jax

import mixjax


def main():
    prompt = sys.argv[1] if len(sys.argv) > 1 else "Once upon a time"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 24
    llm = mixjax.LLM(strategy="hybrid_fused", progress=False)  # mesh: (processes) x (local devices)
    ids = llm.generate([llm.tokenizer.encode(prompt)], max_new_tokens=n, temperature=0.0)[0]
    if jax.process_index() == 0:
        print(json.dumps({"mesh": dict(llm.mesh.shape), "processes": jax.process_count(), "token_ids": ids,
                          "text": llm.tokenizer.decode(ids)}), flush=True)
    # at exit every process leaves the cluster together (mixjax.distributed registers cluster.shutdown)


if __name__ == "__main__":
    main()
