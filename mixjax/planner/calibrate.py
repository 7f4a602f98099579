"""Calibration: measure the current devices and fit the cost model's parameters into a saved profile.

    python -m mixjax.plan calibrate [--mesh 2x4] [--out PATH] [--quick] [--plot PNG]

What is measured, always with every device of the mesh running at once (so that devices that share hardware,
such as simulated CPU devices sharing a few cores, are measured as they are used), in jitted programs, after
warm-up, each time the median of several runs ended by `block_until_ready`:

- collectives: all-reduce (psum), all-gather, reduce-scatter (psum_scatter), all-to-all over each mesh axis
  (`gpu` -> link "intra", `node` -> link "inter") and over both at once ("world"), for a range of sizes. Each
  program runs a chain of R collectives made dependent by an optimization barrier; the time per collective is
  (T_R - T_1) / (R - 1), which removes the program's launch cost.
- matmul rate: a chain of square matmuls per device (bf16, and f32 on CPU), same difference.
- memory bandwidth: a chain of elementwise passes over a large array per device (read + write counted).
- launch costs: the cost of one more small kernel (`op_overhead_s`, chain of tiny matmuls, divided by the
  kernels the compiled chain has) and of one jitted call (`step_overhead_s`).

Fit: per link and collective, `t = A(p) alpha + B(p) S / bw` with A, B the same ring coefficients the cost model
uses (all-reduce 2(p-1), 2(p-1)/p; the others p-1, (p-1)/p), by least squares on relative error, alpha, 1/bw >= 0.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import statistics
import time
from pathlib import Path

import numpy as np

from mixjax.planner.cost import coefficients
from mixjax.planner.presets import CLUSTER_PRESETS, ClusterSpec

PROFILE_SCHEMA = 1
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")  # all_gather before reduce_scatter
GROUPS = {"intra": ("gpu",), "inter": ("node",), "world": ("node", "gpu")}
_COLL_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_FREE_OPS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "partition-id", "replica-id",
             "after-all", "opt-barrier", "optimization-barrier"}


# ---------------------------------------------------------------- model coefficients and fitting
def fit_alpha_beta(kind: str, p: int, sizes, times) -> dict:
    """Least squares on relative error of t = A alpha + B S beta (beta = 1/bw), alpha >= 0, beta >= 0.
    Returns {"alpha": s, "bw": bytes/s, "rel_rms": relative RMS error of the fit}."""
    S, t = np.asarray(sizes, float), np.asarray(times, float)
    ok = np.isfinite(t) & (t > 0)  # a reduce-scatter obtained by subtraction can come out <= 0 in noise
    S, t = S[ok], t[ok]
    if len(t) < 2:
        return {"alpha": math.nan, "bw": math.nan, "rel_rms": math.nan}
    A, B = coefficients(kind, p)
    X = np.stack([np.full_like(S, A), B * S], axis=1) / t[:, None]
    y = np.ones_like(t)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    if coef[0] < 0 or coef[1] < 0:  # active constraint: refit with one of the two only, keep the better
        cands = []
        for j in (0, 1):
            c = np.zeros(2)
            col = X[:, j]
            c[j] = max(0.0, float(col @ y / (col @ col))) if col @ col > 0 else 0.0
            cands.append((float(np.sum((X @ c - y) ** 2)), c))
        coef = min(cands, key=lambda z: z[0])[1]
    alpha, beta = float(coef[0]), float(coef[1])
    rel = X @ coef - y
    return {"alpha": alpha, "bw": (1.0 / beta) if beta > 0 else math.inf,
            "rel_rms": float(np.sqrt(np.mean(rel ** 2)))}


def predict(kind: str, p: int, S: float, alpha: float, bw: float) -> float:
    A, B = coefficients(kind, p)
    return A * alpha + (B * S / bw if bw and math.isfinite(bw) else 0.0)


# ---------------------------------------------------------------- compiled-program kernel counting
def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """{computation name: instruction lines} and the ENTRY computation's name, from HLO text."""
    comps: dict[str, list[str]] = {}
    entry = None
    name = None
    for line in hlo_text.splitlines():
        m = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if m and not line.startswith(" "):
            name = m.group(2)
            comps[name] = []
            if m.group(1):
                entry = name
            continue
        if line.startswith("}"):
            name = None
            continue
        if name is not None and " = " in line:
            comps[name].append(line)
    return comps, entry


def count_kernels(hlo_text: str) -> dict[str, int]:
    """Kernels the compiled program launches per call: instructions of the ENTRY computation that do work
    (fusions, dots, copies, custom calls...), collectives counted apart; `call`s (e.g. XLA:GPU command buffers)
    are followed into the computation they call. A proxy, not a trace."""
    comps, entry = _computations(hlo_text)
    if entry is None:
        return {"kernels": 0, "collectives": 0}

    def count(name, depth=0):
        kernels = colls = 0
        for line in comps.get(name, []):
            rhs = line.split(" = ", 1)[1]
            m = re.search(r"(?:^|[\s})])([a-z][a-z0-9-]*)\(", rhs)
            if not m:
                continue
            op = m.group(1)
            if op in _FREE_OPS:
                continue
            if op == "call" and depth < 4:
                callee = re.search(r"to_apply=%?([\w.\-]+)", rhs)
                if callee and callee.group(1) in comps:
                    k, c = count(callee.group(1), depth + 1)
                    kernels, colls = kernels + k, colls + c
                    continue
            if any(op.startswith(c) for c in _COLL_OPS):
                if not op.endswith("-done"):
                    colls += 1
                continue
            if op.endswith("-done") or op.endswith("-start"):
                continue
            kernels += 1
        return kernels, colls

    k, c = count(entry)
    return {"kernels": k, "collectives": c}


