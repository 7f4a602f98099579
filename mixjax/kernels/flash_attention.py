"""Causal attention over the KV cache without materialising the scores (flash attention), for prefill.

XLA's `attend` builds float32 scores [B, K, G, T, S] and their softmax in memory: at a 2048-token prompt that was,
with a transpose of it, a third of the prefill step on an H200, and at 8192 tokens 8.6 GB per layer. Here each
program holds one head's tile of BQ queries, walks the cache in blocks of BK keys with an online softmax, and
writes only the output. Key s is visible to the query at position p when s <= p (the same rule as
`layers.causal_mask`), so prompts that start mid-cache (chunked prefill) need nothing special; blocks after the
tile's last position are not read.

Layouts: q [B, T, H, D], cache k/v heads-major [B, K, S, D] (H = K * group), positions [B, T].

`mla_flash_attention` is the same walk for DeepSeek's multi-head latent attention over its expanded cache: two
score products (the no-RoPE and the rotary parts of the head), the rotary key shared by all heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mixjax.kernels import triton_params


def tiles_for(t: int, s: int, d: int) -> tuple[int, int, int, int] | None:
    """(BQ, BK, warps, stages) for a prompt of t tokens over a cache of s slots, or None when Triton cannot tile
    it. Chosen on an H200 (tools/probe_flash.py)."""
    if d % 16 or d & (d - 1) or s % 16:
        return None
    bk = 64 if s % 64 == 0 else 32 if s % 32 == 0 else 16
    return (64 if t >= 64 else 16), bk, 4, 2  # 64/64/4/2 was the fastest of six tilings at 2048 and 8192


def _kernel(pos_ref, q_ref, k_ref, v_ref, o_ref, *, bq: int, bk: int, group: int, scale: float, s_len: int):
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kh = h // group
    rows = pl.ds(i * bq, bq)
    q = q_ref[b, rows, h, :]
    pos = pos_ref[b, rows]
    n_blocks = jnp.minimum(jnp.max(pos) // bk + 1, s_len // bk)

    def step(j, carry):
        m, l, acc = carry
        keys = pl.ds(j * bk, bk)
        k = k_ref[b, kh, keys, :]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        visible = (j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)) <= pos[:, None]
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        v = v_ref[b, kh, keys, :]
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc

    d = q.shape[-1]
    init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, d), jnp.float32))
    _, l, acc = lax.fori_loop(0, n_blocks, step, init)
    o_ref[b, rows, h, :] = (acc / l[:, None]).astype(o_ref.dtype)


def _pad_queries(qs, positions, bq: int):
    """Queries [B, T, ...] and positions [B, T] padded to whole tiles of bq; padded rows repeat the last position
    (their output is dropped)."""
    t = positions.shape[1]
    pad = -(-t // bq) * bq - t
    if not pad:
        return qs, positions
    qs = tuple(jnp.pad(q, [(0, 0), (0, pad)] + [(0, 0)] * (q.ndim - 2)) for q in qs)
    return qs, jnp.pad(positions, ((0, 0), (0, pad)), mode="edge")


@functools.partial(jax.jit, static_argnames=("scale", "tiles", "interpret"))
def flash_attention(q, k, v, positions, *, scale: float, tiles: tuple[int, int, int, int], interpret: bool = False):
    """softmax(q k^T * scale, keys s <= position) v per head. q [B,T,H,D], k/v [B,K,S,D] -> [B,T,H,D]."""
    b, t, h, d = q.shape
    kheads, s_len = k.shape[1], k.shape[2]
    bq, bk, warps, stages = tiles
    (q,), positions = _pad_queries((q,), positions, bq)
    tp = q.shape[1]
    out = pl.pallas_call(
        functools.partial(_kernel, bq=bq, bk=bk, group=h // kheads, scale=scale, s_len=s_len),
        out_shape=jax.ShapeDtypeStruct((b, tp, h, d), q.dtype), grid=(b, h, tp // bq),
        compiler_params=triton_params(warps, stages, interpret), interpret=interpret, name="flash_attention",
    )(positions.astype(jnp.int32), q, k, v)
    return out[:, :t]


def mla_supported(nope: int, rope: int, v: int, s: int, gpu: bool) -> bool:
    """Whether `mla_flash_attention` tiles these head dims and this cache: on GPU (Triton) every head dim a power
    of two of at least 16; interpreted, any. The cache length a multiple of 16 in both."""
    pow2 = lambda d: d >= 16 and not d & (d - 1)
    return s % 16 == 0 and (not gpu or (pow2(nope) and pow2(rope) and pow2(v)))


def mla_cudnn_supported(qk: int, v: int, itemsize: int) -> bool:
    """Whether a whole MLA prompt can take cuDNN's fused attention (`MLA._attend_cudnn`): 16-bit inputs, the q/k
    head dim at most 256 and v padded up to it (jax's cuDNN path wants one head dim)."""
    return itemsize == 2 and qk <= 256 and v <= qk


def mla_tiles_for(t: int, s: int) -> tuple[int, int, int, int]:
    """(BQ, BK, warps, stages) of `mla_flash_attention` for a prompt of t tokens over a cache of s slots: for long
    prompts the fastest tiling at 8192 tokens with DeepSeek-V3's heads on an H200 (tools/probe_mla.py; at 2048
    tokens 849 us against 787 us for BK 32, the best there)."""
    bk = 64 if s % 64 == 0 else 32 if s % 32 == 0 else 16
    return (128, bk, 8, 4) if t >= 128 else (16 if t < 64 else 64, bk, 4, 2)


def _mla_kernel(pos_ref, qn_ref, qr_ref, kv_ref, kr_ref, o_ref, *, bq: int, bk: int, nope: int, scale: float,
                s_len: int):
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = pl.ds(i * bq, bq)
    qn, qr = qn_ref[b, rows, h, :], qr_ref[b, rows, h, :]
    pos = pos_ref[b, rows]
    v_d = o_ref.shape[-1]
    n_blocks = jnp.minimum(jnp.max(pos) // bk + 1, s_len // bk)
    contract = (((1,), (1,)), ((), ()))

    def step(j, carry):
        m, l, acc = carry
        keys = pl.ds(j * bk, bk)
        # score = q_nope . k_nope + q_pe . k_pe: the rotary key is one per position, shared by every head
        s = (lax.dot_general(qn, kv_ref[b, keys, h, pl.ds(0, nope)], contract, preferred_element_type=jnp.float32)
             + lax.dot_general(qr, kr_ref[b, keys, :], contract, preferred_element_type=jnp.float32)) * scale
        visible = (j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)) <= pos[:, None]
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        v = kv_ref[b, keys, h, pl.ds(nope, v_d)]
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc

    init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, v_d), jnp.float32))
    _, l, acc = lax.fori_loop(0, n_blocks, step, init)
    o_ref[b, rows, h, :] = (acc / l[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "tiles", "interpret"))
