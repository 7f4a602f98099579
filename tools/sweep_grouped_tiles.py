"""Tile sweep for the grouped-experts kernels on a GPU: kernel A (gate/up + SwiGLU) and kernel B (down) timed
separately, each chained R times in one jit, for Qwen3-30B-A3B expert shapes, for each launch order (Blocks.group).
A development tool:
    python tools/sweep_grouped_tiles.py 2048,4096 [--quick] [--groups 0,1,4] [--bm 64,128] [--focus]
--focus: only the tiles that won earlier sweeps (prefill) instead of the whole product."""
import argparse, itertools, statistics, time
import jax, jax.numpy as jnp, numpy as np
from mixjax.kernels import grouped_experts as ge
from mixjax.bench.experts import random_expert_weights, random_gates, measure_hbm_bandwidth, measure_matmul_rate

ap = argparse.ArgumentParser(); ap.add_argument("tokens"); ap.add_argument("--quick", action="store_true")
ap.add_argument("--groups", default="0"); ap.add_argument("--bm", default=""); ap.add_argument("--focus", action="store_true")
a = ap.parse_args()
E, K, D, F, R = 128, 8, 2048, 768, 10
bw, rate = measure_hbm_bandwidth(), measure_matmul_rate()
print(f"HBM {bw / 1e12:.2f} TB/s, matmul {rate / 1e12:.0f} TF/s", flush=True)


def timeit(f, *args, iters=8):
    jax.block_until_ready(f(*args)); ts = []
    for _ in range(iters):
        t0 = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / R


key = jax.random.PRNGKey(0)
wg, wu, wd = random_expert_weights(E, D, F)
rng = np.random.RandomState(0)
for n in map(int, a.tokens.split(",")):
    g = jnp.asarray(random_gates(rng, n, E, K)); x = jax.random.normal(key, (n, D), jnp.bfloat16)
    touched = int((np.asarray(g) != 0).any(0).sum())
    cur = ge.choose_blocks(n * K, E, D, F)
    bms = sorted(map(int, a.bm.split(","))) if a.bm else sorted({cur.bm, 64, 128} if n >= 1024 else {cur.bm})
    for bm, group in itertools.product(bms, map(int, a.groups.split(","))):
        layout = ge.pair_layout if n * K <= ge.PAIR_BLOCKS_MAX else ge.group_layout  # as grouped_swiglu chooses
        lay = layout(g, K, bm); nb = lay.block_expert.shape[0]; m = nb * bm
        used = int((np.asarray(lay.block_expert) >= 0).sum())
        xp = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])[lay.src_row]
        fl_a, fl_b = 2 * 2 * used * bm * D * F, 2 * used * bm * F * D
        by_a, by_b = touched * 2 * D * F * 2, touched * F * D * 2
        roof_a, roof_b = max(fl_a / rate, by_a / bw), max(fl_b / rate, by_b / bw)
        res_a, res_b = [], []
        if n >= 1024:
            pairs = ((32, 128), (64, 64), (64, 128), (64, 256), (128, 64), (128, 128))
            cand_a = [(x, y, w, s) for (x, y), w, s in itertools.product(pairs, (4, 8), (3, 4))]
            cand_b = [(x, y, w, s) for (x, y), w, s in itertools.product(pairs, (4, 8), (3, 4))]
        else:
            cand_a = [(bk, bf, w, s) for bk, bf, w, s in itertools.product((64, 128, 256), (32, 64, 128), (4,), (2, 3, 4))]
            cand_b = [(bf, bd, w, s) for bf, bd, w, s in itertools.product((64, 128, 256), (32, 64, 128), (4,), (2, 3, 4))]
        if a.focus:
            cand_a = [(64, 128, 8, 4), (64, 256, 8, 3), (64, 128, 8, 3), (128, 128, 8, 3), (64, 256, 8, 4)]
            cand_b = [(64, 256, 8, 4), (64, 256, 4, 4), (64, 128, 8, 4), (128, 128, 8, 3), (64, 128, 4, 3)]
            cand_a = list(dict.fromkeys([(cur.bk, cur.bf, cur.warps, cur.stages)] + cand_a))  # and the chosen tiles
            cand_b = list(dict.fromkeys([(cur.down.bf, cur.bd, cur.down.warps, cur.down.stages)] + cand_b))
        if a.quick:
            cand_a, cand_b = cand_a[::3], cand_b[::3]
        for bk, bf, w, s in cand_a:
            blk = ge.Blocks(bm=bm, bk=bk, bf=bf, bd=128, warps=w, stages=s, group=group)
            def ka(xp, be, wg, wu, blk=blk):
                return ge.gate_up(xp, be, wg, wu, blk)
            @jax.jit
            def chain(xp, be, wg, wu, ka=ka):
                for _ in range(R):
                    h = ka(xp, be, wg, wu); xp = xp.at[:, :1].add(h[:, :1])
                return xp
            try:
                t = timeit(chain, xp, lay.block_expert, wg, wu); res_a.append((t, (bk, bf, w, s)))
            except Exception as e:
                print(f"   A {bk, bf, w, s} failed: {str(e)[:100]}")
        for bf, bd, w, s in cand_b:
            blk = ge.Blocks(bm=bm, bk=64, bf=bf, bd=bd, warps=w, stages=s, group=group)
            h0 = jnp.zeros((m, F), jnp.bfloat16)
            def kb(h, be, wd, blk=blk):
                return ge.down_proj(h, be, wd, blk)
            @jax.jit
            def chain(h, be, wd, kb=kb):
                for _ in range(R):
                    y = kb(h, be, wd); h = h.at[:, :1].add(y[:, :1])
                return h
            try:
                t = timeit(chain, h0, lay.block_expert, wd); res_b.append((t, (bf, bd, w, s)))
            except Exception as e:
                print(f"   B {bf, bd, w, s} failed: {str(e)[:100]}")
        res_a.sort(); res_b.sort()
        cur_a = next((t for t, c in res_a if c == (cur.bk, cur.bf, cur.warps, cur.stages)), float("nan"))
        cur_b = next((t for t, c in res_b if c == (cur.down.bf, cur.bd, cur.down.warps, cur.down.stages)), float("nan"))
        print(f"n={n} bm={bm} group={group} blocks used {used}/{nb} touched {touched}: A roof {roof_a * 1e6:.0f} us, B roof {roof_b * 1e6:.0f} us; "
              f"current tile {cur} (A {cur_a * 1e6:.0f} us, B {cur_b * 1e6:.0f} us)")
        for t, c in res_a[:5]:
            print(f"   A bk,bf,warps,stages={c}: {t * 1e6:7.1f} us  {roof_a / t:5.1%} of roof, {fl_a / t / 1e12:6.1f} TF/s")
        for t, c in res_b[:5]:
            print(f"   B bf,bd,warps,stages={c}: {t * 1e6:7.1f} us  {roof_b / t:5.1%} of roof, {fl_b / t / 1e12:6.1f} TF/s")
        print(flush=True)
