"""On a GPU: the fused q/k norm + RoPE kernel (mixjax.kernels.norm_rope) against the XLA path it replaces (RMSNorm then
apply_rope, bf16) at Qwen3-30B-A3B's shapes (tools/profile_step.py shows their GPU time in the model). A development
tool:
    python tools/check_norm_rope.py [TOKENS]"""
import sys
import jax, jax.numpy as jnp, numpy as np
from mixjax.kernels.norm_rope import norm_rope
from mixjax.models.layers import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq

t = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
rng = np.random.RandomState(0)
for h in (32, 4):
    x = jnp.asarray(rng.randn(1, t, h, 128) * 3, jnp.bfloat16)
    norm = RMSNorm(128, "n", eps=1e-6, dtype=jnp.bfloat16)
    norm.w[...] = jnp.asarray(rng.randn(128) * 0.5 + 1, jnp.bfloat16)
    w = norm.w[...]
    pos = jnp.asarray(np.arange(t)[None], jnp.int32)
    cos, sin = rope_cos_sin(pos, *rope_inv_freq(128, 1e6, None, 40960))
    xla = jax.jit(lambda x, w, c, s: apply_rope(norm(x), c, s))  # norm holds w
    fused = jax.jit(lambda x, w, c, s: norm_rope(x, w, c, s, eps=1e-6))
    a, b = np.asarray(xla(x, w, cos, sin), np.float32), np.asarray(fused(x, w, cos, sin), np.float32)
    d = np.abs(a - b)
    print(f"T={t} heads={h}: max |fused - xla| {d.max():.3g} (max |xla| {np.abs(a).max():.3g}), "
          f"{(d > 0).mean():.2%} of elements differ", flush=True)

# GPU time per call at a few tilings: 20 calls chained in one jit (each feeds the next), the median over 10 runs
from mixjax.bench.experts import timeit
x = jnp.asarray(rng.randn(1, t, 32, 128), jnp.bfloat16)
for elements in (4096, 8192, 16384):
    for warps in (2, 4, 8, 16):
        @jax.jit
        def chain(x, w, c, s, elements=elements, warps=warps):
            for _ in range(20):
                x = norm_rope(x, w, c, s, eps=1e-6, elements=elements, warps=warps)
            return x
        us = timeit(chain, x, w, cos, sin, iters=10) / 20 * 1e6
        print(f"T={t} heads=32 elements/program {elements} warps {warps}: {us:.1f} us "
              f"({2 * x.size * 2 / (us * 1e-6) / 1e12:.2f} TB/s of q read and written)", flush=True)
