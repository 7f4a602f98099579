"""Softmax-top-k routing of a few tokens in one kernel (Pallas, Triton backend; `interpret=True` runs it anywhere).

Qwen3-MoE's router is softmax over the expert logits (float32), the top k, and optionally the k weights renormalised
to sum to one. XLA makes five kernels of it for a decode step (softmax, a top-k sort, two fusions for the
renormalisation and the pair layout's ids): ~6 us of a ~80 us batch-1 layer on an H200, each kernel ~1 us of launch
for almost no work. Here one program per token does all of it from the row's logits:

    rank[e] = #{e' : l[e'] > l[e], or l[e'] == l[e] and e' < e}     (lax.top_k's order: the lower index on ties)
    ids[j]  = the e with rank[e] == j,   weight[j] = exp(l[ids[j]] - max l) / sum over the chosen (or all) e

A [E, E] comparison per token is cheap for a few tokens, not for a prompt: `softmax_topk` (XLA) serves those.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

MAX_TOKENS = 16  # tokens up to which the model routes through the kernel (decode of small batches)


def softmax_topk(logits, k: int, norm: bool):
    """The router in XLA: (ids int32 [n, k], weights float32 [n, k]) from float32 logits [n, E]."""
    w, ids = lax.top_k(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), k)
    return ids.astype(jnp.int32), (w / w.sum(-1, keepdims=True) if norm else w)


def _kernel(logits_ref, ids_ref, w_ref, *, k: int, norm: bool):
    r = pl.program_id(0)
    logit = logits_ref[r, :]  # [E], padded with -inf to a power of two
    e_n = logit.shape[0]
    me = lax.broadcasted_iota(jnp.int32, (e_n, e_n), 0)
    other = lax.broadcasted_iota(jnp.int32, (e_n, e_n), 1)
    mine, theirs = logit[:, None], logit[None, :]
    rank = jnp.sum(((theirs > mine) | ((theirs == mine) & (other < me))).astype(jnp.int32), axis=1)
    ex = jnp.exp(logit - jnp.max(logit))
    prob = ex / jnp.sum(ex)  # rounded as softmax_topk rounds: probabilities first, then their renormalisation
    if norm:
        prob = prob / jnp.sum(jnp.where(rank < k, prob, 0.0))
    k_pad = ids_ref.shape[1]
    chosen = lax.broadcasted_iota(jnp.int32, (k_pad, e_n), 0) == rank[None, :]  # [j, e]: e has rank j
    ids_ref[r, :] = jnp.sum(jnp.where(chosen, lax.broadcasted_iota(jnp.int32, (k_pad, e_n), 1), 0), axis=1)
    w_ref[r, :] = jnp.sum(jnp.where(chosen, prob[None, :], 0.0), axis=1)


@functools.partial(jax.jit, static_argnames=("k", "norm", "interpret", "warps"))
def route(logits, *, k: int, norm: bool, interpret: bool = False, warps: int = 4):
    """softmax_topk(logits, k, norm) in one kernel: (ids int32 [n, k], weights float32 [n, k])."""
    n, e = logits.shape
    e_pad = max(16, 1 << (e - 1).bit_length())  # Triton's vectors have power-of-two lengths
    k_pad = max(16, 1 << (k - 1).bit_length())
    x = logits.astype(jnp.float32)
    if e_pad != e:
        x = jnp.pad(x, ((0, 0), (0, e_pad - e)), constant_values=-jnp.inf)
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        params = pltriton.CompilerParams(num_warps=warps, num_stages=1)
    ids, w = pl.pallas_call(
        functools.partial(_kernel, k=k, norm=norm),
        out_shape=(jax.ShapeDtypeStruct((n, k_pad), jnp.int32), jax.ShapeDtypeStruct((n, k_pad), jnp.float32)),
        grid=(n,), compiler_params=params, interpret=interpret, name="router_topk",
    )(x)
    return ids[:, :k], w[:, :k]
