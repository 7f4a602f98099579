"""The sorted expert layout on a GPU: the two Pallas kernels (`kernels.expert_layout.sorted_layout`) against
group_layout's XLA form, for prompts and decode batches of Qwen3-30B-A3B routing (128 experts, top 8): the same
layout (asserted), and the device time of each (`device_seconds_per_op`). A development tool:
    python tools/probe_layout.py [--tokens 8,32,256,2048,4096,8192]"""
import argparse
import jax, jax.numpy as jnp, numpy as np
from mixjax.bench.experts import device_seconds_per_op
from mixjax.kernels import grouped_experts as ge

ap = argparse.ArgumentParser(); ap.add_argument("--tokens", default="8,32,256,2048,4096,8192")
a = ap.parse_args()
E, K = 128, 8
for n in map(int, a.tokens.split(",")):
    bm = ge.choose_blocks(n * K, E, 2048, 768).bm
    rng = np.random.RandomState(n)
    ins = []
    for i in range(8):
        ids = np.stack([rng.choice(E, K, replace=False) for _ in range(n)]).astype(np.int32)
        ins.append((jnp.asarray(ids), jnp.asarray(rng.rand(n, K).astype(np.float32) + 0.01)))
    zeros = jnp.zeros((n, E))
    lay = lambda kernel: (lambda ids, w: ge.group_layout(zeros, K, bm, routed=(ids, w), kernel=kernel))
    xla, pallas = jax.jit(lay(False))(*ins[0]), jax.jit(lay(True))(*ins[0])
    for f in ("src_row", "block_expert", "dest"):
        np.testing.assert_array_equal(np.asarray(getattr(xla, f)), np.asarray(getattr(pallas, f)), err_msg=f)
    t_x, t_p = (device_seconds_per_op(lay(kern), ins) for kern in (False, True))
    print(f"{n:5d} tokens ({n * K} pairs, blocks of {bm}): same layout; XLA {t_x * 1e6:6.1f} us, "
          f"Pallas {t_p * 1e6:6.1f} us", flush=True)
