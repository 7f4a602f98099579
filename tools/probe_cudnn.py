"""cuDNN flash attention (jax.nn.dot_product_attention) vs mixjax's Triton flash kernel, causal prefill."""
import jax, jax.numpy as jnp
from mixjax.bench.experts import timeit, measure_matmul_rate
from mixjax.kernels.flash_attention import flash_attention
rate = measure_matmul_rate()
for t in (2048, 8192):
    q = jax.random.normal(jax.random.PRNGKey(0), (1, t, 32, 128), jnp.bfloat16)
    kh = jax.random.normal(jax.random.PRNGKey(1), (1, 4, t, 128), jnp.bfloat16)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    fl = 4 * 32 * 128 * t * (t + 1) / 2
    f1 = jax.jit(lambda q, k, pos: flash_attention(q, k, k, pos, scale=0.088, tiles=(64, 64, 4, 2)))
    def cud(q, k, pos):
        kt = k.transpose(0, 2, 1, 3)
        return jax.nn.dot_product_attention(q, kt, kt, scale=0.088, is_causal=True, implementation="cudnn")
    f2 = jax.jit(cud)
    a = f1(q, kh, pos); b = f2(q, kh, pos)
    err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
    for name, f in (("triton", f1), ("cudnn", f2)):
        tm = timeit(f, q, kh, pos, iters=10)
        print(f"T={t} {name}: {tm*1e6:.0f} us, {fl/tm/1e12:.0f} TFLOP/s ({fl/tm/rate:.0%}); max abs diff {err:.1e}", flush=True)
