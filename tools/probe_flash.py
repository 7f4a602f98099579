"""Prefill attention on a GPU: mixjax's Triton flash kernel at several tilings against cuDNN's fused causal
attention (jax.nn.dot_product_attention), one layer of 32 q heads / 4 KV heads / head_dim 128, bf16."""
import jax, jax.numpy as jnp
from mixjax.bench.experts import timeit, measure_matmul_rate
from mixjax.kernels.flash_attention import flash_attention

rate = measure_matmul_rate()
for t in (2048, 8192):
    q = jax.random.normal(jax.random.PRNGKey(0), (1, t, 32, 128), jnp.bfloat16)
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 4, t, 128), jnp.bfloat16)  # heads-major cache
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    fl = 4 * 32 * 128 * t * (t + 1) / 2
    cudnn = jax.jit(lambda q, k, pos: jax.nn.dot_product_attention(
        q, k.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), scale=0.088, is_causal=True, implementation="cudnn"))
    ref = cudnn(q, k, pos).astype(jnp.float32)
    runs = [("cudnn", cudnn)] + [
        (f"triton {tiles}", jax.jit(lambda q, k, pos, tiles=tiles: flash_attention(q, k, k, pos, scale=0.088,
                                                                                     tiles=tiles)))
        for tiles in [(64, 64, 4, 2), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3)]]
    for name, f in runs:
        try:
            err = float(jnp.max(jnp.abs(f(q, k, pos).astype(jnp.float32) - ref)))
            tm = timeit(f, q, k, pos, iters=10)
            print(f"T={t} {name}: {tm*1e6:.0f} us, {fl/tm/1e12:.0f} TFLOP/s ({fl/tm/rate:.0%}); "
                  f"max |diff| to cuDNN {err:.1e}", flush=True)
        except Exception as e:
            print(f"T={t} {name} failed: {str(e)[:150]}", flush=True)
