"""Hopper (Mosaic GPU, warp-specialised wgmma + TMA) expert kernels against the Triton ones, on a GPU: the same
outputs on every used block, and the time of each (chained R times in one jit) for a few tilings, Qwen3-30B-A3B
expert shapes; each tiling also given the layout's source rows (`src_row`: a warpgroup whose rows are all padding
skips its products). A development tool:
    python tools/probe_hopper_experts.py 2048,4096,8192 [--quick] [--deepseek | --shape E,K,D,F] [--bm 64]
(--shape: other experts, e.g. Qwen3-235B-A22B's 128,8,4096,1536)"""
import argparse, dataclasses
import jax, jax.numpy as jnp, numpy as np
from mixjax.kernels import grouped_experts as ge, grouped_experts_hopper as gh
from mixjax.bench.experts import random_expert_weights, random_gates, measure_hbm_bandwidth, measure_matmul_rate
from chain_timing import seconds_per_call

ap = argparse.ArgumentParser(); ap.add_argument("tokens"); ap.add_argument("--quick", action="store_true")
ap.add_argument("--deepseek", action="store_true"); ap.add_argument("--shape", help="E,K,D,F")
ap.add_argument("--bm", type=int, default=128, help="rows per block: 128, or 64 (tiles split by columns: each "
                "compute warpgroup takes all 64 rows; less padding when experts hold one or two blocks of rows)")
ap.add_argument("--skip-only", action="store_true", help="time each tiling with the padding skip only")
a = ap.parse_args()
E, K, D, F, R = (256, 8, 7168, 2048, 4) if a.deepseek else (128, 8, 2048, 768, 10)
if a.shape:
    E, K, D, F = map(int, a.shape.split(",")); R = 10 if D <= 2048 else 4
bw, rate = measure_hbm_bandwidth(), measure_matmul_rate()
print(f"{jax.devices()[0].device_kind} cc {getattr(jax.devices()[0], 'compute_capability', '?')} "
      f"SMs {getattr(jax.devices()[0], 'core_count', '?')}; HBM {bw / 1e12:.2f} TB/s, matmul {rate / 1e12:.0f} TF/s; "
      f"hopper_available {gh.hopper_available()}", flush=True)


def timeit(kern, *args):
    """Seconds per kernel call (`chain_timing`)."""
    return seconds_per_call(kern, R, *args)


