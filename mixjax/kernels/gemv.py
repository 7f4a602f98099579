"""One row times several weight matrices, one kernel (Pallas, Triton backend; `interpret=True` runs it anywhere).

A batch-1 decode step multiplies one row by each projection. XLA runs each as a split-K matrix product of two rows
(`layers.matmul` keeps one row from becoming multiply + reduce) plus a kernel that sums the split-K parts, and it
merges the q / k / v products into one and slices the result apart: on an H200 (2026-11-29) the q/k/v projection
of a Qwen3-30B-A3B layer took ~15 us in six kernels for 21 MB of weights (5 us at the HBM bandwidth).

Here each program owns `bn` output columns of one of the matrices and streams their whole contraction dimension in
`bk`-row tiles: out[j] = sum_i x[i] W[i, j], float32 accumulation, on the CUDA cores (one row needs no tensor core;
the weights' bytes are the cost). Narrow column tiles give a few hundred programs, all resident at once, so every SM
keeps loads in flight. Several matrices (q, k, v) are one launch: program p finds its matrix from its index.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

BN = 16  # output columns per program
BK = 256  # contraction rows per step
ENABLED = os.environ.get("MIXJAX_GEMV", "1") != "0"  # MIXJAX_GEMV=0: XLA's products instead (for comparisons)


def supported(x_rows: int, weights) -> bool:
    """One row, and matrices with one contraction dimension."""
    return x_rows == 1 and len({w.shape[0] for w in weights}) == 1


def _pow2_divisor(n: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def _kernel(x_ref, *refs, starts: tuple[int, ...], k_dim: int, bn: int, bk: int):
    w_refs, o_refs = refs[:len(starts)], refs[len(starts):]
    p = pl.program_id(0)
    for i, (w_ref, o_ref) in enumerate(zip(w_refs, o_refs)):
        first, end = starts[i], starts[i] + w_ref.shape[1] // bn

        @pl.when((p >= first) & (p < end))
        def _():
            cols = pl.ds((p - first) * bn, bn)

            def step(t, acc):  # elementwise products only; one reduction over the tile's rows at the end
                ks = pl.ds(t * bk, bk)
                return acc + x_ref[0, ks].astype(jnp.float32)[:, None] * w_ref[ks, cols].astype(jnp.float32)

            acc = lax.fori_loop(0, k_dim // bk, step, jnp.zeros((bk, bn), jnp.float32))
            o_ref[0, cols] = jnp.sum(acc, axis=0).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret", "warps", "stages", "bn", "bk"))
def gemv(x, weights, *, out_dtype=None, interpret: bool = False, warps: int = 4, stages: int = 4, bn: int = BN,
         bk: int = BK):
    """(x @ W for W in weights) for one row x [1, K] and matrices [K, N_i]: a tuple of [1, N_i] in out_dtype
    (default x's dtype). Tiles: bn / bk, or the largest powers of two that divide the shapes."""
    weights = tuple(weights)
    out_dtype = out_dtype or x.dtype
    k_dim = x.shape[-1]
    bk = _pow2_divisor(k_dim, bk)
    bn = min(_pow2_divisor(w.shape[1], bn) for w in weights)
    starts, total = [], 0
    for w in weights:
        starts.append(total)
        total += w.shape[1] // bn
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        params = pltriton.CompilerParams(num_warps=warps, num_stages=stages)
    return tuple(pl.pallas_call(
        functools.partial(_kernel, starts=tuple(starts), k_dim=k_dim, bn=bn, bk=bk),
        out_shape=tuple(jax.ShapeDtypeStruct((1, w.shape[1]), out_dtype) for w in weights),
        grid=(total,), compiler_params=params, interpret=interpret, name="gemv",
    )(x.reshape(1, k_dim), *weights))
