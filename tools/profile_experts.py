"""Where the grouped-experts time goes on a GPU: layout vs kernel A vs kernel B, chained R times in one jit
(as layers are), so per-call dispatch overhead is excluded. A development tool for tuning mixjax.kernels."""
import statistics, sys, time
import jax, jax.numpy as jnp, numpy as np
from mixjax.kernels import grouped_experts as ge
from mixjax.bench.experts import random_gates, measure_hbm_bandwidth

E, K, D, F, R = 128, 8, 2048, 768, 10
def timeit(f, *a, iters=10):
    jax.block_until_ready(f(*a)); ts = []
    for _ in range(iters):
        t0 = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / R

bw = measure_hbm_bandwidth()
key = jax.random.PRNGKey(0)
wg, wu = (jax.random.normal(kk, (E, D, F), jnp.bfloat16) * 0.02 for kk in jax.random.split(key, 2))
wd = jax.random.normal(jax.random.PRNGKey(1), (E, F, D), jnp.bfloat16) * 0.02
rng = np.random.RandomState(0)
tiles = [ge.Blocks(*map(int, t.split(","))) for t in sys.argv[2:]]
for n in map(int, sys.argv[1].split(",")):
    g = jnp.asarray(random_gates(rng, n, E, K)); x = jax.random.normal(key, (n, D), jnp.bfloat16)
    touched = int((np.asarray(g) != 0).any(0).sum()); roof = touched * 3 * D * F * 2 / bw
    for blk in tiles or [ge.choose_blocks(n * K, E, D, F)]:
        def chain(fn):
            @jax.jit
            def run(x, g, wg, wu, wd):
                for _ in range(R):
                    x = fn(x, g, wg, wu, wd)
                return x
            return run
        full = chain(lambda x, g, a, b, c: ge.grouped_swiglu(x, g, a, b, c, k=K, blk=blk))
        def layout_only(x, g, a, b, c):
            lay = ge.group_layout(g, K, blk.bm)
            xp = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])[lay.src_row]
            return x + (xp.sum() + lay.dest.sum() + lay.block_expert.sum() + lay.weight.sum()).astype(x.dtype) * 0
        lay = ge.group_layout(g, K, blk.bm); nb = lay.block_expert.shape[0]; m = nb * blk.bm
        xp = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])[lay.src_row]
        def ka(xp, be, a, b, c):
            return ge.gate_up(xp, be, a, b, blk)
        def kb(h, be, a, b, c):
            return ge.down_proj(h, be, c, blk)
        def chain_a():
            @jax.jit
            def run(xp, be, a, b, c):
                for _ in range(R):
                    h = ka(xp, be, a, b, c); xp = xp + h[:, :1]
                return xp
            return run
        def chain_b():
            @jax.jit
            def run(h, be, a, b, c):
                for _ in range(R):
                    y = kb(h, be, a, b, c); h = h + y[:, :F].astype(h.dtype)
                return h
            return run
        h0 = jnp.zeros((m, F), jnp.bfloat16)
        t_full = timeit(full, x, g, wg, wu, wd); t_lay = timeit(chain(layout_only), x, g, wg, wu, wd)
        t_a = timeit(chain_a(), xp, lay.block_expert, wg, wu, wd); t_b = timeit(chain_b(), h0, lay.block_expert, wg, wu, wd)
        print(f"n={n:5d} touched={touched:3d} nb={nb:4d} tile={blk} roof={roof*1e6:6.1f}us full={t_full*1e6:7.1f} "
              f"layout={t_lay*1e6:6.1f} A={t_a*1e6:7.1f} ({2/3*roof/t_a:5.1%}) B={t_b*1e6:7.1f} ({1/3*roof/t_b:5.1%})", flush=True)
