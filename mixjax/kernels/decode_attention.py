"""Decode attention: one new token per row writes its key and value into the heads-major cache and attends over
the cache, in one kernel (Pallas, Triton backend; `interpret=True` runs it anywhere).

XLA compiles the same step (`layers.write_cache` + `layers.attend`) into about eight kernels per layer: two cache
writes with their index fix-ups, the score product, a max and a sum for the softmax, a conversion, the value
product. At batch 1 each is 1-2.5 us for ~1 us of traffic: ~13 us of a ~120 us Qwen3-30B-A3B decode layer on an
H200 (2026-11-29). Here: one kernel, plus a small kernel that combines the split partial results (`combine_kernel`;
XLA's combine was three more kernels) where the cache is split in chunks; unsplit, the kernel writes the output
itself (`ONE_CHUNK_OUTPUT`). Given a fused q/k/v projection's output, it reads q, k and v in place
(`fused`, `reads_in_place`).

Each program holds one (row, KV head)'s query heads (padded to 16 rows, the smallest tensor-core tile) and one chunk
of the cache; chunks split the keys so that a small batch still occupies the GPU (flash-decoding). Over its chunk it
runs an online softmax and writes the partial (max, sum, weighted values); `combine` merges the chunks. The new
key/value are patched into the block they belong to as it is read, so the result never depends on whether the
program that stores them into the cache ran first. Semantics are those of `write_cache` + `attend` with
`causal_mask`: the new entry goes to slot min(position, S - 1) (dynamic_update_slice clamps), keys at slots
<= position are visible.

Layouts: q [B, H, D] (H = K * group), k_new / v_new [B, K, D], cache [B, K, S, D], positions [B].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mixjax.kernels import triton_params

PROGRAMS = 128  # chunks are added until rows x KV heads x chunks reaches this many programs (132 SMs on an H200)
BLOCK = None  # keys per block when a call names none (None: 64, see `plan`); a module knob for probes
# Whether a call whose cache is read in one chunk per (row, KV head) writes its output from the attention kernel
# (no combine kernel after it); False restores that kernel, for comparisons.
ONE_CHUNK_OUTPUT = True


def supported(head_dim: int, cache_len: int, gpu: bool = True) -> bool:
    """Whether Triton can tile this shape: a power-of-two head dimension, split in halves (RoPE's pairs) of at
    least 16 for the tensor cores on a GPU (interpreted: any power of two from 16), 16-slot cache blocks."""
    return head_dim >= (32 if gpu else 16) and head_dim & (head_dim - 1) == 0 and cache_len % 16 == 0


def plan(batch: int, kv_heads: int, cache_len: int, programs: int = PROGRAMS,
         bk: int | None = None) -> tuple[int, int]:
    """(bk, chunks): keys per block (64 or the largest power of two under it dividing the cache, unless given)
    and cache chunks per (row, KV head)."""
    bk = BLOCK if bk is None else bk
    if bk is None:
        bk = 64 if cache_len % 64 == 0 else 32 if cache_len % 32 == 0 else 16
    elif bk < 16 or bk & (bk - 1) or cache_len % bk:
        raise ValueError(f"decode attention blocks are powers of two from 16 dividing the cache ({cache_len}): {bk}")
    blocks = cache_len // bk
    chunks = 1
    while chunks * 2 <= blocks and blocks % (chunks * 2) == 0 and batch * kv_heads * chunks < programs:
        chunks *= 2
    return bk, chunks


def _norm_rope(x1, x2, w_ref, cos, sin, eps: float, dtype):
    """RMSNorm (statistics in float32, weight applied in `dtype`, as layers.RMSNorm) then half-split RoPE (as
    layers.apply_rope) of rows given as their two halves [R, D/2]; returns the rotated halves in `dtype`."""
    h = x1.shape[-1]
    f1, f2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
    inv = lax.rsqrt((jnp.sum(f1 * f1, axis=-1) + jnp.sum(f2 * f2, axis=-1)) / (2 * h) + eps)[:, None]
    n1 = w_ref[pl.ds(0, h)][None, :] * (f1 * inv).astype(dtype)
    n2 = w_ref[pl.ds(h, h)][None, :] * (f2 * inv).astype(dtype)
    c, s = cos.astype(dtype), sin.astype(dtype)
    return (n1 * c - n2 * s).astype(dtype), (n2 * c + n1 * s).astype(dtype)


def _kernel(pos_ref, q_ref, kn_ref, vn_ref, kc_ref, vc_ref, *rest, bk: int, chunk_blocks: int, s_len: int,
            scale: float, eps: float | None, rows: tuple[int, int, int, int], finish: int, interpret: bool):
    """eps None: q / k_new come rotated and normalised. Otherwise they are the raw projections and rest starts
    with the q-norm and k-norm weights [D] and this step's cos / sin [B, D/2]: normalised and rotated here.
    finish = G > 0 (with one chunk): the kernel also writes the output [B, K, G, D] (the first G rows of each
    padded group), the last of its outputs."""
    if finish:
        rest, out_ref = rest[:-1], rest[-1]
    if eps is None:
        o_ref, m_ref, l_ref, kc_out, vc_out = rest
    else:
        qw_ref, kw_ref, cos_ref, sin_ref, o_ref, m_ref, l_ref, kc_out, vc_out = rest
    b, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    pos = pos_ref[b]
    slot = jnp.minimum(pos, s_len - 1)  # where the new entry goes (as dynamic_update_slice clamps)
    d = q_ref.shape[-1]
    half = d // 2
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    q0, stride, k0, v0 = rows
    gp = o_ref.shape[3]
    qr = pl.ds(q0 + h * stride, gp)  # this KV head's query heads, and the rows after them up to gp (discarded)
    if eps is None:
        q = (q_ref[b, qr, lo], q_ref[b, qr, hi])  # [gp, D/2] each
        kn = (kn_ref[b, k0 + h, lo][None, :], kn_ref[b, k0 + h, hi][None, :])
    else:
        cos, sin = cos_ref[b, :][None, :], sin_ref[b, :][None, :]
        q = _norm_rope(q_ref[b, qr, lo], q_ref[b, qr, hi], qw_ref, cos, sin, eps, q_ref.dtype)
        kn = _norm_rope(kn_ref[b, k0 + h, lo][None, :], kn_ref[b, k0 + h, hi][None, :], kw_ref, cos, sin, eps,
                        kn_ref.dtype)
    vn = vn_ref[b, v0 + h, :]  # [D]
    dt = q[0].dtype
    first = c * chunk_blocks
    last = jnp.minimum(first + chunk_blocks, slot // bk + 1)  # blocks past the position: unread

    def block(j):
        """Block j of the cache with the new entry in place: the key as its two halves, the value."""
        rows = pl.ds(j * bk, bk)
        new = (j * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)) == slot
        k1 = jnp.where(new, kn[0].astype(kc_ref.dtype), kc_ref[b, h, rows, lo])
        k2 = jnp.where(new, kn[1].astype(kc_ref.dtype), kc_ref[b, h, rows, hi])
        v = jnp.where(new, vn[None, :].astype(vc_ref.dtype), vc_ref[b, h, rows, :])
        return k1, k2, v

    def step(j, carry):
        m, l, acc = carry
        k1, k2, v = block(j)
        nt = (((1,), (1,)), ((), ()))
        s = (lax.dot_general(q[0], k1.astype(dt), nt, preferred_element_type=jnp.float32)
             + lax.dot_general(q[1], k2.astype(dt), nt, preferred_element_type=jnp.float32)) * scale
        visible = (j * bk + lax.broadcasted_iota(jnp.int32, s.shape, 1)) <= pos
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        acc = acc * alpha[:, None] + jnp.dot(p.astype(dt), v.astype(dt), preferred_element_type=jnp.float32)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc

    gp = q[0].shape[0]
    init = (jnp.full((gp,), -jnp.inf, jnp.float32), jnp.zeros((gp,), jnp.float32), jnp.zeros((gp, d), jnp.float32))
    m, l, acc = lax.fori_loop(first, jnp.maximum(last, first), step, init)
    o_ref[b, h, c, :, :] = acc
    m_ref[b, h, c, :] = m
    l_ref[b, h, c, :] = l

    @pl.when(slot // (bk * chunk_blocks) == c)  # the chunk that holds the new entry stores its block
    def _():
        j = slot // bk
        k1, k2, v = block(j)
        rows = pl.ds(j * bk, bk)
        kc_out[b, h, rows, lo] = k1
        kc_out[b, h, rows, hi] = k2
        vc_out[b, h, rows, :] = v

    if finish:
        _one_chunk_output(o_ref, m_ref, l_ref, out_ref, b, h, finish, interpret)


def _one_chunk_output(o_ref, m_ref, l_ref, out_ref, b, h, group: int, interpret: bool):
    """With the cache read in one chunk, the combine kernel's work is the program's own: after a barrier (its
    partials were stored by all its threads; CUDA's __syncthreads makes them visible to the block) it reads back the
    group's rows and merges them as `_combine_kernel` does (`_merge_rows`), so the output is the same, bit for bit
    (one chunk: weight exp(0) = 1, sums of one term). A launch saved per layer at batch 32 and up (Qwen3-30B-A3B, 1024
    slots: 128 programs of one chunk), ~1.5 us of a layer on an H200 (2026-12-03). Reading the rows back rather than
    keeping them in registers: Triton cannot take the group's first G of the 16 rows it holds. With several chunks,
    the merge by the last program to finish (an atomic count) was tried and not kept (docs/BENCHMARKS.md)."""
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        plgpu.debug_barrier()
    _merge_rows(o_ref, m_ref, l_ref, out_ref, b, h, group, pl.ds(0, o_ref.shape[-1]))


def _merge_rows(o_ref, m_ref, l_ref, out_ref, b, h, group: int, cols):
    """Inside a kernel: merge the chunks' partials of (row b, KV head h)'s first `group` query heads, columns `cols`
    of D, into out_ref[b, h, :, cols] (`combine`'s arithmetic, the one form both kernels run)."""
    rows = pl.ds(0, group)  # the real query heads of the padded group
    m = m_ref[b, h, :, rows]  # [C, G]
    top = jnp.max(m, axis=0)
    w = jnp.exp(m - top[None, :])  # chunks that read no key have m = -inf: weight 0
    num = jnp.sum(o_ref[b, h, :, rows, cols] * w[:, :, None], axis=0)  # [G, len(cols)]
    den = jnp.sum(l_ref[b, h, :, rows] * w, axis=0)
    out_ref[b, h, :, cols] = (num / den[:, None]).astype(out_ref.dtype)


def combine(o, m, l):
    """Merge the chunks' partial softmax results: o [..., C, G, D], m / l [..., C, G] -> [..., G, D] (float32)."""
    top = jnp.max(m, axis=-2, keepdims=True)
    w = jnp.exp(m - top)  # chunks that read no key have m = -inf: weight 0
    return jnp.sum(o * w[..., None], axis=-3) / jnp.sum(l * w, axis=-2)[..., None]


def _combine_kernel(o_ref, m_ref, l_ref, out_ref, *, group: int, dt: int):
    b, h, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    _merge_rows(o_ref, m_ref, l_ref, out_ref, b, h, group, pl.ds(t * dt, dt))  # a slice of D per program


def combine_kernel(o, m, l, group: int, dtype, *, interpret: bool = False):
    """`combine` of the first `group` heads of each padded group, in `dtype`, as one kernel: [B, K, group, D].
    XLA makes three of it (a max with the exponentials, two sums, the slice and conversion): ~4 us of a ~65 us
    batch-1 Qwen3-30B-A3B decode layer on an H200, for ~0.3 MB of partial results (2026-12-03)."""
    b, k, c, gp, d = o.shape
    dt = min(d, 32)  # programs over D too: at batch 1 a (row, KV head) per program would be 4 programs
    return pl.pallas_call(
        functools.partial(_combine_kernel, group=group, dt=dt),
        out_shape=jax.ShapeDtypeStruct((b, k, group, d), dtype), grid=(b, k, d // dt),
        compiler_params=triton_params(4, 1, interpret), interpret=interpret, name="decode_attention_combine",
    )(o, m, l)


def padded_group(heads: int, kv_heads: int) -> int:
    """Rows of query heads per program: the group of query heads of one KV head, at least 16 (a tensor-core tile)."""
    return max(16, 1 << (heads // kv_heads - 1).bit_length())


def reads_in_place(heads: int, kv_heads: int, rows: int, q0: int) -> bool:
    """Whether a fused projection's output of `rows` heads, query heads from row q0, can be read in place: each
    program reads `padded_group` rows from its group's first query head, so the last group's must not run past
    the end (with the k and v heads after the query heads, Qwen3-30B-A3B's 4 + 4 of them fill the last group's
    8 missing rows exactly)."""
    group = heads // kv_heads
    return q0 + (kv_heads - 1) * group + padded_group(heads, kv_heads) <= rows


@functools.partial(jax.jit, static_argnames=("scale", "interpret", "warps", "stages", "programs", "eps", "fused",
                                             "block"))
def decode_attention(q, k_new, v_new, k_cache, v_cache, positions, *, scale: float, interpret: bool = False,
                     warps: int = 4, stages: int = 3, programs: int = PROGRAMS, qk_norm=None, eps: float = 1e-6,
                     fused: tuple[int, int, int, int] | None = None, block: int | None = None):
    """Write k_new / v_new [B, K, D] into the cache [B, K, S, D] at slot min(position, S - 1) and return
    (softmax(q k^T * scale over slots <= position) v as [B, H, D] in q's dtype, new k cache, new v cache).

    qk_norm: (q-norm weight [D], k-norm weight [D], cos [B, D/2], sin [B, D/2]) when q and k_new are the raw
    projections (Qwen3): the kernel applies RMSNorm (eps) and RoPE to them itself. XLA ran five small kernels for
    that, ~6 us of a ~80 us batch-1 layer (H200, 2026-11-29).

    fused: (q0, H, k0, v0) when q is a fused q/k/v projection's output [B, R, D] (k_new and v_new are then None)
    holding the H query heads from row q0, the K new keys from k0 and values from v0. The kernel reads them in
    place, where XLA made two kernels of slicing q, k and v apart and padding q's groups to 16 rows (~2.3 us of a
    ~65 us batch-1 layer, H200 2026-12-03). Needs `reads_in_place`.

    warps, stages, programs and block (keys per block, see `plan`) are tuning knobs, for probes
    (tools/check_decode_attention.py)."""
    kheads, s_len = k_cache.shape[1], k_cache.shape[2]
    if fused is None:
        b, h, d = q.shape
        group, gp = h // kheads, padded_group(h, kheads)
        qg = q.reshape(b, kheads, group, d)
        if gp != group:
            qg = jnp.pad(qg, ((0, 0), (0, 0), (0, gp - group), (0, 0)))
        qg = qg.reshape(b, kheads * gp, d)
        rows = (0, gp, 0, 0)
    else:
        q0, h, k0, v0 = fused
        b, r, d = q.shape
        group, gp = h // kheads, padded_group(h, kheads)
        assert reads_in_place(h, kheads, r, q0), (h, kheads, r, q0)
        qg, k_new, v_new = q, q, q
        rows = (q0, group, k0, v0)
    bk, chunks = plan(b, kheads, s_len, programs, block)
    params = triton_params(warps, stages, interpret)
    f32 = jnp.float32
    extra = ()
    if qk_norm is not None:
        qw, kw, cos, sin = qk_norm
        extra = (qw, kw, cos.reshape(b, d // 2).astype(f32), sin.reshape(b, d // 2).astype(f32))
    pow2 = group & (group - 1) == 0  # Triton's blocks: powers of two (D is one: `supported`)
    finish = group if pow2 and chunks == 1 and ONE_CHUNK_OUTPUT else 0
    outs = (jax.ShapeDtypeStruct((b, kheads, chunks, gp, d), f32),
            jax.ShapeDtypeStruct((b, kheads, chunks, gp), f32),
            jax.ShapeDtypeStruct((b, kheads, chunks, gp), f32),
            jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
            jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
    args = (positions.astype(jnp.int32), qg, k_new, v_new, k_cache, v_cache, *extra)
    if finish:
        outs += (jax.ShapeDtypeStruct((b, kheads, group, d), q.dtype),)
    o, m, l, kc, vc, *merged = pl.pallas_call(
        functools.partial(_kernel, bk=bk, chunk_blocks=s_len // bk // chunks, s_len=s_len, scale=scale,
                          eps=None if qk_norm is None else eps, rows=rows, finish=finish, interpret=interpret),
        out_shape=outs, grid=(b, kheads, chunks), input_output_aliases={4: 3, 5: 4}, compiler_params=params,
        interpret=interpret, name="decode_attention",
    )(*args)
    if finish:
        out = merged[0].reshape(b, h, d)
    elif pow2:
        out = combine_kernel(o, m, l, group, q.dtype, interpret=interpret).reshape(b, h, d)
    else:
        out = combine(o, m, l)[:, :, :group].reshape(b, h, d).astype(q.dtype)
    return out, kc, vc
