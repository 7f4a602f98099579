"""On a GPU: the kernels that finish another kernel's work in their last program (found by an atomic count) against
the separate kernel they replace, at Qwen3-30B-A3B shapes in bf16: bit-equal outputs over many calls (a missing
barrier or a stale read would show as a difference now and then), and the time per call of each form.
- the decode attention merging its chunks itself (decode_attention.COMBINE_IN_KERNEL) against its combine kernel;
- the batch-1 router product routing the row in its last program (gemv_many(route=), by rounds or by ranks:
  router.SELECT_IN_PRODUCT) against the router kernel after it.
A development tool: python tools/check_last_program.py [--calls N]"""
import argparse, statistics, time
import jax, jax.numpy as jnp, numpy as np
import mixjax.kernels.decode_attention as da
from mixjax.kernels import gemv, router

ap = argparse.ArgumentParser(); ap.add_argument("--calls", type=int, default=200); a = ap.parse_args()
rng = np.random.RandomState(0)
R = 20  # calls chained in one jit for the time per call


def per_call(run, *args):
    for _ in range(2):
        jax.block_until_ready(run(*args))
    ts = []
    for _ in range(10):
        t0 = time.perf_counter(); jax.block_until_ready(run(*args)); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / R * 1e6


def same_over_calls(f, g, make, calls):
    """f and g (jitted) on `calls` inputs from make(i): how many calls gave outputs that are not bit-equal."""
    bad = 0
    for i in range(calls):
        args = make(i)
        x, y = f(*args), g(*args)
        bad += not all(bool(jnp.array_equal(p, q)) for p, q in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
    return bad


# the decode attention
h, kv, d, s = 32, 4, 128, 1024
for b in (1, 8, 32, 128):
    f = lambda *sh: jnp.asarray(rng.randn(*sh), jnp.bfloat16)
    q, kn, vn, kc, vc = f(b, h, d), f(b, kv, d), f(b, kv, d), f(b, kv, s, d), f(b, kv, s, d)
    def chained(one):
        @jax.jit
        def run(q, kn, vn, kc, vc, pos):
            acc = jnp.zeros_like(q)
            for _ in range(R):
                o, kc, vc = one(q, kn, vn, kc, vc, pos)
                acc = acc + o
            return acc, kc, vc
        return run
    pos = jnp.full((b,), s - 100, jnp.int32)
    forms, t = {}, {}
    for merged in (True, False):  # the knob is read when decode_attention is traced: each form traced under its own
        da.COMBINE_IN_KERNEL = merged
        da.decode_attention.clear_cache()
        forms[merged] = jax.jit(lambda q, kn, vn, kc, vc, pos: da.decode_attention(q, kn, vn, kc, vc, pos,
                                                                                   scale=d ** -0.5))
        jax.block_until_ready(forms[merged](q, kn, vn, kc, vc, pos))
        t[merged] = per_call(chained(forms[merged]), q, kn, vn, kc, vc, pos)
    pos_of = lambda i: jnp.asarray(np.random.RandomState(i).randint(0, s, b), jnp.int32)
    bad = same_over_calls(forms[True], forms[False], lambda i: (q, kn, vn, kc, vc, pos_of(i)), a.calls)
    print(f"attention b={b} (chunks {da.plan(b, kv, s)[1]}): {a.calls} calls, not bit-equal in {bad}; per call "
          f"merged in the kernel {t[True]:.1f} us, with the combine kernel {t[False]:.1f} us", flush=True)
da.COMBINE_IN_KERNEL = True

# the batch-1 router product with and without the routing at its end
e, dm, k = 128, 2048, 8
w_r = jnp.asarray(rng.randn(e, dm) * 0.02, jnp.bfloat16)
nw = jnp.asarray(rng.rand(dm) + 0.5, jnp.bfloat16)
live = jnp.array([True])
kw = dict(norm=nw, eps=1e-6, emit=16)


def separate(x, add):
    logits, u = gemv.gemv_many(x, (w_r,), add=add, **kw)
    ids, wt = router.route(logits, k=k, norm=True, live=live, dtype=x.dtype, padded=True)
    return u, ids, wt


def in_product(x, add):
    _, u, ids, wt = gemv.gemv_many(x, (w_r,), add=add, route=(k, True), live=live, **kw)
    return u, ids, wt


def chained(one):
    @jax.jit
    def run(x, add):
        for _ in range(R):  # each call reads the last one's normed row and weights: a chain, as in the model
            u, ids, wt = one(x, add)
            x = u[:1] + wt[:, :1].astype(x.dtype) * 0 + (ids[:, :1] * 0).astype(x.dtype)
        return x
    return run


row = lambda i: tuple(jnp.asarray(np.random.RandomState(1000 + i).randn(1, dm), jnp.bfloat16) for _ in range(2))
sep = jax.jit(separate)
t_s = per_call(chained(separate), *row(0))
for how in ("rounds", "rank"):
    router.SELECT_IN_PRODUCT = how  # read when gemv_many is traced
    gemv.gemv_many.clear_cache()
    fused = jax.jit(in_product)
    jax.block_until_ready(fused(*row(0)))
    t_f = per_call(chained(in_product), *row(0))
    bad = same_over_calls(fused, sep, row, a.calls)
    print(f"router product, top {k} of {e} by {how}: {a.calls} calls, not bit-equal in {bad}; per call routing in "
          f"the product {t_f:.1f} us, product + router kernel {t_s:.1f} us", flush=True)
router.SELECT_IN_PRODUCT = "rounds"
