"""Batch-1 projections on a GPU: XLA's two-row product (layers.matmul, with the RMSNorm before it as its own
kernels) against the Pallas one-row kernel (mixjax.kernels.gemv, norm fused, out-major weight), device time per
op from a profiler trace (the sum of the GPU kernels of 8 ops on distinct weights, so that none stays in L2, over
8). A development tool:
    python tools/probe_gemv.py [--sweep]"""
import argparse, collections, glob, gzip, itertools, json, os, tempfile
import jax, jax.numpy as jnp, numpy as np
from mixjax.kernels.gemv import gemv, tiles
from mixjax.models.layers import matmul

ap = argparse.ArgumentParser(); ap.add_argument("--sweep", action="store_true"); a = ap.parse_args()
EPS = 1e-6
SHAPES = [("q_proj", 4096, 2048, True, False), ("k_proj", 512, 2048, True, False),
          ("o_proj", 2048, 4096, False, True), ("router", 128, 2048, True, False),
          ("lm_head", 151936, 2048, True, False)]


def device_seconds_per_op(op, inputs, _lo=None, _hi=None, reps=3):
    """GPU kernel seconds of one op(*inputs[i]) and its kernel names, from a trace of a jit of len(inputs) ops."""
    f = jax.jit(lambda ins: [op(*i) for i in ins])
    jax.block_until_ready(f(inputs))
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(reps):
            jax.block_until_ready(f(inputs))
    ev = json.load(gzip.open(glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[0]))
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    names = {(e["pid"], e.get("tid")): e["args"]["name"] for e in ev
             if e.get("ph") == "M" and e.get("name") in ("thread_name", "process_name")}
    tot, kern = 0.0, collections.Counter()
    for e in ev:
        pn = names.get((e.get("pid"), None), "") + "/" + names.get((e.get("pid"), e.get("tid")), "")
        if e.get("ph") == "X" and "/device:GPU" in pn and "Stream" in pn:
            tot += e["dur"]; kern[e["name"][:40]] += 1
    calls = reps * len(inputs)
    KERNELS[0] = ", ".join(f"{k} x{v / calls:g}" for k, v in kern.items())
    return tot / calls * 1e-6


KERNELS = [""]


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
    rlo, rhi = (2, reps) if reps > 2 else (1, 3)
    t_x = device_seconds_per_op(lambda x, w, nw, r: xla_op(x, w, nw, r, norm, res), ins, rlo, rhi)
    # XLA with the weight stored [in, out] as now (what the model runs today)
    ins_io = [(x, jnp.array(w.T), nw, r) for x, w, nw, r in ins]
    t_io = device_seconds_per_op(lambda x, w, nw, r: xla_op(x, w.T, nw, r, norm, res), ins_io, rlo, rhi)
    k_io = KERNELS[0]
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
            t = device_seconds_per_op(f, ins, rlo, rhi)
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