def mla_flash_attention(q_nope, q_pe, kv, k_pe, positions, *, scale: float, tiles: tuple[int, int, int, int],
                        interpret: bool = False):
    """Multi-head latent attention of a prompt over its expanded cache, without the score matrix in memory.

    q_nope [B,T,H,N], q_pe [B,T,H,R] (rotated), kv [B,S,H,N+V] (the cached latent times kv_b_proj: each head's
    key part then value part, as the projection lays them out, read in place), k_pe [B,S,R] (rotated, one per
    position), positions [B,T]. softmax((q_nope . k_nope + q_pe . k_pe) * scale over keys s <= position) v ->
    [B,T,H,V]. XLA's form materialised [B,H,T,S] float32 scores: ~3.5 ms per DeepSeek-V3 layer at 2048 tokens on
    an H200, and 34 GB per layer at 8192."""
    b, t, h, nope = q_nope.shape
    s_len = kv.shape[1]
    v_d = kv.shape[-1] - nope
    bq, bk, warps, stages = tiles
    (q_nope, q_pe), positions = _pad_queries((q_nope, q_pe), positions, bq)
    tp = q_nope.shape[1]
    out = pl.pallas_call(
        functools.partial(_mla_kernel, bq=bq, bk=bk, nope=nope, scale=scale, s_len=s_len),
        out_shape=jax.ShapeDtypeStruct((b, tp, h, v_d), q_nope.dtype), grid=(b, h, tp // bq),
        compiler_params=triton_params(warps, stages, interpret), interpret=interpret, name="mla_flash_attention",
    )(positions.astype(jnp.int32), q_nope, q_pe, kv, k_pe)
    return out[:, :t]


def prefill_attention(q, k_new, v_new, k_cache, v_cache, positions, *, scale: float, tiles, pallas: str,
                      fresh: bool = False):
    """Attention of a prompt chunk q [B,T,H,D] over the heads-major cache (which already holds k_new/v_new).

    fresh=True promises that every row starts at position 0 (a whole prompt, the common case; the caller knows it
    when compiling). Then the keys are exactly the chunk's own k_new/v_new [B,T,K,D], and on GPU cuDNN's fused
    causal attention runs on them: 1.7x the Triton kernel at 8192 tokens on an H200 (tools/probe_flash.py). A chunk
    that starts mid-cache takes the Triton kernel. The choice is static: a lax.cond on the positions made the GPU
    runtime read its predicate back to the host in every layer. cuDNN needs 16-bit inputs; other dtypes and the
    interpreter take the Triton kernel, which is exact for any start."""
    cached = lambda: flash_attention(q, k_cache, v_cache, positions, scale=scale, tiles=tiles,
                                     interpret=pallas == "interpret")
    if pallas != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[-1] not in (64, 128):
        return cached()

    if not fresh:
        return cached()
    return jax.nn.dot_product_attention(q, k_new.astype(q.dtype), v_new.astype(q.dtype), scale=scale,
                                        is_causal=True, implementation="cudnn")

