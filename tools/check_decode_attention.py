"""The decode attention kernel on a GPU against write_cache + attend (float32 reference), bf16 and float32 inputs,
then its time against XLA's form at Qwen3-30B-A3B shapes, over its tuning knobs (programs, warps, stages, keys per
block). A development tool: python tools/check_decode_attention.py"""
import statistics, time
import jax, jax.numpy as jnp, numpy as np
from mixjax.kernels.decode_attention import decode_attention
from mixjax.models.layers import attend, causal_mask, write_cache


def reference(q, kn, vn, kc, vc, pos, scale):
    kc = write_cache(kc, kn[:, :, None], pos, seq_axis=2)
    vc = write_cache(vc, vn[:, :, None], pos, seq_axis=2)
    return attend(q[:, None], kc, vc, causal_mask(pos[:, None], kc.shape[2]), scale, heads_major=True)[:, 0], kc, vc


rng = np.random.RandomState(0)
for (b, h, kv, d, s), dt in [((1, 32, 4, 128, 1024), jnp.bfloat16), ((8, 32, 4, 128, 1024), jnp.bfloat16),
                             ((3, 16, 1, 64, 256), jnp.float32), ((128, 32, 4, 128, 1024), jnp.bfloat16)]:
    f = lambda *sh: jnp.asarray(rng.randn(*sh).astype(np.float32))
    q, kn, vn, kc, vc = f(b, h, d), f(b, kv, d), f(b, kv, d), f(b, kv, s, d), f(b, kv, s, d)
    pos = jnp.asarray(rng.randint(0, s + 4, b), jnp.int32)
    want = reference(q, kn, vn, kc, vc, pos, d ** -0.5)
    args = [a.astype(dt) for a in (q, kn, vn, kc, vc)]
    got = decode_attention(*args, pos, scale=d ** -0.5)
    err = float(jnp.max(jnp.abs(got[0].astype(jnp.float32) - want[0])) / jnp.max(jnp.abs(want[0])))
    xla = jax.jit(lambda *a: reference(*a, d ** -0.5))
    ref_dt = xla(*args, pos)
    err_xla = float(jnp.max(jnp.abs(ref_dt[0].astype(jnp.float32) - want[0])) / jnp.max(jnp.abs(want[0])))
    same_cache = bool(jnp.all(got[1] == ref_dt[1])) and bool(jnp.all(got[2] == ref_dt[2]))
    ker = jax.jit(lambda *a: decode_attention(*a, scale=d ** -0.5))

    def t(fn):
        for _ in range(3):
            jax.block_until_ready(fn(*args, pos))
        ts = []
        for _ in range(30):
            t0 = time.perf_counter(); jax.block_until_ready(fn(*args, pos)); ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e6
    print(f"b={b} h={h} kv={kv} d={d} s={s} {jnp.dtype(dt).name}: max err kernel {err:.2e} vs XLA same dtype "
          f"{err_xla:.2e}; caches equal {same_cache}; synced call kernel {t(ker):.1f} us, XLA {t(xla):.1f} us",
          flush=True)


# device time per call: R calls chained in one jit (each call's caches feed the next), Qwen3-30B-A3B shapes, bf16
R = 20
h, kv, d, s = 32, 4, 128, 1024
for b in (1, 8, 32, 128):
    f = lambda *sh: jnp.asarray(rng.randn(*sh), jnp.bfloat16)
    q, kn, vn, kc, vc = f(b, h, d), f(b, kv, d), f(b, kv, d), f(b, kv, s, d), f(b, kv, s, d)
    pos = jnp.full((b,), s - 100, jnp.int32)
    roof = 2 * b * kv * (s - 99) * d * 2 / 4.27e12

    def chained(one):
        @jax.jit
        def run(q, kn, vn, kc, vc):
            acc = jnp.zeros_like(q)
            for _ in range(R):
                o, kc, vc = one(q, kn, vn, kc, vc)
                acc = acc + o
            return acc, kc, vc
        return run

    def per_call(run):
        for _ in range(2):
            jax.block_until_ready(run(q, kn, vn, kc, vc))
        ts = []
        for _ in range(10):
            t0 = time.perf_counter(); jax.block_until_ready(run(q, kn, vn, kc, vc)); ts.append(time.perf_counter() - t0)
        return statistics.median(ts) / R * 1e6
    xla_us = per_call(chained(lambda *a: reference(*a, pos, d ** -0.5)))
    line = f"b={b}: roofline {roof * 1e6:.1f} us; XLA {xla_us:.1f} us"
    variants = [(p, w, st, None) for p in (128, 512) for w, st in ((4, 2), (4, 3), (8, 2))]
    variants += [(128, w, st, 128) for w, st in ((4, 2), (4, 3), (8, 2))]  # 128-key blocks: half the steps
    for programs, warps, stages, block in variants:
        label = f"P{programs} w{warps} s{stages}{'' if block is None else f' bk{block}'}"
        try:
            us = per_call(chained(lambda *a, p=programs, w=warps, st=stages, bl=block: decode_attention(
                *a, pos, scale=d ** -0.5, programs=p, warps=w, stages=st, block=bl)))
            line += f"; {label} {us:.1f}"
        except Exception as e:  # noqa: BLE001 - a tiling Triton refuses (shared memory) is a result too
            line += f"; {label} failed ({type(e).__name__})"
    print(line, flush=True)
