"""Prefill attention on a GPU: mixjax's Triton flash kernel at several tilings, cuDNN's fused causal attention
(jax.nn.dot_product_attention) and jax's Hopper kernel (jax.experimental.pallas.ops.gpu.attention_mgpu, warp
specialised, TMA), one layer of 32 q heads / 4 KV heads / head_dim 128, bf16. Errors against float32 XLA.
    python tools/probe_flash.py [2048,8192] [--skip-triton]
Times are device time per call: R calls chained in one jit (`chain_timing`), so that the host's dispatch drops out
(the first version of this probe timed one call waited for: cuDNN at 2048 tokens 264 us, against ~80 us per layer
in the model's profile). jax's Hopper kernel keeps its shared-memory tiles in float16 (bf16 inputs fail in jax
0.11.2), so it is given q, k and v cast to float16 (exact for bf16 values within float16's range; q scaled by
1/sqrt(d) first, in float32, as the kernel applies no scale) and its output is cast back to bf16."""
import sys
import jax, jax.numpy as jnp
from mixjax.bench.experts import measure_matmul_rate
from mixjax.kernels.flash_attention import flash_attention
from chain_timing import seconds_per_call

rate = measure_matmul_rate()
lens = [int(t) for t in (sys.argv[1] if len(sys.argv) > 1 and sys.argv[1][0].isdigit() else "2048,8192").split(",")]
SCALE = 128 ** -0.5
try:
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mg
except ImportError as e:  # not on every build
    mg = None
    print("attention_mgpu unavailable:", e)


def xla_ref(q, k, v):
    return jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                        scale=SCALE, is_causal=True, implementation="xla")


for t in lens:
    q = jax.random.normal(jax.random.PRNGKey(0), (1, t, 32, 128), jnp.bfloat16)
    k_hm = jax.random.normal(jax.random.PRNGKey(1), (1, 4, t, 128), jnp.bfloat16)  # heads-major cache
    v_hm = jax.random.normal(jax.random.PRNGKey(2), (1, 4, t, 128), jnp.bfloat16)
    k, v = k_hm.transpose(0, 2, 1, 3), v_hm.transpose(0, 2, 1, 3)  # [B, S, K, D], as a fresh prompt's k/v
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    fl = 4 * 32 * 128 * t * (t + 1) / 2
    ref = jax.jit(xla_ref)(q, k, v) if t <= 4096 else None
    runs = [("cudnn", lambda: jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=SCALE, is_causal=True, implementation="cudnn")), (q, k, v))]
    if mg is not None:
        for bq, bkv, steps in [(64, 128, 2), (64, 64, 2), (64, 128, 3), (64, 64, 4)]:
            cfg = mg.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=steps, causal=True)
            runs.append((f"mgpu f16 {bq, bkv, steps}", lambda cfg=cfg: jax.jit(
                lambda q, k, v: mg.attention((q.astype(jnp.float32) * SCALE).astype(jnp.float16), k.astype(jnp.float16),
                                             v.astype(jnp.float16), cfg).astype(q.dtype)), (q, k, v)))
    if "--skip-triton" not in sys.argv:
        for tiles in [(128, 64, 8, 3), (64, 128, 4, 3)]:
            runs.append((f"triton {tiles}", lambda tiles=tiles: jax.jit(
                lambda q, k, v, pos: flash_attention(q, k, v, pos, scale=SCALE, tiles=tiles)), (q, k_hm, v_hm, pos)))
    base = None
    for name, make, args in runs:
        try:
            f = make()
            out = f(*args).astype(jnp.float32)
            if base is None:
                base = out
            err = float(jnp.max(jnp.abs(out - (ref if ref is not None else base))))
            tm = seconds_per_call(f, 10, *args)
            print(f"T={t} {name}: {tm*1e6:.0f} us, {fl/tm/1e12:.0f} TFLOP/s ({fl/tm/rate:.0%}); max |diff| to "
                  f"{'float32 XLA' if ref is not None else 'cuDNN'} {err:.1e}", flush=True)
        except Exception as e:
            print(f"T={t} {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
