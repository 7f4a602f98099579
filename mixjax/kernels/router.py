"""Softmax top-k routing of a few tokens (decode) in two Pallas kernels instead of XLA's five.

For one or two tokens XLA runs the router as a split-K product, its reduction, a softmax, a sort for the top-k
and the renormalisation: five kernels of 1-3 us for ~0.5 MB of weights (H200, 2026-11-29). Here:
1. partial logits: program i multiplies the (padded) tokens by rows [i*bd, (i+1)*bd) of the router weight;
2. one program sums the partials, rounds the logits to the model dtype (as `layers.matmul` does), takes the
   float32 softmax over the experts and picks the top k by repeated arg-max (lowest index first among equal
   probabilities, as lax.top_k), optionally renormalising the k weights.
Semantics are those of `Qwen3MoE.route`. A number of experts that is not a power of two is padded (with a
copy of the router weight per call; the real models' 64, 128 and 256 need none). `interpret=True` runs the kernels anywhere (the CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

ROWS = 16  # tokens per call (the smallest tensor-core tile); more tokens take XLA's router


def supported(tokens: int, d_model: int, num_experts: int) -> bool:
    return tokens <= ROWS and d_model % 16 == 0 and num_experts <= 1024


def _split(d_model: int, num_experts: int) -> int:
    """Rows of the weight per program: about 16 KB each, a power of two dividing d_model."""
    bd = 16
    while bd * 2 * num_experts * 2 <= 16384 and d_model % (bd * 2) == 0:
        bd *= 2
    return bd


def _logits_kernel(x_ref, w_ref, o_ref, *, bd: int):
    i = pl.program_id(0)
    ks = pl.ds(i * bd, bd)
    o_ref[i, :, :] = jnp.dot(x_ref[:, ks], w_ref[ks, :], preferred_element_type=jnp.float32)


def _top_k_kernel(part_ref, ids_ref, w_ref, *, splits: int, k: int, norm: bool, dtype, experts: int):
    rows, e = part_ref.shape[1], part_ref.shape[2]
    logits = lax.fori_loop(0, splits, lambda i, acc: acc + part_ref[i, :, :], jnp.zeros((rows, e), jnp.float32))
    col = lax.broadcasted_iota(jnp.int32, (rows, e), 1)
    logits = jnp.where(col < experts, logits.astype(dtype).astype(jnp.float32), -jnp.inf)  # padding columns: none
    ex = jnp.exp(logits - jnp.max(logits, axis=1)[:, None])
    probs = ex / jnp.sum(ex, axis=1)[:, None]
    out_col = lax.broadcasted_iota(jnp.int32, ids_ref.shape, 1)
    ids = jnp.zeros(ids_ref.shape, jnp.int32)
    ws = jnp.zeros(w_ref.shape, jnp.float32)
    left = probs
    for j in range(k):
        best = jnp.max(left, axis=1)
        idx = jnp.min(jnp.where(left == best[:, None], col, e), axis=1)
        ids = jnp.where(out_col == j, idx[:, None], ids)
        ws = jnp.where(out_col == j, best[:, None], ws)
        left = jnp.where(col == idx[:, None], -jnp.inf, left)
    if norm:
        ws = ws / jnp.sum(ws, axis=1)[:, None]
    ids_ref[...] = ids
    w_ref[...] = ws


@functools.partial(jax.jit, static_argnames=("k", "norm", "interpret"))
def softmax_top_k(x, w, *, k: int, norm: bool, interpret: bool = False):
    """x [n, D] (n <= ROWS), router weight w [D, E] -> (ids [n, k] int32, weights [n, k] in x's dtype): the top k
    of softmax(x w) over the experts, renormalised over the k when `norm`."""
    n, d = x.shape
    experts = w.shape[1]
    e = max(16, 1 << (experts - 1).bit_length())  # Triton tiles are powers of two: padding experts never win
    if e != experts:
        w = jnp.pad(w, ((0, 0), (0, e - experts)))
    bd = _split(d, e)
    splits = d // bd
    kp = max(16, 1 << (k - 1).bit_length())  # output columns, a power of two; the first k are used
    xp = jnp.pad(x, ((0, ROWS - n), (0, 0)))
    part = pl.pallas_call(
        functools.partial(_logits_kernel, bd=bd), out_shape=jax.ShapeDtypeStruct((splits, ROWS, e), jnp.float32),
        grid=(splits,), interpret=interpret, name="router_logits",
    )(xp, w)
    ids, weights = pl.pallas_call(
        functools.partial(_top_k_kernel, splits=splits, k=k, norm=norm, dtype=x.dtype, experts=experts),
        out_shape=(jax.ShapeDtypeStruct((ROWS, kp), jnp.int32), jax.ShapeDtypeStruct((ROWS, kp), jnp.float32)),
        grid=(1,), interpret=interpret, name="router_top_k",
    )(part)
    return ids[:n, :k], weights[:n, :k].astype(x.dtype)
