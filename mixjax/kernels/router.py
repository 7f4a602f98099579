"""Softmax-top-k routing of a few tokens in one kernel (Pallas, Triton backend; `interpret=True` runs it anywhere).

Qwen3-MoE's router is softmax over the expert logits (float32), the top k, and optionally the k weights renormalised
to sum to one. XLA makes five kernels of it for a decode step (softmax, a top-k sort, two fusions for the
renormalisation and the pair layout's ids): ~6 us of a ~80 us batch-1 layer on an H200, each kernel ~1 us of launch
for almost no work. Here one program per token does all of it from the row's logits, k rounds of

    ids[j] = the lowest e with l[e] == max of the logits not yet chosen     (lax.top_k's order on ties)
    weight[j] = exp(l[ids[j]] - max l) / sum_e exp(l[e] - max l)

then the weights renormalised over the k chosen. (The first version ranked every expert against every other, an
[E, E] comparison: 4.5 us per call at E = 128 on an H200.) Prompts take it too: for many tokens XLA's top-k is a sort
(~30 us per layer of an 8192-token prompt). `softmax_topk` is the same router in XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mixjax.kernels import triton_params

def softmax_topk(logits, k: int, norm: bool):
    """The router in XLA: (ids int32 [n, k], weights float32 [n, k]) from float32 logits [n, E]."""
    w, ids = lax.top_k(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), k)
    return ids.astype(jnp.int32), (w / w.sum(-1, keepdims=True) if norm else w)


def _kernel(logits_ref, *refs, k: int, norm: bool, masked: bool):
    live_ref, ids_ref, w_ref = refs if masked else (None, *refs)
    r = pl.program_id(0)
    logit = logits_ref[r, :].astype(jnp.float32)  # [E], padded with -inf to a power of two
    e_n = logit.shape[0]
    k_pad = ids_ref.shape[1]
    m = jnp.max(logit)
    total = jnp.sum(jnp.exp(logit - m))
    idx = lax.broadcasted_iota(jnp.int32, (e_n,), 0)
    slot = lax.broadcasted_iota(jnp.int32, (k_pad,), 0)
    ids = jnp.zeros((k_pad,), jnp.int32)
    w = jnp.zeros((k_pad,), jnp.float32)
    left = logit
    for j in range(k):  # k selections of the largest remaining logit, the lower index on ties (as lax.top_k)
        best = jnp.max(left)
        pick = jnp.min(jnp.where(left == best, idx, e_n))
        ids = jnp.where(slot == j, pick, ids)
        # exp(best - m) / total is the chosen expert's softmax probability, computed as softmax_topk computes it
        w = jnp.where(slot == j, jnp.exp(best - m) / total, w)
        left = jnp.where(idx == pick, -jnp.inf, left)
    if norm:
        w = w / jnp.sum(w)  # the unused slots hold zeros
    if live_ref is not None:  # a row without a token: weight 0, no expert computes it
        w = jnp.where(live_ref[r] != 0, w, 0.0)
    ids_ref[r, :] = ids
    w_ref[r, :] = w.astype(w_ref.dtype)


@functools.partial(jax.jit, static_argnames=("k", "norm", "interpret", "warps", "dtype", "padded"))
def route(logits, *, k: int, norm: bool, live=None, dtype=jnp.float32, padded: bool = False, interpret: bool = False,
          warps: int = 1):
    """softmax_topk(logits, k, norm) in one kernel: (ids int32 [n, k], weights [n, k] in `dtype`, rounded from
    float32). The logits in any float dtype: the kernel reads them as they are and converts to float32 itself (a
    router product's bf16 logits converted by XLA first were a kernel of their own, ~1 us of a ~65 us batch-1 layer,
    H200 2026-12-03). live [n] (bool), when given, zeroes the weights of rows that carry no token, and `dtype` is
    the model's: XLA's masking and conversion after the kernel were one more small kernel per layer. `padded`
    returns the kernel's outputs as they are, [n, k_pad] with k_pad >= k (a power of two, 16 at least), for kernels
    that read the first k columns in place: cutting them to [n, k] is a copy kernel of its own."""
    n, e = logits.shape
    e_pad = max(16, 1 << (e - 1).bit_length())  # Triton's vectors have power-of-two lengths
    k_pad = max(16, 1 << (k - 1).bit_length())
    x = logits
    if e_pad != e:
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, e_pad - e)), constant_values=-jnp.inf)
    args = (x,) if live is None else (x, live.reshape(n).astype(jnp.int32))
    params = triton_params(warps, 1, interpret)
    ids, w = pl.pallas_call(
        functools.partial(_kernel, k=k, norm=norm, masked=live is not None),
        out_shape=(jax.ShapeDtypeStruct((n, k_pad), jnp.int32), jax.ShapeDtypeStruct((n, k_pad), dtype)),
        grid=(n,), compiler_params=params, interpret=interpret, name="router_topk",
    )(*args)
    return (ids, w) if padded else (ids[:, :k], w[:, :k])