# ---------------------------------------------------------------- measurement
# Statistic of the repeated timings: the median on accelerators; on CPU hosts, where other processes share the
# cores and only slow a run down, the minimum (set by calibrate() from the platform, recorded in the profile).
TIME_STAT = "median"


def _time(fn, args, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        _block(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _block(fn(*args))
        ts.append(time.perf_counter() - t0)
    return min(ts) if TIME_STAT == "min" else statistics.median(ts)


def _block(x):
    import jax  # noqa: PLC0415

    jax.block_until_ready(x)


def _all_devices_spec(mesh):
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    return P(tuple(mesh.axis_names))


def _sharded_input(mesh, per_device_shape, dtype, fill=1.0):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from jax.sharding import NamedSharding  # noqa: PLC0415

    n = mesh.devices.size
    spec = _all_devices_spec(mesh)
    shape = (n * per_device_shape[0],) + tuple(per_device_shape[1:])
    make = jax.jit(lambda: jnp.full(shape, fill, dtype), out_shardings=NamedSharding(mesh, spec))
    return make()


def _chain_program(mesh, body, R: int, consts: int = 0):
    """jit(shard_map) applying `body` (same shape in and out) R times in a row on every device: x <- body(x).
    Each step depends on the previous one through its data and an optimization barrier (which also keeps XLA
    from fusing elementwise steps together), so that the steps run one after another. `consts` more arguments,
    replicated, are passed to every body (x <- body(x, *consts)): operands such as weights that a real step
    receives as arguments rather than as compile-time constants."""
    import jax  # noqa: PLC0415
    from jax import lax  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    spec = _all_devices_spec(mesh)

    def local(x, *c):
        for _ in range(R):
            x = lax.optimization_barrier(body(x, *c))
        return x

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,) + (P(),) * consts, out_specs=spec,
                                 check_vma=False))


def _time_interleaved(fns, args, reps: int, warmup: int = 2) -> list[float]:
    """The statistic (TIME_STAT) of each fn's run time, the runs of the fns interleaved so that a change in the
    machine's load during the measurement affects them alike."""
    for fn in fns:
        for _ in range(warmup):
            _block(fn(*args))
    ts = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            _block(fn(*args))
            ts[i].append(time.perf_counter() - t0)
    return [min(t) if TIME_STAT == "min" else statistics.median(t) for t in ts]


