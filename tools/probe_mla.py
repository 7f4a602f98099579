"""DeepSeek-V3's prompt attention on a GPU: mixjax's MLA flash kernel (mixjax.kernels.flash_attention.
mla_flash_attention) at several tilings, against cuDNN's fused causal attention on the concatenated keys (q/k head
dim 192, v padded from 128 to 192: jax's cuDNN path wants one head dim), and XLA's `attend`; one layer of 128 heads, bf16. A development tool:
    python tools/probe_mla.py [T,T..]"""
import sys
import jax, jax.numpy as jnp
from mixjax.bench.experts import timeit, measure_matmul_rate
from mixjax.kernels.flash_attention import mla_flash_attention
from mixjax.models.layers import attend, causal_mask

H, N, R, V = 128, 128, 64, 128
rate = measure_matmul_rate()
for t in map(int, (sys.argv[1] if len(sys.argv) > 1 else "2048,8192").split(",")):
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    qn = jax.random.normal(ks[0], (1, t, H, N), jnp.bfloat16)
    qr = jax.random.normal(ks[1], (1, t, H, R), jnp.bfloat16)
    kv = jax.random.normal(ks[2], (1, t, H, N + V), jnp.bfloat16)
    kr = jax.random.normal(ks[3], (1, t, R), jnp.bfloat16)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    fl = 2 * H * (N + R + V) * t * (t + 1) / 2
    scale = (N + R) ** -0.5

    def concat(qn, qr, kv, kr):
        k = jnp.concatenate([kv[..., :N], jnp.broadcast_to(kr[:, :, None], (1, t, H, R))], -1)
        return jnp.concatenate([qn, qr], -1), k, kv[..., N:]

    def cudnn_padded(qn, qr, kv, kr, pos):  # v padded with zeros to the q/k head dim, the output cut back
        q, k, v = concat(qn, qr, kv, kr)
        v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, N + R - V)))
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")[..., :V]
    xla = jax.jit(lambda qn, qr, kv, kr, pos: attend(*concat(qn, qr, kv, kr), causal_mask(pos, t), scale))
    runs = [(f"mla flash {tiles}", jax.jit(lambda qn, qr, kv, kr, pos, tiles=tiles: mla_flash_attention(
        qn, qr, kv, kr, pos, scale=scale, tiles=tiles)))
        for tiles in [(64, 64, 4, 2), (128, 64, 8, 3), (128, 32, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4)]]
    runs += [("cudnn, v padded to 192", jax.jit(cudnn_padded))] + ([("xla attend", xla)] if t <= 2048 else [])
    ref = None
    for name, f in runs:
        try:
            out = f(qn, qr, kv, kr, pos).astype(jnp.float32)
            ref = out if ref is None else ref
            err = float(jnp.max(jnp.abs(out - ref)))
            tm = timeit(f, qn, qr, kv, kr, pos, iters=10)
            print(f"T={t} {name}: {tm*1e6:.0f} us, {fl/tm/1e12:.0f} TFLOP/s ({fl/tm/rate:.0%}); "
                  f"max |diff| to the first {err:.1e}", flush=True)
        except Exception as e:
            print(f"T={t} {name} failed: {str(e)[:200]}", flush=True)