key = jax.random.PRNGKey(0)
wg, wu, wd = random_expert_weights(E, D, F)
rng = np.random.RandomState(0)
for n in map(int, a.tokens.split(",")):
    g = jnp.asarray(random_gates(rng, n, E, K)); x = jax.random.normal(key, (n, D), jnp.bfloat16)
    cur = ge.choose_blocks(n * K, E, D, F)
    bm = a.bm
    lay = ge.group_layout(g, K, bm); nb = lay.block_expert.shape[0]; m = nb * bm
    be = np.asarray(lay.block_expert); used = int((be >= 0).sum())
    xp = ge.gather_rows_xla(x, lay)
    blk = dataclasses.replace(cur, bm=bm) if cur.bm != bm else cur
    fl_a, fl_b = 2 * 2 * n * K * D * F, 2 * n * K * F * D  # the pairs' products, not the padding rows
    br = (np.asarray(lay.src_row) < n).reshape(nb, bm).sum(1)[:used]  # rows holding pairs per used block
    pad = dict(src_row=lay.src_row, n_x=n)
    print(f"n={n}: {used}/{nb} blocks of {bm} rows used, {br.sum() / (used * bm):.1%} of their rows hold pairs, "
          f"{(br <= bm // 2).mean():.1%} of them at most half full; triton tiles {blk}", flush=True)
    # exactness: Hopper vs Triton on the used rows
    h_t = ge.gate_up(xp, lay.block_expert, wg, wu, blk)
    y_t = ge.down_proj(h_t, lay.block_expert, wd, blk)
    rows = used * bm
    T = gh.HopperTiles
    if bm == 64:  # split by columns (the padding skip is by rows: it does not apply)
        cands_a = [T(128, 64, "n", 4, epi=64), T(128, 64, "n", 4, epi=64, chain=True), T(128, 64, "n", 3, epi=64),
                   T(256, 64, "n", 2, epi=64)]  # each lowers for CUDA (checked on the CPU)
        cands_b = [T(256, 64, "n", 4, epi=64, chain=True), T(256, 64, "n", 4, epi=64), T(128, 64, "n", 4),
                   T(256, 64, "n", 2, chain=True)]
    else:
        cands_a = [gh.GATE_UP_TILES, T(128, 64, "m", 4, epi=64, chain=True), T(128, 64, "m", 2, epi=64, chain=True),
                   T(128, 64, "m", 4, epi=64)]
        cands_b = [gh.DOWN_TILES, T(256, 64, "m", 4, epi=64, chain=True), T(256, 64, "m", 3, epi=64, chain=True),
                   T(256, 64, "m", 2, chain=True)]
    real = np.concatenate([np.arange(b * bm, b * bm + r) for b, r in enumerate(br)])  # rows holding pairs

    def error(out, ref):
        """max |hopper - triton| on the rows holding pairs (each timed tiling is checked)."""
        return np.abs(np.asarray(out[:rows], np.float32)[real] - np.asarray(ref[:rows], np.float32)[real]).max()

    print(f"   max |triton| on those rows: A {np.abs(np.asarray(h_t[:rows], np.float32)[real]).max():.3g}, "
          f"B {np.abs(np.asarray(y_t[:rows], np.float32)[real]).max():.3g}", flush=True)
    t = timeit(lambda xx, b, w1, w2: ge.gate_up(xx, b, w1, w2, blk), xp, lay.block_expert, wg, wu)
    print(f"   triton A {t * 1e6:7.1f} us {fl_a / t / rate:5.1%} of matmul", flush=True)
    tb = timeit(lambda hh, b, w: ge.down_proj(hh, b, w, blk), h_t, lay.block_expert, wd)
    print(f"   triton B {tb * 1e6:7.1f} us {fl_b / tb / rate:5.1%} of matmul", flush=True)
    if a.quick:
        cands_a, cands_b = cands_a[:2], cands_b[:2]
    for c in cands_a:
        for skip in (True,) if a.skip_only else (False, True):
            r = pad if skip else {}
            try:
                t = timeit(lambda xx, b, w1, w2, c=c, r=r: gh.gate_up(xx, b, w1, w2, c, **r),
                           xp, lay.block_expert, wg, wu)
                err = error(gh.gate_up(xp, lay.block_expert, wg, wu, c, **r), h_t)
                print(f"   hopper A {c}{' skipping' if skip else ''}: {t * 1e6:7.1f} us {fl_a / t / rate:5.1%} of matmul"
                      f"; max |hopper - triton| {err:.3g}", flush=True)
            except Exception as ex:
                print(f"   hopper A {c} failed: {type(ex).__name__}: {str(ex)[:2000]}", flush=True)
    for c in cands_b:
        for skip in (True,) if a.skip_only else (False, True):
            r = pad if skip else {}
            try:
                t = timeit(lambda hh, b, w, c=c, r=r: gh.down_proj(hh, b, w, c, **r),
                           h_t, lay.block_expert, wd)
                err = error(gh.down_proj(h_t, lay.block_expert, wd, c, **r), y_t)
                print(f"   hopper B {c}{' skipping' if skip else ''}: {t * 1e6:7.1f} us {fl_b / t / rate:5.1%} of matmul"
                      f"; max |hopper - triton| {err:.3g}", flush=True)
            except Exception as ex:
                print(f"   hopper B {c} failed: {type(ex).__name__}: {str(ex)[:2000]}", flush=True)
