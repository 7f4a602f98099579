"""Does jax's Hopper grouped GEMM (pallas ops/gpu/ragged_dot_mgpu) beat mixjax's Triton grouped kernels for the
prefill expert matmuls? Times one [M, D] x [E, D, F] gate projection both ways at 2048 and 8192 tokens."""
import functools, statistics, time, sys
import jax, jax.numpy as jnp, numpy as np
from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu as rd
from mixjax.bench.experts import random_gates, timeit, measure_matmul_rate
from mixjax.kernels import grouped_experts as ge
E, K, D, F = 128, 8, 2048, 768
rate = measure_matmul_rate()
print(f"matmul rate {rate/1e12:.0f} TFLOP/s")
rng = np.random.RandomState(0)
wg = jax.random.normal(jax.random.PRNGKey(0), (E, D, F), jnp.bfloat16) * 0.02
wd = jax.random.normal(jax.random.PRNGKey(1), (E, F, D), jnp.bfloat16) * 0.02
for n in (2048, 8192):
    g = random_gates(rng, n, E, K)
    counts = jnp.asarray((g != 0).sum(0), jnp.int32)
    m = n * K
    xs = jax.random.normal(jax.random.PRNGKey(2), (m, D), jnp.bfloat16)
    hs = jax.random.normal(jax.random.PRNGKey(3), (m, F), jnp.bfloat16)
    ref = jax.jit(lambda x, w, c: jax.lax.ragged_dot(x, w, c))
    want = ref(xs, wg, counts)
    for bm, bn, bk, steps, gbn in [(128, 128, 64, 4, 1), (128, 128, 64, 4, 2), (64, 128, 64, 4, 1), (128, 256, 64, 3, 1), (128, 64, 64, 5, 1)]:
        try:
            f = jax.jit(functools.partial(rd.ragged_dot, block_m=bm, block_n=bn, block_k=bk, max_concurrent_steps=steps, grid_block_n=gbn))
            got = f(xs, wg, group_sizes=counts)
            err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))) / jnp.max(jnp.abs(want.astype(jnp.float32))))
            t = timeit(lambda: f(xs, wg, group_sizes=counts), iters=10)
            fl = 2 * m * D * F
            td = timeit(lambda: f(hs, wd, group_sizes=counts), iters=10) if F % bk == 0 and D % (bn * gbn) == 0 else float('nan')
            print(f"n={n} mgpu bm={bm} bn={bn} bk={bk} steps={steps} gbn={gbn}: gate {t*1e6:.0f} us ({fl/t/rate:.0%} of matmul), down {td*1e6:.0f} us, err {err:.1e}", flush=True)
        except Exception as e:
            print(f"n={n} mgpu {bm},{bn},{bk},{steps},{gbn} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    blk = ge.choose_blocks(m, E, D, F)
    full = jax.jit(lambda x, gg: ge.grouped_swiglu(x, gg, wg, wg, wd, k=K, blk=blk))
    x = jax.random.normal(jax.random.PRNGKey(4), (n, D), jnp.bfloat16)
    t = timeit(lambda: full(x, jnp.asarray(g)), iters=10)
    print(f"n={n} triton full swiglu (gate+up+down, layout, combine) {t*1e6:.0f} us = {3*2*m*D*F/t/rate:.0%} of matmul", flush=True)
    t = timeit(lambda: ref(xs, wg, counts), iters=10)
    print(f"n={n} lax.ragged_dot gate {t*1e6:.0f} us", flush=True)