def _per_run(mesh, body, x, R: int, reps: int, consts=()) -> tuple[float, object, float]:
    """Time of one `body`: the least-squares slope of T(r) over chains of r = 1, R/2 and R bodies (the
    intercept, a call's fixed cost, drops out). Returns (slope, the compiled R-chain, T(1))."""
    lengths = sorted({1, max(2, R // 2), R})
    fns = [_chain_program(mesh, body, r, len(consts)) for r in lengths]
    ts = _time_interleaved(fns, (x, *consts), reps)
    slope = float(np.polyfit(np.array(lengths, float), np.array(ts), 1)[0])
    return max(slope, 0.0), fns[-1], ts[0]


def _collective_body(kind: str, axes, p: int):
    """x -> x (same shape) around the collective: all-gather keeps its first 1/p rows; reduce-scatter is paired
    with an all-gather (the all-gather's time, measured alone, is then subtracted)."""
    from jax import lax  # noqa: PLC0415

    if kind == "all_reduce":
        return lambda x: lax.psum(x, axes)
    if kind == "all_gather":
        return lambda x: lax.all_gather(x, axes, axis=0, tiled=True)[: x.shape[0]]
    if kind == "reduce_scatter+all_gather":
        return lambda x: lax.all_gather(lax.psum_scatter(x, axes, scatter_dimension=0, tiled=True), axes, axis=0,
                                        tiled=True)
    if kind == "all_to_all":
        return lambda x: lax.all_to_all(x, axes, 0, 0, tiled=True)
    raise ValueError(kind)


def measure_collective(mesh, kind: str, axes, nbytes: int, dtype, R: int, reps: int,
                       all_gather_time: float | None = None) -> tuple[float, int]:
    """Seconds for one collective of S = nbytes (cost.py's convention: all-reduce / reduce-scatter input,
    all-gather output, all-to-all bytes each rank sends) over mesh `axes`, and the S actually used.
    reduce_scatter needs the all-gather time of the same S (measured first)."""
    import jax.numpy as jnp  # noqa: PLC0415

    p = math.prod(mesh.shape[a] for a in axes)
    item = jnp.dtype(dtype).itemsize
    rows = max(p, (nbytes // item // 256) // p * p)  # rows of 256 elements, a multiple of p
    per_dev = (rows // p, 256) if kind == "all_gather" else (rows, 256)
    x = _sharded_input(mesh, per_dev, dtype, fill=1.0 / p)
    body_kind = "reduce_scatter+all_gather" if kind == "reduce_scatter" else kind
    t, _, _ = _per_run(mesh, _collective_body(body_kind, tuple(axes), p), x, R, reps)
    if kind == "reduce_scatter":
        t = max(t - (all_gather_time or 0.0), 0.0)
    return t, rows * 256 * item


def measure_matmul(mesh, m: int, k: int, n: int, dtype, R: int, reps: int) -> float:
    """Seconds per [m, k] @ [k, n] matmul with every device of the mesh multiplying at once (the chain runs
    x <- (x @ w) @ w^T, two matmuls per step of the same FLOPs and narrowest dimension min(m, k, n)). The
    weight w is an argument of the program, as a model's weights are: XLA:CPU prepares (packs) a weight that is
    a compile-time constant once, and an argument on every call, which costs a product of few rows about as
    much as its arithmetic (2x on [8, 512] @ [512, 512])."""
    import jax.numpy as jnp  # noqa: PLC0415

    x = _sharded_input(mesh, (m, k), dtype, fill=1.0 / k)
    w = jnp.full((k, n), 1.0 / max(k, n), dtype)

    def body(a, w):
        h = jnp.matmul(a, w, preferred_element_type=jnp.float32).astype(a.dtype)
        return jnp.matmul(h, w.T, preferred_element_type=jnp.float32).astype(a.dtype)

    t, _, _ = _per_run(mesh, body, x, R, reps, consts=(w,))
    return t / 2


def fit_matmul(samples) -> dict:
    """Fit t = F/peak * (1 + w_half / w) to (F flops, narrow dimension w, t seconds) samples: the matmul rate
    peak * w / (w + w_half) of a matmul whose narrowest dimension is w (Hockney's n_1/2 applied to width)."""
    F = np.array([f for f, _, _ in samples], float)
    w = np.array([x for _, x, _ in samples], float)
    t = np.array([y for _, _, y in samples], float)
    ok = t > 0
    F, w, t = F[ok], w[ok], t[ok]
    X = np.stack([F, F / w], axis=1) / t[:, None]
    coef, *_ = np.linalg.lstsq(X, np.ones_like(t), rcond=None)
    if coef[1] < 0 or coef[0] <= 0:  # no width effect visible: peak only
        coef = np.array([float(np.median(t / F)), 0.0])
    peak = 1.0 / coef[0]
    rel = X @ coef - 1
    return {"peak": float(peak), "half_width": float(coef[1] * peak), "rel_rms": float(np.sqrt(np.mean(rel ** 2)))}


def measure_memory_bw(mesh, nbytes: int, dtype, R: int, reps: int, relayout: bool = False) -> float:
    """Bytes/s per device (read + write) of a pass over an nbytes array, all devices at once: elementwise
    (streaming), or with relayout=True a transpose of the last two axes (a layout change, as XLA inserts
    before batched dots)."""
    import jax.numpy as jnp  # noqa: PLC0415

    item = jnp.dtype(dtype).itemsize
    if relayout:  # [rows, 256, 16] <-> [rows, 16, 256]: the shape of a KV cache made ready for a batched dot
        rows = max(1, nbytes // item // 4096)
        x = _sharded_input(mesh, (rows, 256, 16), dtype)

        def body(a):
            return jnp.swapaxes(a, 1, 2).reshape(a.shape)
    else:
        rows = max(1, nbytes // item // 4096)
        x = _sharded_input(mesh, (rows, 4096), dtype)

        def body(a):
            return a * 0.5 + 1.0
    t, _, _ = _per_run(mesh, body, x, R, reps)
    return 2.0 * rows * 4096 * item / t if t > 0 else math.inf


def measure_launch(mesh, R: int, reps: int) -> dict:
    """Cost of one more small kernel inside a program, and of one jitted call (all devices at once).

    The chain's body is a mix of the small operations a decoder step is full of, on [64, 128] arrays: an RMS
    norm, a router-sized matmul, softmax, top-k, a sort, a scatter into a buffer and a gather. Its time per body
    over the number of kernels the compiler made of it is the per-kernel cost (launch + a small kernel's work)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from jax import lax  # noqa: PLC0415

    x = _sharded_input(mesh, (64, 128), jnp.float32, fill=0.1)
    w = jnp.full((128, 16), 0.01, jnp.float32)

    def body(a):
        y = a * lax.rsqrt(jnp.mean(a * a, axis=-1, keepdims=True) + 1e-6)
        p = jax.nn.softmax(y @ w, axis=-1)
        v, i = lax.top_k(p, 2)
        rows = jnp.argsort(i[:, 0])
        buf = jnp.zeros_like(a).at[rows].set(y * v[:, :1])
        return a + buf[::-1] * 0.5

    R = max(16, 2 * R)  # a long chain, so that the difference stands out of the noise
    t, fr, t1 = _per_run(mesh, body, x, R, reps)
    k = count_kernels(fr.lower(x).compile().as_text())["kernels"]
    k1 = count_kernels(_chain_program(mesh, body, 1).lower(x).compile().as_text())["kernels"]
    per_body = max(1.0, (k - k1) / (R - 1))
    return {"op_overhead_s": t / per_body, "kernels_per_body": per_body, "step_overhead_s": max(0.0, t1 - t)}


# Qwen3-30B-A3B's expert shapes: the grouped-kernel probe (GPU calibration) measures there the kernels that
# grouped_swiglu runs (Triton; on Hopper GPUs the Mosaic GPU kernels for prompts' 128-row blocks)
GROUPED_PROBE = dict(d_model=2048, d_ff=768, experts=128, top_k=8, tokens=(64, 1024, 2048, 8192))
GROUPED_PROBE_QUICK = dict(GROUPED_PROBE, tokens=(64, 2048))
# forced on a CPU (--grouped on): the kernels run interpreted, so only a small shape is affordable
GROUPED_PROBE_INTERPRET = dict(d_model=64, d_ff=32, experts=8, top_k=2, tokens=(8, 16, 64))  # pair, expert, sorted


def _uniform_gates(n: int, e: int, k: int, seed: int = 0):
    """[n, e] float32 gates with k non-zeros per row at uniformly random experts (weights summing to 1)."""
    rng = np.random.RandomState(seed)
    ids = np.argsort(rng.random_sample((n, e)), axis=1)[:, :k]
    w = rng.random_sample((n, k)).astype(np.float32) + 0.1
    g = np.zeros((n, e), np.float32)
    np.put_along_axis(g, ids, w / w.sum(1, keepdims=True), axis=1)
    return g


def measure_grouped_experts(d_model: int, d_ff: int, experts: int, top_k: int, tokens, dtype, reps: int,
                            interpret: bool = False) -> dict:
    """Achieved rates of the grouped expert kernels (mixjax.kernels.grouped_experts, the real `grouped_swiglu`)
    on one device, per row-block size BM.

    For each token count n (uniform top-k routing): the whole `grouped_swiglu` call, and the same call without
    its two Pallas kernels (the layout: top-k, sort, scatters, the gather of x into the padded buffer; and the
    combine: the gather of the [n, k, D] outputs and the weighted sum), each timed R times (TIME_STAT). The
    kernels' time is the difference. With this routing's exact blocks (from its layout, `make_layout`) and the cost
    model's work of the two kernels (`grouped_expert_cost`: FLOPs 2 * 3 D F per padded row; bytes = each block's
    expert weights once + the x / h / y rows), the achieved matmul rate FLOPs / t and bandwidth bytes / t
    per BM are what `impl_step_cost` then charges the kernels at (the roofline of the two)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from jax import lax  # noqa: PLC0415

    from mixjax.kernels.grouped_experts import choose_blocks, grouped_swiglu, make_layout  # noqa: PLC0415

    dt = jnp.dtype(dtype)
    d, f, e, k = d_model, d_ff, experts, top_k
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    wg = (jax.random.normal(keys[0], (e, d, f), jnp.float32) * 0.02).astype(dt)
    wu = (jax.random.normal(keys[1], (e, d, f), jnp.float32) * 0.02).astype(dt)
    wd = (jax.random.normal(keys[2], (e, f, d), jnp.float32) * 0.02).astype(dt)
    samples = []
    for n in tokens:
        blk = choose_blocks(n * k, e, d, f, rows=n)
        if blk is None:
            continue
        x = jax.random.normal(jax.random.fold_in(keys[3], n), (n, d), jnp.float32).astype(dt)
        gates = jnp.asarray(_uniform_gates(n, e, k, seed=n))

        # the weights are arguments (closed over, 1.2 GB of them would be compiled in as constants)
        def full(x, g, wg, wu, wd, blk=blk):
            return grouped_swiglu(x, g, wg, wu, wd, k=k, blk=blk, interpret=interpret)

        def around(x, g, *_, blk=blk):  # grouped_swiglu's layout and combine, the padded x standing in for y
            _, lay = make_layout(g, k, blk.bm)
            m = lay.block_expert.shape[0] * blk.bm
            if lay.src_row is None:  # expert layout: x padded is its whole copy; row r of every block stands for x[r]
                y, idx = jnp.pad(x, ((0, blk.bm - x.shape[0]), (0, 0))), lay.dest % blk.bm
            else:
                y, idx = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[lay.src_row], jnp.minimum(lay.dest, m - 1)
            rows = lax.optimization_barrier(y)[idx]
            rows = jnp.where((lay.dest < m)[..., None], rows.astype(jnp.float32), 0.0)
            return jnp.einsum("nkd,nk->nd", rows, lay.weight).astype(x.dtype)

        t_full, t_around = _time_interleaved([jax.jit(full), jax.jit(around)], (x, gates, wg, wu, wd), reps)
        blocks = int(np.sum(np.asarray(make_layout(gates, k, blk.bm)[1].block_expert) >= 0))
        padded = blocks * blk.bm
        flops = 2.0 * 3 * d * f * padded
        nbytes = blocks * 3.0 * d * f * dt.itemsize + padded * (2 * d + 2 * f) * dt.itemsize
        t_k = t_full - t_around
        samples.append({"tokens": n, "bm": blk.bm, "blocks": blocks, "padded_rows": padded, "flops": flops,
                        "kernel_bytes": nbytes, "t_full_s": t_full, "t_layout_combine_s": t_around,
                        "t_kernels_s": t_k})
    rates = {}
    for bm in sorted({s["bm"] for s in samples}):
        pts = [s for s in samples if s["bm"] == bm and s["t_kernels_s"] > 0]
        if pts:
            t = sum(s["t_kernels_s"] for s in pts)
            rates[str(bm)] = {"flops": sum(s["flops"] for s in pts) / t, "bw": sum(s["kernel_bytes"] for s in pts) / t}
    return {"shape": {"d_model": d, "d_ff": f, "experts": e, "top_k": k}, "dtype": str(dt),
            "interpret": interpret, "samples": samples, "rates": rates}


# ---------------------------------------------------------------- plan of measurements
@dataclasses.dataclass
class Settings:
    coll_sizes: tuple[int, ...]
    chain: int
    reps: int
    matmul_mk: tuple[int, int]  # rows and contraction of the width sweep
    matmul_widths: tuple[int, ...]
    mem_bytes: int
    # contraction and columns of a second sweep whose narrow dimension is the rows, as in a decode step's
    # products (CPU, where a product of few rows pays the per-call preparation of its weight; None: not swept)
    matmul_rows_kn: tuple[int, int] | None = None


def settings_for(platform: str, quick: bool) -> Settings:
    K, M = 1024, 1024 * 1024
    if platform == "cpu":
        if quick:
            return Settings((4 * K, 64 * K, 1 * M), chain=4, reps=5, matmul_mk=(512, 256),
                            matmul_widths=(8, 32, 128, 512), mem_bytes=4 * M, matmul_rows_kn=(256, 1024))
        return Settings((4 * K, 16 * K, 64 * K, 256 * K, 1 * M, 4 * M), chain=6, reps=9, matmul_mk=(1024, 256),
                        matmul_widths=(8, 16, 32, 64, 128, 256, 512), mem_bytes=16 * M, matmul_rows_kn=(256, 1024))
    if quick:
        return Settings((64 * K, 1 * M, 16 * M, 128 * M), chain=4, reps=5, matmul_mk=(8192, 4096),
                        matmul_widths=(128, 512, 2048, 8192), mem_bytes=256 * M)
    return Settings((4 * K, 16 * K, 64 * K, 256 * K, 1 * M, 4 * M, 16 * M, 64 * M, 256 * M), chain=8, reps=11,
                    matmul_mk=(8192, 4096), matmul_widths=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
                    mem_bytes=1024 * M)


def _loadavg() -> list[float] | None:
    """The host's 1, 5 and 15 minute load averages (other processes competing for the cores), if known."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def default_mesh_shape(n_devices: int) -> str:
    return f"2x{n_devices // 2}" if n_devices >= 4 and n_devices % 2 == 0 else f"1x{n_devices}"


def device_memory_bytes(device, n_devices: int) -> float | None:
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 (CPU and some backends do not implement it)
        stats = {}
    if stats.get("bytes_limit"):
        return float(stats["bytes_limit"])
    if device.platform == "cpu":
        return device_memory_bytes_cpu(n_devices)
    return None


def calibrate(mesh_shape: str | None = None, quick: bool = False, dtype: str | None = None,
              progress: bool = True, log=print, grouped: bool | None = None, grouped_probe: dict | None = None,
              ) -> dict:
    """Measure the current devices; returns the profile dict (see save_profile). grouped: also probe the
    grouped expert kernels (`measure_grouped_experts`; default: on GPU only, where mixjax runs them; elsewhere
    they would run interpreted), on `grouped_probe` shapes (default GROUPED_PROBE, or GROUPED_PROBE_QUICK)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    from mixjax.sharding.mesh import make_mesh  # noqa: PLC0415

    devices = jax.devices()
    dev = devices[0]
    platform = dev.platform
    mesh_shape = mesh_shape or default_mesh_shape(len(devices))
    mesh = make_mesh(mesh_shape, devices)
    nodes, gpus = int(mesh.shape["node"]), int(mesh.shape["gpu"])
    st = settings_for(platform, quick)
    global TIME_STAT
    TIME_STAT = "min" if platform == "cpu" else "median"
    coll_dtype = jnp.dtype(dtype or ("float32" if platform == "cpu" else "bfloat16"))
    mm_dtypes = ["bfloat16", "float32"] if platform == "cpu" else ["bfloat16"]
    groups = {name: axes for name, axes in GROUPS.items() if math.prod(mesh.shape[a] for a in axes) > 1}
    if "world" in groups and (nodes == 1 or gpus == 1):
        groups.pop("world")  # same ranks as the one axis of size > 1
    jobs = [("launch", None, None, None)]
    jobs += [("matmul", None, d, w) for d in mm_dtypes for w in st.matmul_widths]
    if st.matmul_rows_kn:
        jobs += [("matmul_rows", None, d, w) for d in mm_dtypes for w in st.matmul_widths]
    jobs += [("memory", None, None, None), ("relayout", None, None, None)]
    jobs += [("coll", g, k, s) for g in groups for k in COLLECTIVES for s in st.coll_sizes]
    if grouped if grouped is not None else platform == "gpu":
        jobs.append(("grouped", None, None, None))
    samples: dict = {g: {k: [] for k in COLLECTIVES} for g in groups}
    ag_time: dict = {}
    mm_samples: dict = {d: [] for d in mm_dtypes}
    mm_rows: dict = {d: [] for d in mm_dtypes}
    compute: dict = {"matmul_flops": {}, "matmul_half_width": {}, "matmul_shape": list(st.matmul_mk)}
    t_start = time.perf_counter()
    load_start = _loadavg()
    bar = tqdm(jobs, desc=f"calibrate {platform} {mesh_shape}", disable=not progress, leave=False)
    for what, group, kind, size in bar:
        bar.set_postfix_str(f"{what} {group or ''} {kind or ''} {size or ''}".strip())
        if what == "launch":
            compute.update(measure_launch(mesh, st.chain, st.reps))
        elif what == "matmul":
            m_, k_ = st.matmul_mk
            t = measure_matmul(mesh, m_, k_, size, jnp.dtype(kind), max(3, st.chain // 2), st.reps)
            mm_samples[kind].append([2.0 * m_ * k_ * size, min(m_, k_, size), t])
        elif what == "matmul_rows":
            k_, n_ = st.matmul_rows_kn
            t = measure_matmul(mesh, size, k_, n_, jnp.dtype(kind), max(3, st.chain // 2), st.reps)
            mm_rows[kind].append([2.0 * size * k_ * n_, min(size, k_, n_), t])
        elif what in ("memory", "relayout"):
            key = "mem_bw" if what == "memory" else "relayout_bw"
            compute[key] = measure_memory_bw(mesh, st.mem_bytes, jnp.float32, max(3, st.chain), st.reps,
                                             relayout=what == "relayout")
        elif what == "grouped":
            probe = dict(grouped_probe or (GROUPED_PROBE_INTERPRET if platform != "gpu" else
                                           GROUPED_PROBE_QUICK if quick else GROUPED_PROBE))
            compute["grouped_experts"] = measure_grouped_experts(
                **probe, dtype=jnp.bfloat16 if platform != "cpu" else jnp.float32, reps=st.reps,
                interpret=platform != "gpu")
        else:
            axes = groups[group]
            t, nbytes = measure_collective(mesh, kind, axes, size, coll_dtype, st.chain, st.reps,
                                           all_gather_time=ag_time.get((group, size)))
            if kind == "all_gather":
                ag_time[(group, size)] = t
            samples[group][kind].append([nbytes, t])
    bar.close()
    for d, pts in mm_samples.items():
        f = fit_matmul(pts + mm_rows[d])  # one width curve over both sweeps
        compute["matmul_flops"][d] = f["peak"]
        compute["matmul_half_width"][d] = f["half_width"]
        compute.setdefault("matmul_fit_rel_rms", {})[d] = f["rel_rms"]
    compute["matmul_samples"] = mm_samples
    if st.matmul_rows_kn:
        compute["matmul_rows_samples"], compute["matmul_rows_shape"] = mm_rows, list(st.matmul_rows_kn)
    fits: dict = {}
    for g, axes in groups.items():
        p = math.prod(mesh.shape[a] for a in axes)
        fits[g] = {"axes": list(axes), "p": p}
        for k in COLLECTIVES:
            pts = samples[g][k]
            fits[g][k] = dict(fit_alpha_beta(k, p, [s for s, _ in pts], [t for _, t in pts]), samples=pts)
        rs, ag = fits[g]["reduce_scatter"], fits[g]["all_gather"]
        if not math.isfinite(rs["alpha"]):  # too few usable samples: the ring all-gather's mirror image
            rs.update(alpha=ag["alpha"], bw=ag["bw"], note="from all_gather (reduce-scatter samples unusable)")
    prof = {
        "schema": PROFILE_SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform, "device_kind": dev.device_kind, "device_count": len(devices),
        "mesh": f"{nodes}x{gpus}", "quick": quick, "collective_dtype": str(coll_dtype), "statistic": TIME_STAT,
        "jax_version": jax.__version__, "seconds": round(time.perf_counter() - t_start, 2),
        "load_average": {"start": load_start, "end": _loadavg()},
        "hbm_bytes": device_memory_bytes(dev, len(devices)),
        "compute": compute, "collectives": fits,
        "notes": "all rates per device with every device of the mesh busy at once",
    }
    return prof


# ---------------------------------------------------------------- profile files and the cluster they describe
def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "unknown"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mixjax"


def default_profile_path(platform: str, device_kind: str, n_devices: int) -> Path:
    return cache_dir() / f"profile-{_slug(platform)}-{_slug(device_kind)}-{n_devices}.json"


def save_profile(profile: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(profile, indent=1, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x))


def load_profile(path: str | Path) -> dict:
    prof = json.loads(Path(path).read_text())
    problems = [k for k in ("schema", "platform", "device_kind", "device_count", "mesh", "compute", "collectives")
                if k not in prof]
    if problems:
        raise ValueError(f"{path}: not a mixjax calibration profile (missing {problems})")
    if prof["schema"] != PROFILE_SCHEMA:
        raise ValueError(f"{path}: profile schema {prof['schema']} != {PROFILE_SCHEMA}; re-run calibrate")
    prof["_path"] = str(path)
    return prof


def print_profile(prof: dict, log=print) -> None:
    c = prof["compute"]
    log(f"profile: {prof['platform']} / {prof['device_kind']} x {prof['device_count']}, mesh {prof['mesh']}, "
        f"{prof['date']}{' (quick)' if prof.get('quick') else ''}, {prof.get('seconds', 0):.1f} s")
    mm = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s (half rate at width {c['matmul_half_width'][k]:.0f})"
                   for k, v in c["matmul_flops"].items())
    log(f"  per device, all devices busy: matmul {mm}; memory {c['mem_bw'] / 1e9:.3g} GB/s streaming, "
        f"{c.get('relayout_bw', c['mem_bw']) / 1e9:.3g} GB/s transposing; kernel {c['op_overhead_s'] * 1e6:.2f} us; "
        f"call {c['step_overhead_s'] * 1e6:.1f} us")
    for d, pts in c.get("matmul_samples", {}).items():
        log(f"  matmul {d} [{c['matmul_shape'][0]}x{c['matmul_shape'][1]}] @ [.. x width]: " + "  ".join(
            f"w{w:.0f}:{f / t / 1e12:.3g}" if t > 0 else f"w{w:.0f}:-" for f, w, t in pts) + " TFLOP/s")
    for d, pts in c.get("matmul_rows_samples", {}).items():
        kk, nn = c["matmul_rows_shape"]
        log(f"  matmul {d} [rows x {kk}] @ [{kk}x{nn}]: " + "  ".join(
            f"r{w:.0f}:{f / t / 1e12:.3g}" if t > 0 else f"r{w:.0f}:-" for f, w, t in pts) + " TFLOP/s")
    ge = c.get("grouped_experts")
    if ge:
        sh = ge["shape"]
        log(f"  grouped expert kernels (D {sh['d_model']}, F {sh['d_ff']}, {sh['experts']} experts, top-"
            f"{sh['top_k']}, {ge['dtype']}{', interpreted' if ge.get('interpret') else ''}): " + "  ".join(
                f"{s['tokens']} tokens BM {s['bm']}: {s['t_full_s'] * 1e6:.0f} us (kernels "
                f"{s['t_kernels_s'] * 1e6:.0f})" for s in ge["samples"]))
        log("    achieved per BM: " + "  ".join(f"BM {bm}: {r['bw'] / 1e9:.4g} GB/s, {r['flops'] / 1e12:.4g} TFLOP/s"
                                               for bm, r in ge["rates"].items()))
    if prof.get("hbm_bytes"):
        log(f"  device memory {prof['hbm_bytes'] / 2**30:.1f} GiB")
    if not prof["collectives"]:
        log("  collectives: none (one device)")
        return
    log(f"  {'link':<6} {'p':>2} {'collective':<15} {'alpha us':>9} {'bw GB/s':>9} {'fit rms':>8}   samples "
        "(bytes: measured us / fitted us)")
    for g, f in prof["collectives"].items():
        for k in COLLECTIVES:
            r = f[k]
            pts = "  ".join(f"{_h(s)}:{t * 1e6:.0f}/{predict(k, f['p'], s, r['alpha'], r['bw']) * 1e6:.0f}"
                            for s, t in r["samples"])
            bw = r["bw"] / 1e9 if math.isfinite(r["bw"]) else math.inf
            log(f"  {g:<6} {f['p']:>2} {k:<15} {r['alpha'] * 1e6:9.2f} {bw:9.3g} {r['rel_rms']:8.1%}   {pts}")


def _h(n: float) -> str:
    for unit, v in (("M", 2**20), ("K", 2**10)):
        if n >= v:
            return f"{n / v:.0f}{unit}"
    return f"{n:.0f}"


def plot_profile(prof: dict, path: str | Path) -> Path:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    groups = list(prof["collectives"])
    fig, axs = plt.subplots(1, max(1, len(groups)), figsize=(5 * max(1, len(groups)), 4), squeeze=False)
    for ax, g in zip(axs[0], groups):
        f = prof["collectives"][g]
        for k in COLLECTIVES:
            r = f[k]
            s = np.array([a for a, _ in r["samples"]], float)
            t = np.array([b for _, b in r["samples"]], float)
            line, = ax.loglog(s, t * 1e6, "o", label=f"{k} (a={r['alpha'] * 1e6:.1f}us, bw={r['bw'] / 1e9:.3g}GB/s)")
            xs = np.geomspace(s.min(), s.max(), 50)
            ax.loglog(xs, [predict(k, f["p"], x, r["alpha"], r["bw"]) * 1e6 for x in xs], "-", color=line.get_color())
        ax.set_title(f"{g} ({'x'.join(f['axes'])}, p={f['p']})")
        ax.set_xlabel("bytes S")
        ax.set_ylabel("us")
        ax.legend(fontsize=6)
    fig.suptitle(f"{prof['device_kind']} x{prof['device_count']} mesh {prof['mesh']}: measured (dots), fitted (lines)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------- the "current devices" cluster
def nameplate_for(device_kind: str) -> str | None:
    """Nameplate cluster preset for a GPU's device_kind, e.g. 'NVIDIA H100 80GB HBM3' -> 'h100-ib'."""
    kind = device_kind.upper()
    for key, preset in (("H200", "h200-ib"), ("H800", "h800-roce"), ("H100", "h100-ib"), ("H20", "h20-roce")):
        if key in kind:
            return preset
    return None


# Order-of-magnitude numbers for a CPU host running simulated devices, used only when no profile exists. Not a
# measurement of this machine: run `python -m mixjax.plan calibrate` for that.
CPU_ESTIMATE = dict(peak_flops=2e10, hbm_bw=5e9, intra_bw=1e9, intra_alpha=30e-6, inter_bw=1e9, inter_alpha=30e-6)


def cluster_from_profile(prof: dict, nodes: int | None = None, gpus: int | None = None,
                         dtype: str | None = None) -> ClusterSpec:
    """ClusterSpec whose numbers are the profile's measurements. Links the profile could not measure (one
    device; one node) keep the nameplate preset of the device kind, or the CPU estimate; `source` says so."""
    pn, pg = (int(v) for v in prof["mesh"].split("x"))
    c = prof["compute"]
    mm = c["matmul_flops"]
    dtype = dtype or ("bfloat16" if "bfloat16" in mm else next(iter(mm)))
    base_name = nameplate_for(prof["device_kind"]) if prof["platform"] != "cpu" else None
    base = CLUSTER_PRESETS.get(base_name) if base_name else None
    fallback = dict(CPU_ESTIMATE) if base is None else dict(
        intra_bw=base.intra_bw, intra_alpha=base.intra_alpha, inter_bw=base.inter_bw, inter_alpha=base.inter_alpha)
    fits = {g: {k: {"alpha": f[k]["alpha"], "bw": f[k]["bw"]} for k in ("all_reduce", "all_gather",
                                                                           "reduce_scatter", "all_to_all")}
            for g, f in prof["collectives"].items()}
    links = {}
    missing = []
    for link_name in ("intra", "inter"):
        if link_name in fits:
            links[f"{link_name}_alpha"] = fits[link_name]["all_reduce"]["alpha"]
            links[f"{link_name}_bw"] = fits[link_name]["all_reduce"]["bw"]
        else:
            links[f"{link_name}_alpha"] = fallback[f"{link_name}_alpha"]
            links[f"{link_name}_bw"] = fallback[f"{link_name}_bw"]
            missing.append(link_name)
    hbm = prof.get("hbm_bytes") or (base.hbm_bytes if base else 16 * 2**30)
    path = prof.get("_path", "")
    src = (f"calibrated profile {path or '(in memory)'} ({prof['device_kind']} x{prof['device_count']}, mesh "
           f"{prof['mesh']}, {prof['date'][:10]}, matmul rate {dtype})")
    if missing:
        src += (f"; {' and '.join(missing)} link(s) not measured: "
                + (f"nameplate {base_name} numbers" if base else "built-in CPU estimate"))
    return ClusterSpec(
        name=f"profile:{path}" if path else "current", nodes=nodes or pn, gpus_per_node=gpus or pg,
        hbm_bytes=float(hbm), hbm_bw=float(c["mem_bw"]), peak_flops=float(mm[dtype]),
        mm_half_width=float(c.get("matmul_half_width", {}).get(dtype, 0.0)),
        relayout_bw=float(c.get("relayout_bw", 0.0)),
        grouped_rates={int(bm): (float(r["flops"]), float(r["bw"]))
                       for bm, r in c.get("grouped_experts", {}).get("rates", {}).items()} or None,
        collectives=fits, calib_mesh=(pn, pg), op_overhead=float(c.get("op_overhead_s", 0.0)),
        step_overhead=float(c.get("step_overhead_s", 0.0)), source=src,
        platform=prof["platform"], **links)


def builtin_cluster(platform: str, device_kind: str, n_devices: int, nodes: int, gpus: int,
                    why: str = "") -> ClusterSpec:
    """A cluster for the current devices without measuring them: the nameplate preset of a known GPU, else
    the CPU estimate (order of magnitude only)."""
    name = nameplate_for(device_kind) if platform != "cpu" else None
    if name:
        cl = CLUSTER_PRESETS[name].with_shape(nodes, gpus)
        return dataclasses.replace(cl, source=f"nameplate {name} numbers for {device_kind}{why}", platform=platform)
    if platform != "cpu":
        cl = CLUSTER_PRESETS["h100-ib"].with_shape(nodes, gpus)
        return dataclasses.replace(cl, source=f"unknown device {device_kind!r}: nameplate h100-ib numbers{why}",
                                   platform=platform)
    mem = device_memory_bytes_cpu(n_devices)
    return ClusterSpec(name="cpu-estimate", nodes=nodes, gpus_per_node=gpus, hbm_bytes=mem,
                       source=f"built-in CPU estimate (order of magnitude, not measured){why}", platform="cpu",
                       **CPU_ESTIMATE)


def device_memory_bytes_cpu(n_devices: int) -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) / max(1, n_devices)
    except (ValueError, OSError, AttributeError):
        return 4.0 * 2**30


def current_cluster(nodes: int | None = None, gpus: int | None = None, profile: str | Path | None = None,
                    dtype: str | None = None) -> ClusterSpec:
    """The cluster of the devices this process sees: from `profile`, else $MIXJAX_PROFILE, else the default
    profile path of this platform / device kind / device count if it exists, else the built-in estimate.
    ClusterSpec.source says which."""
    import jax  # noqa: PLC0415

    devices = jax.devices()
    dev = devices[0]
    path = profile or os.environ.get("MIXJAX_PROFILE") or default_profile_path(dev.platform, dev.device_kind,
                                                                                len(devices))
    if Path(path).is_file():
        return cluster_from_profile(load_profile(path), nodes, gpus, dtype)
    if profile:
        raise FileNotFoundError(f"calibration profile {profile} does not exist")
    why = f"; no calibration profile at {path} (python -m mixjax.plan calibrate writes one)"
    return builtin_cluster(dev.platform, dev.device_kind, len(devices), nodes or 1, gpus or len(devices), why)


def resolve_cluster(spec: str, nodes: int | None = None, gpus: int | None = None,
                    dtype: str | None = None) -> ClusterSpec:
    """'current', 'profile:PATH' or a preset name -> ClusterSpec (shape overridden by nodes / gpus)."""
    from mixjax.planner.presets import cluster_preset  # noqa: PLC0415

    if spec == "current":
        return current_cluster(nodes, gpus, dtype=dtype)
    if spec.startswith("profile:"):
        return cluster_from_profile(load_profile(spec[len("profile:"):]), nodes, gpus, dtype)
    cl = cluster_preset(spec, nodes, gpus)
    return dataclasses.replace(cl, source=f"nameplate {cl.name} numbers (uncalibrated)")
