"""The MoE layer's entry for a prompt in one pass (Pallas, Triton backend; `interpret=True` runs it anywhere):

    h = x + a                        (the residual stream after attention, in x's dtype)
    n = post_norm(h)                 (RMSNorm: statistics in float32, the normalised row rounded before the weight)
    logits = n W_router^T            (float32 accumulation, rounded to x's dtype as `layers.matmul` rounds it)

XLA makes four kernels of it on a GPU: h and the statistics (it writes h / rms), the weight's multiply (writes n
again), the router product split over K in eight (an [8, rows, E] float32 partial written and read back) and the sum
of the partials. On an H200 they took ~27 us per layer of a 2048-token Qwen3-30B-A3B prompt for ~6 us of bytes
(docs/BENCHMARKS.md). Here one program per tile of rows reads x and a twice (statistics, then the normalised row;
the second read comes from L2), writes n once and multiplies each column chunk of n by the router's weight as it goes.

The arithmetic is the XLA path's (`base.DecoderLayer`, `layers.RMSNorm`, `layers.matmul`), rounding included; only
the order of the float32 sums differs (the statistics' and the product's).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mixjax.kernels import pow2_divisor, triton_params
from mixjax.models.layers import matmul

ROWS = 32  # rows per program
CHUNK = 256  # columns per step of the loops over a row
WARPS = 8
MIN_ROWS = 512  # from here the kernel is taken (prompts); below, XLA's kernels (decode steps; not measured)


def supported(d_model: int) -> bool:
    """The row's column chunks are Triton blocks: a power of two of 16 columns or more that divides d_model. (Rows
    are padded to a multiple of 16, the least Triton's matrix product takes; experts to a power of two, 16 or
    more.)"""
    return d_model % 16 == 0


def _kernel(x_ref, a_ref, nw_ref, w_ref, n_ref, logits_ref, *, eps: float, chunk: int, d: int):
    """w_ref, logits_ref None: the normed rows only."""
    dt = n_ref.dtype
    f32 = jnp.float32
    rows = x_ref.shape[0]
    steps = d // chunk

    def residual(c):  # h = x + a, rounded to x's dtype as XLA's add is
        cols = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
        return cols, (x_ref[:, cols].astype(f32) + a_ref[:, cols].astype(f32)).astype(dt).astype(f32)

    def square_sum(c, acc):
        _, h = residual(c)
        return acc + jnp.sum(h * h, axis=1)

    inv_rms = lax.rsqrt(lax.fori_loop(0, steps, square_sum, jnp.zeros((rows,), f32)) / d + eps)

    def normalise_and_route(c, acc):
        cols, h = residual(c)
        n = (nw_ref[cols].astype(f32)[None, :] * (h * inv_rms[:, None]).astype(dt).astype(f32)).astype(dt)
        n_ref[:, cols] = n
        if w_ref is None:
            return acc
        return acc + lax.dot_general(n, w_ref[:, cols], (((1,), (1,)), ((), ())), preferred_element_type=f32)

    if w_ref is None:
        lax.fori_loop(0, steps, normalise_and_route, 0)
        return
    logits = lax.fori_loop(0, steps, normalise_and_route, jnp.zeros((rows, w_ref.shape[0]), f32))
    logits_ref[...] = logits.astype(dt)


def _norm_kernel(x_ref, a_ref, nw_ref, n_ref, *, eps: float, chunk: int, d: int):
    _kernel(x_ref, a_ref, nw_ref, None, n_ref, None, eps=eps, chunk=chunk, d=d)


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "rows", "chunk", "warps", "stages", "fuse_router"))
def add_norm_router(x, a, norm_w, router_w, *, eps: float, interpret: bool = False, rows: int = ROWS,
                    chunk: int = CHUNK, warps: int = WARPS, stages: int = 1, fuse_router: bool = True):
    """For x, a [n, D] (the residual stream and the attention's output), norm_w [D] and the router's weight stored
    out-major, [E, D]: (n = RMSNorm(norm_w, eps)(x + a) [n, D], logits = n W^T [n, E]), both in x's dtype."""
    n_rows, d = x.shape
    e = router_w.shape[0]
    if not supported(d):
        raise ValueError(f"add_norm_router: rows of {d} (the column chunks need a multiple of 16)")
    m = -(-n_rows // 16) * 16  # a prompt's rows are a bucket's, a power of two: nothing to pad
    e_pad = max(16, 1 << (e - 1).bit_length())
    pad = lambda v, rows, cols: v if (rows, cols) == v.shape else jnp.pad(v, ((0, rows - v.shape[0]),
                                                                             (0, cols - v.shape[1])))
    r, c = pow2_divisor(m, rows), pow2_divisor(d, chunk)
    if not fuse_router:
        n = pl.pallas_call(
            functools.partial(_norm_kernel, eps=eps, chunk=c, d=d),
            out_shape=jax.ShapeDtypeStruct((m, d), x.dtype), grid=(m // r,),
            in_specs=[pl.BlockSpec((r, d), lambda i: (i, 0)), pl.BlockSpec((r, d), lambda i: (i, 0)),
                      pl.BlockSpec((d,), lambda i: (0,))],
            out_specs=pl.BlockSpec((r, d), lambda i: (i, 0)),
            compiler_params=triton_params(warps, stages, interpret), interpret=interpret, name="add_norm",
        )(pad(x, m, d), pad(a.astype(x.dtype), m, d), norm_w)[:n_rows]
        return n, matmul(n, router_w.T)
    n, logits = pl.pallas_call(
        functools.partial(_kernel, eps=eps, chunk=c, d=d),
        out_shape=(jax.ShapeDtypeStruct((m, d), x.dtype), jax.ShapeDtypeStruct((m, e_pad), x.dtype)),
        grid=(m // r,),
        in_specs=[pl.BlockSpec((r, d), lambda i: (i, 0)), pl.BlockSpec((r, d), lambda i: (i, 0)),
                  pl.BlockSpec((d,), lambda i: (0,)), pl.BlockSpec((e_pad, d), lambda i: (0, 0))],
        out_specs=(pl.BlockSpec((r, d), lambda i: (i, 0)), pl.BlockSpec((r, e_pad), lambda i: (i, 0))),
        compiler_params=triton_params(warps, stages, interpret), interpret=interpret, name="add_norm_router",
    )(pad(x, m, d), pad(a.astype(x.dtype), m, d), norm_w, pad(router_w.T, d, e_pad).T)
    return n[:n_rows], logits[:n_rows, :e]
