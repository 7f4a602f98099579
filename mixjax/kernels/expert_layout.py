"""The sorted expert layout of a prompt (`grouped_experts.group_layout`) in two Pallas kernels (Triton backend;
`interpret=True` runs them anywhere).

group_layout's XLA form is about a dozen small kernels: one-hot products for the ranks, cumulative sums, compares, a
scatter. Per layer of a 2048-token Qwen3-30B-A3B prompt on an H200 they took ~24 us for a few hundred KB of data.
Here, with the pairs (row, expert) in chunks of C:

1. `_count_kernel`, one program per chunk: each pair's rank among the chunk's earlier pairs of its expert (a
   cumulative sum down the chunk's one-hot [C, E]) and the chunk's pair count per expert.
2. `_place_kernel`, one program per chunk: the counts of the chunks before it and of all chunks give each expert's
   first padded row (experts in order, ceil(count / bm) blocks each) and so each pair's row, `dest`; the pair's
   input row is scattered to src_row[dest] (src_row starts as all padding, n). Program 0 also writes block_expert.

All integer arithmetic: the same Layout as the XLA form, which the tests compare it with.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mixjax.kernels import triton_params

CHUNK = 256  # pairs per program: the one-hot [C, E] of a chunk stays in registers at E = 128


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _count_kernel(ex_ref, rank_ref, totals_ref, *, e_pad: int):
    ex = ex_ref[...]  # [C] the chunk's pair experts (E_pad: no expert, a row of zeros)
    onehot = (ex[:, None] == lax.broadcasted_iota(jnp.int32, (ex.shape[0], e_pad), 1)).astype(jnp.int32)
    upto = jnp.cumsum(onehot, axis=0)  # [C, E]: pairs of each expert up to and including this one
    rank_ref[...] = jnp.sum(upto * onehot, axis=1) - 1
    totals_ref[...] = jnp.sum(onehot, axis=0)[None, :]


def _place_kernel(ex_ref, rank_ref, totals_ref, src_in_ref, dest_ref, block_expert_ref, src_ref, *, n: int, e: int,
                  bm: int, k: int, m: int, nb: int):
    del src_in_ref  # the same buffer as src_ref (all padding on entry)
    g = pl.program_id(0)
    totals = totals_ref[...]  # [G, E_pad] pair counts per chunk and expert
    c = ex_ref.shape[0]
    e_pad = totals.shape[1]
    col = lax.broadcasted_iota(jnp.int32, (e_pad,), 0)
    before = jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, totals.shape, 0) < g, totals, 0), axis=0)
    counts = jnp.sum(totals, axis=0)
    blocks = (counts + bm - 1) // bm
    block_end = jnp.cumsum(blocks)
    first = (block_end - blocks) * bm + before  # [E_pad] padded row of this chunk's first pair of each expert
    ex = ex_ref[...]
    base = jnp.sum(jnp.where(ex[:, None] == col[None, :], first[None, :], 0), axis=1)
    valid = ex < e
    dest = jnp.where(valid, base + rank_ref[...], m)
    dest_ref[...] = dest
    # The last block is never used (the blocks an expert needs sum to less than NB), so its last row stays padding:
    # pairs with no expert write padding there. Repeated indices then carry one value, and the scatter needs no mask
    # (a masked scatter with repeated indices differs between Triton and the interpreter).
    pair = g * c + lax.broadcasted_iota(jnp.int32, (c,), 0)
    src_ref[jnp.where(valid, dest, m - 1)] = jnp.where(valid, pair // k, n)

    @pl.when(g == 0)
    def _():
        b = lax.broadcasted_iota(jnp.int32, (_pow2(nb),), 0)
        owner = jnp.sum((block_end[None, :] <= b[:, None]).astype(jnp.int32), axis=1)  # first expert ending after b
        block_expert_ref[jnp.minimum(b, nb - 1)] = jnp.where(owner < e, owner, -1)  # blocks from nb - 1 on: -1


@functools.partial(jax.jit, static_argnames=("n", "e", "k", "bm", "interpret"))
def sorted_layout(ex, *, n: int, e: int, k: int, bm: int, interpret: bool = False):
    """(src_row [M], block_expert [NB], dest [P]) of group_layout for pair experts ex [P] (pair p = row * k + j;
    e or more: no expert), n input rows, e experts, blocks of bm rows (NB = ceil(P / bm) + min(e, P), M = NB bm)."""
    p = ex.shape[0]
    nb = -(-p // bm) + min(e, p)
    m = nb * bm
    c = min(CHUNK, _pow2(p))
    g = -(-p // c)
    g_pad, e_pad = _pow2(g), max(16, _pow2(e))  # Triton's blocks have power-of-two sides
    ex = ex.astype(jnp.int32)
    ex = jnp.pad(jnp.where(ex < e, ex, e_pad), (0, g_pad * c - p), constant_values=e_pad)  # e_pad: no expert
    params = triton_params(4, 1, interpret)
    rank, totals = pl.pallas_call(
        functools.partial(_count_kernel, e_pad=e_pad),
        out_shape=(jax.ShapeDtypeStruct((g_pad * c,), jnp.int32), jax.ShapeDtypeStruct((g_pad, e_pad), jnp.int32)),
        grid=(g_pad,), in_specs=[pl.BlockSpec((c,), lambda i: (i,))],
        out_specs=(pl.BlockSpec((c,), lambda i: (i,)), pl.BlockSpec((1, e_pad), lambda i: (i, 0))),
        compiler_params=params, interpret=interpret, name="layout_count",
    )(ex)
    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
    dest, block_expert, src_row = pl.pallas_call(
        functools.partial(_place_kernel, n=n, e=e, bm=bm, k=k, m=m, nb=nb),
        out_shape=(jax.ShapeDtypeStruct((g * c,), jnp.int32), jax.ShapeDtypeStruct((nb,), jnp.int32),
                   jax.ShapeDtypeStruct((m,), jnp.int32)),
        grid=(g,),
        in_specs=[pl.BlockSpec((c,), lambda i: (i,)), pl.BlockSpec((c,), lambda i: (i,)), whole((g_pad, e_pad)),
                  whole((m,))],  # src_row and block_expert are only scattered to (no whole-block load or store)
        out_specs=(pl.BlockSpec((c,), lambda i: (i,)), whole((nb,)), whole((m,))),
        input_output_aliases={3: 2}, compiler_params=params, interpret=interpret, name="layout_place",
    )(ex, rank, totals, jnp.full((m,), n, jnp.int32))
    return src_row, block_expert, dest[:p]
