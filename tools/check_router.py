"""The router kernel on a GPU: same ids as XLA's softmax-top-k, weights within float32 rounding, and device time per
call of each, 20 calls chained in one jit. A development tool: python tools/check_router.py [E] [K]."""
import sys, time
import jax, jax.numpy as jnp, numpy as np
from mixjax.kernels.router import route, softmax_topk

E = int(sys.argv[1]) if len(sys.argv) > 1 else 128
K = int(sys.argv[2]) if len(sys.argv) > 2 else 8


def chained(f, reps=20):
    def run(x):
        for i in range(reps):  # each call's input depends on the last: no overlap, no merging
            ids, w = f(x)
            x = x + (w[:, :1] * 1e-9 + ids[:, :1].astype(jnp.float32) * 1e-9)
        return x
    return jax.jit(run)


for n in (1, 2, 8, 16):
    logits = jnp.asarray(np.random.RandomState(n).randn(n, E).astype(np.float32)).astype(jnp.bfloat16).astype(jnp.float32)
    ids, w = route(logits, k=K, norm=True)
    xids, xw = softmax_topk(logits, K, True)
    same = bool((np.asarray(ids) == np.asarray(xids)).all())
    err = float(jnp.max(jnp.abs(w - xw)))
    times = {}
    variants = [(f"kernel {w} warps", lambda x, w=w: route(x, k=K, norm=True, warps=w)) for w in (1, 2, 4, 8)]
    for name, f in variants + [("xla", lambda x: softmax_topk(x, K, True))]:
        g = chained(f)
        g(logits).block_until_ready()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter(); g(logits).block_until_ready(); best = min(best, time.perf_counter() - t0)
        times[name] = best / 20 * 1e6
    print(f"n={n:2d} E={E} k={K}: ids equal {same}, max weight diff {err:.1e}; per call (chained 20x, incl. the "
          f"chaining add): " + ", ".join(f"{k_} {v:.1f} us" for k_, v in times.items()), flush=True)
