"""Time one MoE layer's routed experts, dense vs grouped, against the HBM and matmul rooflines.

    python -m mixjax.bench.experts --experts 128 --top-k 8 --d-model 2048 --d-ff 768 --tokens 1,8,32,128,256,2048

Random bf16 weights [E, D, F], random top-k routing (uniform over experts, distinct per token). For each token
count: the exact number of experts the routing touches, the bytes that must be read (touched experts' weights +
activations), the time of the dense einsum over all experts and of the grouped Pallas kernels, the grouped
output's error against the dense one, and each time's ratio to max(bytes / HBM bandwidth, FLOPs / matmul rate),
both measured in the same run. `--tile bm,bk,bf,bd,warps,stages[,b_bk,b_warps,b_stages,group]` overrides the
tile choice (for tuning).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mixjax.kernels.grouped_experts import Blocks, choose_blocks, grouped_swiglu


def timeit(fn, *args, iters: int = 20) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_seconds_per_op(op, inputs, r_lo: int = 2, r_hi: int = 8, reps: int = 5) -> float:
    """Device seconds of one `op(*inputs[i])`: programs running the op on r_lo and on r_hi different inputs in one
    jit, each the best of `reps` runs, and the slope between them, so that the call's dispatch and the host's wait
    (tens of us on a GPU, several % of a 1 ms op) drop out. Distinct inputs keep XLA from merging the ops."""
    best = {}
    for r in (r_lo, r_hi):
        f = jax.jit(lambda ins, r=r: [op(*ins[i]) for i in range(r)])
        args = inputs[:r]
        jax.block_until_ready(f(args))
        t = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(f(args))
            t = min(t, time.perf_counter() - t0)
        best[r] = t
    return max((best[r_hi] - best[r_lo]) / (r_hi - r_lo), 1e-12)


def measure_hbm_bandwidth(n_bytes: int | None = None) -> float:
    """The best rate the memory sustains, bytes read per second: the faster of two read probes over an n_bytes bf16
    matrix (2 GiB on accelerators), device time per op (device_seconds_per_op): a product of 8 rows by the matrix
    (the access pattern of a decode step's weight reads, a matrix product as XLA emits it for a decode batch) and a
    reduction over its rows. Earlier versions timed one call per sync and used a single-row product, which XLA
    turns into multiply + reduce: they read 2.9-3.6 TB/s on an H200 while the LM head's product streamed at 4.4,
    putting measured/roofline above 100%. Taking the fastest keeps the rooflines from flattering what they are
    compared with."""
    if n_bytes is None:
        n_bytes = (2 << 30) if jax.default_backend() != "cpu" else (64 << 20)
    cols = 16384
    rows = n_bytes // 2 // cols
    w = jnp.ones((rows, cols), jnp.bfloat16)
    vs = [jnp.full((8, rows), 1.0 + i, jnp.bfloat16) for i in range(8)]
    cs = [jnp.full((1, cols), 1.0 + i, jnp.bfloat16) for i in range(8)]
    gemm = device_seconds_per_op(lambda v, a: jnp.dot(v, a, preferred_element_type=jnp.float32), [(v, w) for v in vs])
    red = device_seconds_per_op(lambda a, c: jnp.sum(a * c, axis=0, dtype=jnp.float32), [(w, c) for c in cs])
    return n_bytes / min(gemm, red)


def measure_matmul_rate(n: int | None = None, dtype=jnp.bfloat16) -> float:
    """FLOP/s of a large square matmul (8192 on accelerators), device time per op (device_seconds_per_op), the
    faster of two forms (output in the input dtype, and float32 output): the rate the device can reach, for
    "fraction of the matmul rate". Earlier versions timed one call per sync, which cost an H200 ~10-25% of it."""
    if n is None:
        n = 8192 if jax.default_backend() != "cpu" else 1024
    b = jnp.ones((n, n), dtype)
    ins = [(jnp.full((n, n), 1.0 + i / 8, dtype), b) for i in range(8)]
    t = min(device_seconds_per_op(lambda x, y: jnp.dot(x, y), ins),
            device_seconds_per_op(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32), ins))
    return 2 * n ** 3 / t


def dense_experts(x, gates, wg, wu, wd):
    g = jnp.einsum("nd,edf->enf", x, wg, preferred_element_type=jnp.float32)
    u = jnp.einsum("nd,edf->enf", x, wu, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(g) * u).astype(x.dtype)
    y = jnp.einsum("enf,efd->end", h, wd, preferred_element_type=jnp.float32)
    return jnp.einsum("end,ne->nd", y, gates).astype(x.dtype)


def random_expert_weights(e: int, d: int, f: int):
    """bf16 (w_gate, w_up [e, d, f], w_down [e, f, d]) drawn from N(0, 0.02^2): the benchmarks' and tools' experts."""
    key = jax.random.PRNGKey(0)
    wg, wu = (jax.random.normal(kk, (e, d, f), jnp.bfloat16) * 0.02 for kk in jax.random.split(key, 2))
    return wg, wu, jax.random.normal(jax.random.PRNGKey(1), (e, f, d), jnp.bfloat16) * 0.02


def random_gates(rng, n: int, e: int, k: int) -> np.ndarray:
    g = np.zeros((n, e), np.float32)
    for i in range(n):
        g[i, rng.choice(e, k, replace=False)] = rng.dirichlet(np.ones(k))
    return g


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--d-ff", type=int, default=768)
    ap.add_argument("--tokens", default="1,8,32,128,256,2048")
    ap.add_argument("--tile", action="append", default=[],
                    help="bm,bk,bf,bd,warps,stages[,b_bk,b_warps,b_stages,group] (repeatable)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense baseline (slow at large token counts)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    e, k, d, f = args.experts, args.top_k, args.d_model, args.d_ff
    rng = np.random.RandomState(0)
    wg, wu, wd = random_expert_weights(e, d, f)
    bw, rate = measure_hbm_bandwidth(), measure_matmul_rate()
    print(f"{jax.devices()[0].device_kind}: HBM {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s; "
          f"E={e} k={k} D={d} F={f}")
    print(f"{'tokens':>7s} {'touched':>7s} {'roof us':>8s} {'dense us':>9s} {'grp us':>8s} {'grp/roof':>8s} "
          f"{'tile':>22s} {'max err':>8s}")
    rows = []
    for n in (int(t) for t in args.tokens.split(",")):
        gates = random_gates(rng, n, e, k)
        touched = int((gates != 0).any(0).sum())
        x = jax.random.normal(jax.random.PRNGKey(n), (n, d), jnp.bfloat16)
        g = jnp.asarray(gates)
        bytes_ = touched * 3 * d * f * 2 + 2 * n * d * 2
        flops = 2 * 3 * n * k * d * f
        roof = max(bytes_ / bw, flops / rate)
        ref = None
        t_dense = float("nan")
        if not args.no_dense:
            dense = jax.jit(dense_experts)
            t_dense = timeit(dense, x, g, wg, wu, wd, iters=args.iters)
            ref = dense(x, g, wg, wu, wd).astype(jnp.float32)
        tiles = [Blocks(*map(int, t.split(","))) for t in args.tile] or [choose_blocks(n * k, e, d, f)]
        for blk in tiles:
            fn = jax.jit(lambda *a, blk=blk: grouped_swiglu(*a, k=k, blk=blk))
            t = timeit(fn, x, g, wg, wu, wd, iters=args.iters)
            err = float("nan")
            if ref is not None:
                out = fn(x, g, wg, wu, wd).astype(jnp.float32)
                err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
            tile = ",".join(str(v) for v in dataclasses.astuple(blk))
            print(f"{n:7d} {touched:7d} {roof * 1e6:8.1f} {t_dense * 1e6:9.1f} {t * 1e6:8.1f} {roof / t:8.1%} "
                  f"{tile:>22s} {err:8.1e}", flush=True)
            rows.append(dict(tokens=n, touched=touched, bytes=bytes_, flops=flops, roofline_s=roof,
                             dense_s=t_dense, grouped_s=t, tile=tile, rel_err=err))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "hbm_bw": bw, "matmul_rate": rate,
                       "args": vars(args), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
