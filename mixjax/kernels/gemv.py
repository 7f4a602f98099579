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

For the MoE half of a batch-1 layer (models.base.MoE.one_token) the router's product also takes the residual sum
(`add`: h = x + attention output, computed by every program as it reads the row) and writes out the normed row it
read as a 16-row tensor-core tile (`emit`) for the expert kernels: XLA's residual add, norm, pair layout and row
gather were four kernels between the attention and the experts.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mixjax.kernels import pow2_divisor, triton_params


def supported(n: int, k: int, gpu: bool = True) -> bool:
    """Triton tiles powers of two: every program reads the whole input row, so on a GPU K must be one (from 16);
    interpreted, any K with a factor of 16."""
    return n > 0 and k % 16 == 0 and (not gpu or k & (k - 1) == 0)


def tiles(n: int, k: int) -> tuple[int, int, int]:
    """(bn, bk, warps): rows per program, elements of a row per load, warps. A sweep on an H200 (2026-12-01,
    Qwen3-30B-A3B's q/k/o/router shapes, tools/probe_gemv.py --sweep) put 2-4 rows, 2048-element loads and 8
    warps first for every shape, within ~5% of 8 rows and 1024 elements: many programs, few wide loads."""
    return min(4, n & -n), min(2048, k & -k), 8


def _kernel(x_ref, *refs, starts: tuple[int, ...], bn: int, bk: int, eps: float | None, add: bool, emit: int):
    n_w = len(starts) - 1
    add_ref = refs[0] if add else None
    refs = refs[1:] if add else refs
    w_refs = refs[:n_w]
    norm_ref = refs[n_w] if eps is not None else None
    o_refs = refs[len(refs) - n_w - bool(emit):len(refs) - bool(emit)]
    k_dim = x_ref.shape[-1]
    dtype = x_ref.dtype
    pid = pl.program_id(0)

    def row(ks):
        """Elements ks of the input row: x, or the residual sum x + add rounded to x's dtype (as XLA adds them)."""
        if add_ref is None:
            return x_ref[0, ks]
        return (x_ref[0, ks].astype(jnp.float32) + add_ref[0, ks].astype(jnp.float32)).astype(dtype)

    inv = None
    if eps is not None:
        xf = row(pl.ds(0, k_dim)).astype(jnp.float32)
        inv = lax.rsqrt(jnp.sum(xf * xf) / k_dim + eps)

    def operand(ks):
        """Elements ks of the row the products read: the input row, RMS-normed when there is a norm."""
        xk = row(ks)
        if inv is not None:
            xk = norm_ref[ks] * (xk.astype(jnp.float32) * inv).astype(dtype)
        return xk

    def project(w_ref, o_ref, row0):
        acc = jnp.zeros((bn, bk), jnp.float32)  # per-lane partial sums: one cross-thread reduction, at the end
        for j in range(k_dim // bk):  # unrolled: the loads are independent and Triton issues them ahead
            xk = operand(pl.ds(j * bk, bk))
            acc += w_ref[pl.ds(row0, bn), pl.ds(j * bk, bk)].astype(jnp.float32) * xk.astype(jnp.float32)[None, :]
        o_ref[0, pl.ds(row0, bn)] = jnp.sum(acc, axis=1).astype(o_ref.dtype)

    for i in range(n_w):  # weight i owns programs [starts[i], starts[i + 1])
        pl.when((pid >= starts[i]) & (pid < starts[i + 1]))(
            functools.partial(project, w_refs[i], o_refs[i], (pid - starts[i]) * bn))

    if emit:
        # Also written out: the row the products read, as the first of `emit` rows whose others are zeros (a
        # tensor-core tile for the kernels after it: a batch-1 MoE's experts). Every program writes a slice of
        # columns of it, so that no program's tail grows.
        cols = k_dim // pow2_divisor(k_dim, min(starts[-1], k_dim // 16))

        @pl.when(pid < k_dim // cols)
        def _():
            ks = pl.ds(pid * cols, cols)
            top = lax.broadcasted_iota(jnp.int32, (emit, cols), 0) == 0
            refs[-1][:, ks] = jnp.where(top, jnp.broadcast_to(operand(ks)[None, :], (emit, cols)),
                                        jnp.zeros((emit, cols), dtype))


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "block", "emit", "out_dtype"))
def gemv_many(x, ws, *, norm=None, eps: float | None = None, add=None, emit: int = 0, interpret: bool = False,
              block: tuple[int, int, int] | None = None, out_dtype=None):
    """x [1, K], ws: weights [N_i, K] -> a tuple of [1, N_i] in x's dtype (or `out_dtype`: a router's float32
    logits), (norm(x) if `norm` is given) @ w_i.T with products accumulated in float32, one kernel for all.
    `norm` is an RMSNorm weight [K] applied with `eps`;
    `add` [1, K], when given, is added to x first (in x's dtype: the residual sum h = x + add of a decoder layer);
    `emit` = R > 0 also returns the row the products read (norm(x + add)) on top of R - 1 zero rows, [R, K] in x's
    dtype, after the outputs (the 16-row tile that the one-token expert kernels read for every expert);
    `block` overrides `tiles` (bn, bk, warps)."""
    ws = tuple(ws)
    rows, k_dim = x.shape
    if rows != 1 or not ws or any(w.ndim != 2 or w.shape[1] != k_dim or not supported(w.shape[0], k_dim,
                                                                                      gpu=not interpret) for w in ws):
        raise ValueError(f"gemv takes one row [1, K] and out-major weights [N, K] with K a power of two from 16 "
                         f"(interpreted: a multiple of 16); got x {x.shape}, w {[w.shape for w in ws]}")
    if (norm is None) != (eps is None):
        raise ValueError("gemv: pass the RMSNorm weight and its eps together")
    if add is not None and add.shape != x.shape:
        raise ValueError(f"gemv: the row to add must have x's shape {x.shape}; got {add.shape}")
    bn, bk, warps = block or tiles(math.gcd(*(w.shape[0] for w in ws)), k_dim)
    if any(w.shape[0] % bn for w in ws) or k_dim % bk:
        raise ValueError(f"gemv: block {(bn, bk)} does not divide the weights {[w.shape for w in ws]}")
    starts = tuple(itertools.accumulate((w.shape[0] // bn for w in ws), initial=0))
    args = ([x] + ([add.astype(x.dtype)] if add is not None else []) + list(ws)
            + ([norm.astype(x.dtype)] if norm is not None else []))
    outs = tuple(jax.ShapeDtypeStruct((1, w.shape[0]), out_dtype or x.dtype) for w in ws)
    outs += (jax.ShapeDtypeStruct((emit, k_dim), x.dtype),) if emit else ()
    params = triton_params(warps, 1, interpret)
    return tuple(pl.pallas_call(
        functools.partial(_kernel, starts=starts, bn=bn, bk=bk, eps=eps, add=add is not None, emit=emit),
        out_shape=outs, grid=(starts[-1],), compiler_params=params, interpret=interpret, name="gemv",
    )(*args))


def gemv(x, w, *, norm=None, eps: float | None = None, interpret: bool = False,
         block: tuple[int, int, int] | None = None):
    """x [1, K], w [N, K] -> [1, N]: gemv_many with one weight."""
    return gemv_many(x, (w,), norm=norm, eps=eps, interpret=interpret, block=block)[0]
