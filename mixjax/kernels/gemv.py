"""One-row products for batch-1 decode: y_i = (RMSNorm(x) or x) @ W_i^T for one or several weights (a layer's q, k
and v) in one kernel (Pallas, Triton backend; `interpret=True` runs it anywhere).

At batch 1 every projection of a decode step reads its whole weight for one row of work. XLA turns a one-row
product into multiply + reduce (5x too slow); given two rows it makes a split-K GEMM, a reduction of the split
partial sums and a slice back to one row (layers.matmul), and the RMSNorm before it is two more kernels. On an H200
a Qwen3-30B-A3B decode layer spent ~30 us in those ~15 kernels for ~40 MB of weights (2026-12-01).

Here the weight is stored out-major, W [N, K] (Hugging Face's own layout), so each program streams whole rows:
program i computes y[i*bn:(i+1)*bn] from bn contiguous rows of K elements. The input row is small (K <= 8192), so
every program reads all of it and, with `norm`, computes the RMSNorm itself (statistics in float32, the weight
applied in x's dtype, as layers.RMSNorm) instead of a separate kernel writing the normed row. Several weights
that share the input take consecutive ranges of programs of one launch: a 2 MB k or v projection alone is mostly a
kernel's start-up and tail (3.4 us in a batch-1 step for 0.5 us of traffic), but beside q's it fills the same wave.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mixjax.kernels import triton_params


def supported(n: int, k: int, gpu: bool = True) -> bool:
    """Triton tiles powers of two: every program reads the whole input row, so on a GPU K must be one (from 16);
    interpreted, any K with a factor of 16."""
    return n > 0 and k % 16 == 0 and (not gpu or k & (k - 1) == 0)


def tiles(n: int, k: int) -> tuple[int, int, int]:
    """(bn, bk, warps): rows per program, elements of a row per load, warps. A sweep on an H200 (2026-12-01,
    Qwen3-30B-A3B's q/k/o/router shapes, tools/probe_gemv.py --sweep) put 2-4 rows, 2048-element loads and 8
    warps first for every shape, within ~5% of 8 rows and 1024 elements: many programs, few wide loads."""
    return min(4, n & -n), min(2048, k & -k), 8


def _kernel(x_ref, *refs, starts: tuple[int, ...], bn: int, bk: int, eps: float | None):
    n_w = len(starts) - 1
    w_refs, o_refs = refs[:n_w], refs[len(refs) - n_w:]
    norm_ref = refs[n_w] if eps is not None else None
    k_dim = x_ref.shape[-1]
    dtype = x_ref.dtype
    pid = pl.program_id(0)
    inv = None
    if eps is not None:
        xf = x_ref[0, :].astype(jnp.float32)
        inv = lax.rsqrt(jnp.sum(xf * xf) / k_dim + eps)

    def project(w_ref, o_ref, row0):
        acc = jnp.zeros((bn, bk), jnp.float32)  # per-lane partial sums: one cross-thread reduction, at the end
        for j in range(k_dim // bk):  # unrolled: the loads are independent and Triton issues them ahead
            xk = x_ref[0, pl.ds(j * bk, bk)]
            if inv is not None:
                xk = norm_ref[pl.ds(j * bk, bk)] * (xk.astype(jnp.float32) * inv).astype(dtype)
            acc += w_ref[pl.ds(row0, bn), pl.ds(j * bk, bk)].astype(jnp.float32) * xk.astype(jnp.float32)[None, :]
        o_ref[0, pl.ds(row0, bn)] = jnp.sum(acc, axis=1).astype(dtype)

    for i in range(n_w):  # weight i owns programs [starts[i], starts[i + 1])
        pl.when((pid >= starts[i]) & (pid < starts[i + 1]))(
            functools.partial(project, w_refs[i], o_refs[i], (pid - starts[i]) * bn))


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "block"))
def gemv_many(x, ws, *, norm=None, eps: float | None = None, interpret: bool = False,
              block: tuple[int, int, int] | None = None):
    """x [1, K], ws: weights [N_i, K] -> a tuple of [1, N_i] in x's dtype, (norm(x) if `norm` is given) @ w_i.T
    with products accumulated in float32, one kernel for all. `norm` is an RMSNorm weight [K] applied with `eps`;
    `block` overrides `tiles` (bn, bk, warps)."""
    ws = tuple(ws)
    rows, k_dim = x.shape
    if rows != 1 or not ws or any(w.ndim != 2 or w.shape[1] != k_dim or not supported(w.shape[0], k_dim,
                                                                                      gpu=not interpret) for w in ws):
        raise ValueError(f"gemv takes one row [1, K] and out-major weights [N, K] with K a power of two from 16 "
                         f"(interpreted: a multiple of 16); got x {x.shape}, w {[w.shape for w in ws]}")
    if (norm is None) != (eps is None):
        raise ValueError("gemv: pass the RMSNorm weight and its eps together")
    bn, bk, warps = block or tiles(math.gcd(*(w.shape[0] for w in ws)), k_dim)
    if any(w.shape[0] % bn for w in ws) or k_dim % bk:
        raise ValueError(f"gemv: block {(bn, bk)} does not divide the weights {[w.shape for w in ws]}")
    starts = tuple(itertools.accumulate((w.shape[0] // bn for w in ws), initial=0))
    args = [x, *ws] + ([norm.astype(x.dtype)] if norm is not None else [])
    params = triton_params(warps, 1, interpret)
    return tuple(pl.pallas_call(
        functools.partial(_kernel, starts=starts, bn=bn, bk=bk, eps=eps),
        out_shape=tuple(jax.ShapeDtypeStruct((1, w.shape[0]), x.dtype) for w in ws), grid=(starts[-1],),
        compiler_params=params, interpret=interpret, name="gemv",
    )(*args))


def gemv(x, w, *, norm=None, eps: float | None = None, interpret: bool = False,
         block: tuple[int, int, int] | None = None):
    """x [1, K], w [N, K] -> [1, N]: gemv_many with one weight."""
    return gemv_many(x, (w,), norm=norm, eps=eps, interpret=interpret, block=block)[0]
