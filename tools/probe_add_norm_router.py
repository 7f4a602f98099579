"""The post-attention residual add, RMSNorm and router product in one kernel (`kernels.add_norm_router`) against
XLA's kernels for the same (`h = x + a; n = RMSNorm(h); matmul(n, W^T)`, as `base.DecoderLayer` writes them), on a
GPU, Qwen3-30B-A3B's shapes (d_model 2048, 128 experts), each chained R times in one jit: both outputs compared and
both timed, for each tiling. A development tool:
    python tools/probe_add_norm_router.py 2048,4096,8192 [--tiles ROWSxCHUNKxWARPSxSTAGESxFUSE,...]
FUSE 1: the router's product in the kernel; 0: the kernel writes the normed rows, XLA multiplies them."""
import argparse
import jax, jax.numpy as jnp, numpy as np
from mixjax.kernels import add_norm_router as anr
from mixjax.models.layers import RMSNorm, matmul
from mixjax.bench.experts import measure_hbm_bandwidth
from chain_timing import seconds_per_call

ap = argparse.ArgumentParser(); ap.add_argument("rows")
ap.add_argument("--tiles", default="16x256x8x1x1,16x256x8x2x1,16x256x8x3x1,32x256x8x3x1,16x512x8x2x1,"
                                   "16x256x8x1x0,16x256x8x2x0,16x512x8x2x0,32x256x8x2x0,8x256x4x2x0,8x512x4x2x0,"
                                   "16x2048x8x1x0,8x2048x8x1x0,16x1024x8x1x0")
a = ap.parse_args()
D, E, R = 2048, 128, 20
bw = measure_hbm_bandwidth()
print(f"{jax.devices()[0].device_kind}; HBM {bw / 1e12:.2f} TB/s", flush=True)
norm = RMSNorm(D, "post_norm", eps=1e-6, dtype=jnp.bfloat16)
rng = np.random.RandomState(0)
norm.w.value = jnp.asarray(rng.rand(D) + 0.5, jnp.bfloat16)
nw, w = norm.w[...], jnp.asarray(rng.randn(E, D) * 0.02, jnp.bfloat16)


def xla(x, a, nw, w):
    n = norm(x + a)
    return n, matmul(n, w.T)


def both(fn):
    """fn's normed rows, made to depend on its logits too (both outputs computed and written, as in the model)."""
    def call(*v):
        nn, lg = fn(*v)
        return nn.at[:1, :1].add(lg[:1, :1])
    return call


for n in map(int, a.rows.split(",")):
    x, at = (jax.random.normal(jax.random.PRNGKey(i), (n, D), jnp.bfloat16) for i in (1, 2))
    want_n, want_l = (np.asarray(v, np.float32) for v in jax.jit(xla)(x, at, nw, w))
    t_xla = seconds_per_call(both(xla), R, x, at, nw, w)
    floor = (3 * n * D * 2 + E * D * 2 + n * E * 2) / bw
    print(f"rows {n}: XLA {t_xla * 1e6:6.1f} us; bytes at the HBM bandwidth {floor * 1e6:5.1f} us", flush=True)
    for t in a.tiles.split(","):
        rows, chunk, warps, stages, fuse = map(int, t.split("x"))  # fuse 0: the router's product left to XLA
        f = lambda x, a_, nw, w: anr.add_norm_router(x, a_, nw, w, eps=1e-6, rows=rows, chunk=chunk, warps=warps,
                                                     stages=stages, fuse_router=bool(fuse))
        try:
            got_n, got_l = (np.asarray(v, np.float32) for v in jax.jit(f)(x, at, nw, w))
            tk = seconds_per_call(both(f), R, x, at, nw, w)
            print(f"   kernel {t}: {tk * 1e6:6.1f} us ({t_xla / tk:.2f}x XLA, {floor / tk:.0%} of the bytes' time); n: {(got_n != want_n).mean():.2%}"
                  f" of elements differ, max {np.abs(got_n - want_n).max():.3g}; logits max diff "
                  f"{np.abs(got_l - want_l).max():.3g} (max {np.abs(want_l).max():.3g}); same top-8: "
                  f"{(np.sort(np.argsort(-got_l, 1)[:, :8], 1) == np.sort(np.argsort(-want_l, 1)[:, :8], 1)).all(1).mean():.2%}",
                  flush=True)
        except Exception as ex:
            print(f"   kernel {t} failed: {type(ex).__name__}: {str(ex)[:2000]}", flush=True)
