"""The one-row projection kernel on a GPU at Qwen3-30B-A3B shapes: equal to layers.matmul within bf16 rounding, and
device time per call of each, 20 calls chained in one jit, over a few tilings. A development tool:
    python tools/check_gemv.py"""
import itertools, time
import jax, jax.numpy as jnp, numpy as np
from mixjax.kernels.gemv import gemv
from mixjax.models.layers import matmul

D = 2048
shapes = {"qkv": (4096, 512, 512), "o": (2048,), "router": (128,)}
k_of = {"qkv": D, "o": 4096, "router": D}
rng = np.random.RandomState(0)


def chained(f, reps=20):
    def run(x, ws):
        for _ in range(reps):
            outs = f(x, ws)
            x = x + outs[0][:, :1].astype(x.dtype) * 0  # a data dependence between calls
        return x
    return jax.jit(run)


for name, ns in shapes.items():
    k = k_of[name]
    ws = [jnp.asarray(rng.randn(k, n).astype(np.float32) * 0.02, jnp.bfloat16) for n in ns]
    x = jnp.asarray(rng.randn(1, k).astype(np.float32), jnp.bfloat16)
    want = [matmul(x, w) for w in ws]
    mb = sum(w.size * 2 for w in ws) / 1e6
    variants = {"xla matmul": lambda x, ws: [matmul(x, w) for w in ws]}
    for bn, bk, warps, stages in itertools.product((16, 32), (128, 256), (4, 8), (3, 5)):
        variants[f"gemv bn{bn} bk{bk} w{warps} s{stages}"] = \
            lambda x, ws, c=(bn, bk, warps, stages): gemv(x, ws, bn=c[0], bk=c[1], warps=c[2], stages=c[3])
    res = {}
    for vname, f in variants.items():
        try:
            got = f(x, ws)
            f32 = lambda a: np.asarray(a.astype(jnp.float32))
            err = max(np.abs(f32(g) - f32(w_)).max() / np.abs(f32(w_)).max() for g, w_ in zip(got, want))
            g = chained(f)
            g(x, ws).block_until_ready()
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter(); g(x, ws).block_until_ready(); best = min(best, time.perf_counter() - t0)
            res[vname] = (best / 20 * 1e6, err)
        except Exception as e:  # noqa: BLE001 - a tiling the compiler refuses
            print(f"{name} {vname}: {type(e).__name__}: {str(e)[:120]}")
    top = sorted(res.items(), key=lambda kv: kv[1][0])[:6]
    print(f"{name} ({mb:.1f} MB): xla {res['xla matmul'][0]:.1f} us; best: " +
          "; ".join(f"{v} {t:.1f} us ({mb / t:.2f} TB/s, err {e:.1e})" for v, (t, e) in top), flush=True)
