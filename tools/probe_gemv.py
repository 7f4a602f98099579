"""Batch-1 projections on a GPU: XLA's two-row product (layers.matmul, with the RMSNorm before it as its own
kernels) against the Pallas one-row kernel (mixjax.kernels.gemv, norm fused, out-major weight), device time per
op from a profiler trace (the sum of the GPU kernels of 8 ops on distinct weights, so that none stays in L2, over
8). A development tool:
    python tools/probe_gemv.py [--sweep]"""
import argparse, collections, itertools, tempfile
import jax, jax.numpy as jnp, numpy as np
from mixjax.kernels.gemv import gemv, tiles
from mixjax.models.layers import matmul
from gpu_trace import gpu_kernels

ap = argparse.ArgumentParser(); ap.add_argument("--sweep", action="store_true"); a = ap.parse_args()
EPS = 1e-6
SHAPES = [("q_proj", 4096, 2048, True, False), ("k_proj", 512, 2048, True, False),
          ("o_proj", 2048, 4096, False, True), ("router", 128, 2048, True, False),
          ("lm_head", 151936, 2048, True, False)]


def kernel_seconds(op, inputs, reps=3):
    """(GPU kernel seconds of one op(*inputs[i]), its kernels per op), from a trace of a jit of len(inputs) ops."""
    f = jax.jit(lambda ins: [op(*i) for i in ins])
    jax.block_until_ready(f(inputs))
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(reps):
            jax.block_until_ready(f(inputs))
    ks = gpu_kernels(d)
    calls = reps * len(inputs)
    kern = collections.Counter(e["name"][:40] for e in ks)
    return sum(e["dur"] for e in ks) / calls * 1e-6, ", ".join(f"{k} x{v / calls:g}" for k, v in kern.items())


def xla_op(x, w_t, nw, r, norm, res):
    if norm:
        xf = x.astype(jnp.float32)
        x = nw * (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + EPS)).astype(x.dtype)
    y = matmul(x, w_t.T)  # XLA sees the transposed weight as a layout of the product, as with a stored [in, out]
    return r + y if res else y


for name, n, k, norm, res in SHAPES:
    reps = 8 if n * k * 2 < 200e6 else 3
    ins = [(jnp.asarray(np.random.RandomState(i).randn(1, k), jnp.bfloat16),
            jax.random.normal(jax.random.key(i), (n, k), jnp.bfloat16) * 0.02,
            jnp.ones((k,), jnp.bfloat16), jnp.ones((1, n), jnp.bfloat16)) for i in range(reps)]
    mb = n * k * 2 / 1e6
    t_x, _ = kernel_seconds(lambda x, w, nw, r: xla_op(x, w, nw, r, norm, res), ins)
    # XLA with the weight stored [in, out] as now (what the model runs today)
    ins_io = [(x, jnp.array(w.T), nw, r) for x, w, nw, r in ins]
    t_io, k_io = kernel_seconds(lambda x, w, nw, r: xla_op(x, w.T, nw, r, norm, res), ins_io)
    del ins_io
    blocks = [tiles(n, k)]
    if a.sweep and name != "lm_head":
        blocks += [b for b in itertools.product((2, 4, 8), (512, 1024, 2048), (4, 8))
                   if n % b[0] == 0 and k % b[1] == 0 and b != tiles(n, k)]
    best = None
    for b in blocks:
        f = lambda x, w, nw, r, b=b: (r if res else 0) + gemv(x, w, norm=nw if norm else None,
                                                              eps=EPS if norm else None, block=b)
        try:
            t, _ = kernel_seconds(f, ins)
        except Exception as e:  # a tile Triton cannot compile
            print(f"  {name} {b}: {type(e).__name__}"); continue
        if best is None or t < best[0]:
            best = (t, b)
        if a.sweep:
            print(f"  {name} {b}: {t * 1e6:.2f} us ({mb / t / 1e6:.2f} TB/s)", flush=True)
    x, w, nw, r = ins[0]
    err = float(jnp.max(jnp.abs(xla_op(x, w, nw, r, norm, res).astype(jnp.float32) - ((r if res else 0) + gemv(
        x, w, norm=nw if norm else None, eps=EPS if norm else None, block=best[1])).astype(jnp.float32))))
    print(f"{name} [{n}, {k}] {mb:.1f} MB: XLA two-row [in,out] {t_io * 1e6:.2f} us ({mb / t_io / 1e6:.2f} TB/s), "
          f"[out,in] {t_x * 1e6:.2f} us; gemv {best[0] * 1e6:.2f} us ({mb / best[0] / 1e6:.2f} TB/s) at {best[1]}; "
          f"max |diff| {err:.3g}\n   XLA kernels per op: {k_io}", flush=True)
