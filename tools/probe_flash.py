"""Flash-attention tile sizes on a GPU: one layer's prefill attention (32 q heads, 4 KV heads, head_dim 128)."""
import jax, jax.numpy as jnp, numpy as np
from mixjax.bench.experts import timeit, measure_matmul_rate
from mixjax.kernels.flash_attention import flash_attention
rate = measure_matmul_rate()
for t in (2048, 8192):
    q = jax.random.normal(jax.random.PRNGKey(0), (1, t, 32, 128), jnp.bfloat16)
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 4, t, 128), jnp.bfloat16)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    fl = 4 * 32 * 128 * t * (t + 1) / 2
    for tiles in [(64, 64, 4, 2), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3), (128, 32, 4, 3)]:
        try:
            f = jax.jit(lambda q, k, pos, tiles=tiles: flash_attention(q, k, k, pos, scale=0.088, tiles=tiles))
            tm = timeit(f, q, k, pos, iters=10)
            print(f"T={t} tiles={tiles}: {tm*1e6:.0f} us, {fl/tm/1e12:.0f} TFLOP/s ({fl/tm/rate:.0%})", flush=True)
        except Exception as e:
            print(f"T={t} tiles={tiles} failed: {str(e)[:150]}", flush=True)
