"""The grouped experts' row copies on a GPU: XLA's gather of x's padded rows and its combine of the expert outputs
against the Pallas row kernels (mixjax.kernels.grouped_experts.gather_rows / combine), each chained R times in one
jit, for Qwen3-30B-A3B expert shapes; then the whole grouped SwiGLU both ways. A development tool:
    python tools/probe_rows.py 2048,4096,8192"""
import functools, itertools, statistics, sys, time
import jax, jax.numpy as jnp, numpy as np
from mixjax.kernels import grouped_experts as ge
from mixjax.bench.experts import random_gates

E, K, D, F, R = 128, 8, 2048, 768, 10


def timeit(f, *args, iters=8):
    jax.block_until_ready(f(*args)); ts = []
    for _ in range(iters):
        t0 = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / R


def chained(op):
    @jax.jit
    def run(x, *rest):
        for _ in range(R):
            out = op(x, *rest); x = x.at[:1].add(out[:1, :x.shape[1]].astype(x.dtype))
        return x
    return run


key = jax.random.PRNGKey(0)
wg, wu = (jax.random.normal(kk, (E, D, F), jnp.bfloat16) * 0.02 for kk in jax.random.split(key, 2))
wd = jax.random.normal(jax.random.PRNGKey(1), (E, F, D), jnp.bfloat16) * 0.02
rng = np.random.RandomState(0)
for n in map(int, sys.argv[1].split(",")):
    g = jnp.asarray(random_gates(rng, n, E, K)); x = jax.random.normal(key, (n, D), jnp.bfloat16)
    blk = ge.choose_blocks(n * K, E, D, F)
    lay = ge.group_layout(g, K, blk.bm); m = lay.src_row.shape[0]
    xla_x = lambda x, lay: jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])[lay.src_row]
    ref = np.asarray(xla_x(x, lay).astype(jnp.float32)); used = np.repeat(np.asarray(lay.block_expert) >= 0, blk.bm)
    t_xla = timeit(chained(xla_x), x, lay)
    print(f"n={n} bm={blk.bm} padded rows {m} ({used.sum()} in used blocks): x copy XLA {t_xla * 1e6:.1f} us", flush=True)
    for r, c, w in itertools.product((16, 32), (256, 512, 1024), (4, 8)):
        t = ge.RowTiles(r, c, w)
        if r > blk.bm:
            continue
        op = lambda x, lay, t=t: ge.gather_rows(x, lay, blk.bm, tiles=t)
        got = np.asarray(op(x, lay).astype(jnp.float32))
        ok = np.array_equal(got[used], ref[used])
        print(f"   gather_rows {t}: {timeit(chained(op), x, lay) * 1e6:7.1f} us  equal={ok}", flush=True)
    y = jax.random.normal(key, (m, D), jnp.bfloat16)
    def xla_c(x, y, lay):
        rows = y[jnp.minimum(lay.dest, m - 1)]
        rows = jnp.where((lay.dest < m)[..., None], rows.astype(jnp.float32), 0.0)
        return jnp.einsum("nkd,nk->nd", rows, lay.weight).astype(y.dtype)
    ref = np.asarray(xla_c(x, y, lay).astype(jnp.float32))
    print(f"   combine XLA {timeit(chained(xla_c), x, y, lay) * 1e6:.1f} us", flush=True)
    for r, c, w in itertools.product((16, 32), (256, 512, 1024), (4, 8)):
        t = ge.RowTiles(r, c, w)
        op = lambda x, y, lay, t=t: ge.combine(y, lay, n, tiles=t)
        err = float(np.abs(np.asarray(op(x, y, lay).astype(jnp.float32)) - ref).max())
        print(f"   combine {t}: {timeit(chained(op), x, y, lay) * 1e6:7.1f} us  max diff {err:.3g}", flush=True)
    for rk in (False, True):
        op = lambda x, g, rk=rk: ge.grouped_swiglu(x, g, wg, wu, wd, k=K, blk=blk, row_kernels=rk)
        print(f"   grouped_swiglu row_kernels={rk}: {timeit(chained(op), x, g) * 1e6:7.1f} us", flush=True)
