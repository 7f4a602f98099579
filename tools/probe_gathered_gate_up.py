"""Kernel A reading x's rows by index (`grouped_experts_hopper.gate_up_gathered`) against the padded copy of x plus
kernel A (`grouped_experts.gather_rows` + `grouped_experts_hopper.gate_up`), on a Hopper GPU, Qwen3-30B-A3B expert
shapes: the same h on the rows holding pairs, and each one's time (chained R times in one jit). A development tool:
    python tools/probe_gathered_gate_up.py 2048,4096,8192 [--stages 3,4]"""
import argparse, dataclasses
import jax, jax.numpy as jnp, numpy as np
from mixjax.kernels import grouped_experts as ge, grouped_experts_hopper as gh
from mixjax.bench.experts import random_expert_weights, random_gates, measure_hbm_bandwidth
from chain_timing import seconds_per_call

ap = argparse.ArgumentParser(); ap.add_argument("tokens"); ap.add_argument("--stages", default="4")
a = ap.parse_args()
E, K, D, F, R = 128, 8, 2048, 768, 10
bw = measure_hbm_bandwidth()
print(f"{jax.devices()[0].device_kind}; HBM {bw / 1e12:.2f} TB/s", flush=True)


key = jax.random.PRNGKey(0)
wg, wu, _ = random_expert_weights(E, D, F)
rng = np.random.RandomState(0)
for n in map(int, a.tokens.split(",")):
    g = jnp.asarray(random_gates(rng, n, E, K)); x = jax.random.normal(key, (n, D), jnp.bfloat16)
    bm = 128
    lay = ge.group_layout(g, K, bm); nb = lay.block_expert.shape[0]
    used = int((np.asarray(lay.block_expert) >= 0).sum())
    br = (np.asarray(lay.src_row) < n).reshape(nb, bm).sum(1)[:used]
    real = np.concatenate([np.arange(b * bm, b * bm + r) for b, r in enumerate(br)])
    copy_then_a = lambda xx, s, b, w1, w2: gh.gate_up(ge.gather_rows(xx, lay, bm), b, w1, w2, src_row=s, n_x=n)
    h_ref = np.asarray(jax.jit(copy_then_a)(x, lay.src_row, lay.block_expert, wg, wu)[:used * bm], np.float32)[real]
    t0 = seconds_per_call(copy_then_a, R, x, lay.src_row, lay.block_expert, wg, wu)
    print(f"n={n}: {used} blocks; copy + A {t0 * 1e6:7.1f} us; 805 MB of expert weights at the HBM bandwidth "
          f"{2 * E * D * F * 2 / bw * 1e6:6.1f} us", flush=True)
    for st in map(int, a.stages.split(",")):
        t = dataclasses.replace(gh.GATHER_TILES, stages=st)
        try:
            f = lambda xx, s, b, w1, w2: gh.gate_up_gathered(xx, s, b, w1, w2, t, skip=True)
            h = np.asarray(jax.jit(f)(x, lay.src_row, lay.block_expert, wg, wu)[:used * bm], np.float32)[real]
            tg = seconds_per_call(f, R, x, lay.src_row, lay.block_expert, wg, wu)
            print(f"   gathered A, {st} stages: {tg * 1e6:7.1f} us ({t0 / tg:.3f}x); max |gathered - copy + A| "
                  f"{np.abs(h - h_ref).max():.3g} on the rows holding pairs (max {np.abs(h_ref).max():.3g})", flush=True)
        except Exception as ex:
            print(f"   gathered A, {st} stages failed: {type(ex).__name__}: {str(ex)[:3000]}", flush=True)
