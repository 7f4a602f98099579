"""SwiGLU experts computed only for the experts a batch touches: tokens sorted by expert, grouped matmuls.

The dense path (`Experts` with impl="dense") runs every local expert on every row: it reads all expert weights
every step, which is what a decode step of a 128-expert model cannot afford (batch 1 touches 8 of them). Here:

1. Pairs. Each row's non-zero gates give (row, expert, weight) pairs: at most k per row.
2. Layout. Pairs are sorted by expert (integer counts of equal experts, no sort: `group_layout`) into a padded
   buffer in which expert e owns ceil(count_e / BM) whole blocks of BM rows, filled with x's rows by a Pallas row
   gather (`gather_rows`). `block_expert[b]` names the expert of block b; blocks past the last used one are -1.
   Untouched experts own no block, so their weights are never read. With at most PAIR_BLOCKS_MAX pairs (decode
   of one or two tokens) each pair gets a block of its own instead (`pair_layout`): no sort, no scatter. The
   sorted layout's dozen small kernels (top-k, argsort, three scatters, cumulative sums) took ~15 us of a ~140 us
   batch-1 decode layer on an H200, more than the expert weights they save from a second read: two rows of
   two tokens rarely share an expert (8 of 128 each, for Qwen3-30B-A3B). From three rows up to 32
   (decode of 3-32 tokens) each expert gets one block holding every row, x itself (`expert_layout`): each touched
   expert's weights are still read once, with neither the sort nor the copy.
3. Kernel A, one program per (block, F tile): h = silu(x W_gate[e]) * (x W_up[e]), float32 accumulation.
4. Kernel B, one program per (block, D tile):  y = h W_down[e], float32 accumulation, stored in x's dtype.
   For prompts the programs of a block's tiles are launched together (`Blocks.group`, `_block_and_tile`).
   On Hopper GPUs, prompts with 128-row blocks run kernels A and B of `grouped_experts_hopper` instead (Mosaic GPU:
   warp-specialised wgmma fed by TMA, 8-18% faster than these Triton kernels on an H200): `use_hopper`.
5. Combine: out[row] = sum over the row's pairs of weight * y[pair's padded row] (a gather, no scatter-add).

Kernels are Pallas with the Triton backend (GPU). `interpret=True` runs the same kernels on any backend, which is
how the CPU tests check them. The number of blocks is static: ceil(P / BM) + min(E, P) bounds the blocks any
routing can need (P pairs), so one compiled program serves every routing.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mixjax.kernels import grouped_experts_hopper as hopper
from mixjax.kernels import pow2_divisor, triton_params


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes. bm: rows per block (one expert per block). Kernel A: bk, the D (contraction) tile, and bf, the
    F (output) tile, with `warps` and `stages`. Kernel B: b_bk, the F (contraction) tile (0: bf), and bd, the D
    (output) tile, with b_warps and b_stages (0: as kernel A). group: the launch order of the (block, output tile)
    programs, 0 for block-fastest, G > 0 for all output tiles of G blocks before the next G blocks (see
    `_block_and_tile`)."""

    bm: int
    bk: int
    bf: int
    bd: int
    warps: int = 4
    stages: int = 3
    b_bk: int = 0
    b_warps: int = 0
    b_stages: int = 0
    group: int = 0

    @property
    def down(self) -> "Blocks":
        """Kernel B's tiles, as (bk, bf, bd, warps, stages) with bf its contraction tile."""
        return Blocks(self.bm, self.bk, self.b_bk or self.bf, self.bd, self.b_warps or self.warps,
                      self.b_stages or self.stages, group=self.group)


def _launch_grid(blk: Blocks, nb: int, nt: int):
    return (nb, nt) if blk.group == 0 else (nb * nt,)


def _block_and_tile(blk: Blocks, nb: int, nt: int):
    """(row block, output tile) of this program. CUDA starts programs in order of the grid's first axis, so with
    grid (block, tile) the programs that read one block of rows are nb programs apart: once the padded rows are
    larger than the L2 (x at 8192 tokens: 268 MB), each block is read from HBM once per output tile. With group G
    the launch order runs all tiles of G blocks together: each block's rows are read from HBM once, and the G
    blocks (mostly of one expert) share each weight tile while it is in L2."""
    if blk.group == 0:
        return pl.program_id(0), pl.program_id(1)
    pid = pl.program_id(0)
    g = pid // (blk.group * nt)
    base = g * blk.group
    size = jnp.minimum(blk.group, nb - base)  # the last group may be short
    r = pid - g * blk.group * nt
    return base + r % size, r // size


def choose_blocks(pairs: int, num_experts: int, d_model: int, d_ff: int, rows: int | None = None) -> Blocks | None:
    """Tile sizes for this shape, or None when the shape does not tile (the caller then uses the dense path).

    Decode (few rows per expert) is bound by reading weights: 16-row blocks (the smallest tensor-core tile) and
    enough programs to keep every SM streaming. Prefill (many rows per expert) is bound by the matmuls: taller
    blocks so each weight tile is reused by more rows, wide output tiles, 8 warps, and from 32-row blocks up the
    launch order that runs a block's output tiles together (group 1: each block's rows read from HBM once). The
    tiles are the fastest of sweeps on an H200 with Qwen3-30B-A3B expert shapes (tools/sweep_grouped_tiles.py,
    2026-11-29 and 2026-12-01; docs/BENCHMARKS.md) where the shape divides them, else the largest power of two
    that does. At 2048 tokens (~128 rows per expert) 128-row blocks in group order beat 64-row blocks in the old
    order, 536 against 621 us for kernels A + B, though many experts then own a second, nearly empty block.

    rows: the input rows, when known. Decode of 17-32 rows then takes 32-row blocks with the decode tiles, one block
    per touched expert holding every row (`expert_layout`, `layout_kind`)."""
    per_expert = pairs / max(1, min(num_experts, pairs))
    bm = 16 if per_expert <= 16 else 32 if per_expert <= 64 else 128
    decode_bm = 16
    if EXPERT_LAYOUT and bm == 16 and rows is not None and 16 < rows <= EXPERT_LAYOUT_ROWS and pairs > PAIR_BLOCKS_MAX:
        decode_bm = bm = 1 << (rows - 1).bit_length()
    if bm == 32 and d_model * d_ff * 2 * 2 > BIG_EXPERT_BYTES:
        # Each block reads its expert's weights once. Small experts (Qwen3-30B-A3B: 6 MB of gate/up) stay in the
        # 50 MB L2 between an expert's blocks, so short blocks cost little; big ones (DeepSeek-V3: 59 MB) are read
        # from HBM again per block, and a memory-bound prompt (~64 rows per expert at 2048 tokens) ran at a third
        # of its bytes roofline with 32-row blocks. One block per expert where a 128-row block holds its rows.
        bm = 128 if per_expert > 32 else 64
    if bm == 16 and pairs <= 8:  # one token (pair layout): latency of few programs, deeper pipelines
        a, b = (128, 64, 4, 4), (64, 64, 4, 4)
    elif bm == 16 and pairs <= 16:  # two tokens (pair layout); swept on it, 2026-11-29 (second session)
        a, b = (64, 128, 4, 4), (64, 64, 4, 3)
    elif bm == decode_bm:  # 3-32 tokens: sorted (16-row blocks) or the expert layout
        a, b = (64, 128, 4, 3), (64, 128, 4, 2)
    elif bm == 32:  # 512 / 1024-token prompts, group order: 411 / 510 us for A + B, against 476 / 641 before
        a, b = (64, 128, 8, 3), (64, 256, 4, 4)
    elif bm == 64:
        a, b = (64, 256, 8, 3), (64, 256, 4, 4)
    else:
        a, b = (64, 128, 8, 4), (64, 256, 8, 4)
    bk, bf = pow2_divisor(d_model, a[0]), pow2_divisor(d_ff, a[1])
    b_bk, bd = pow2_divisor(d_ff, b[0]), pow2_divisor(d_model, b[1])
    if min(bk, bf, b_bk, bd) < 16:
        return None
    return Blocks(bm=bm, bk=bk, bf=bf, bd=bd, warps=a[2], stages=a[3], b_bk=b_bk, b_warps=b[2], b_stages=b[3],
                  group=1 if bm >= 32 and bm != decode_bm else 0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Layout:
    src_row: jax.Array  # [M] input row that fills each padded row (n: padding; see gather_rows)
    block_expert: jax.Array  # [NB] expert of each block, -1 for unused blocks
    dest: jax.Array  # [n, k] padded row of each pair (M: no pair)
    weight: jax.Array  # [n, k] float32 gate weight of each pair (0: no pair)


EXPERT_LAYOUT = True  # decode of 3-32 tokens through `expert_layout` (False: the sorted layout, for comparisons)
EXPERT_LAYOUT_ROWS = 32  # rows up to which `expert_layout` is used (in blocks of 32 rows above 16)
BIG_EXPERT_BYTES = 24 << 20  # gate + up weights (bf16) above which an expert's weights do not stay in L2
PAIR_BLOCKS_MAX = 16  # pairs up to which each (row, expert) pair gets its own block (`pair_layout`)


def _pairs(gates, k: int, routed):
    """Each row's k (weight float32, expert id) pairs: from the router when given (routed = (ids, weights) [n, k],
    experts numbered as the gate matrix's columns), else the gate matrix's top k (weight 0: no pair)."""
    if routed is not None:
        ids, w = routed
        return w.astype(jnp.float32), ids.astype(jnp.int32)
    return lax.top_k(gates.astype(jnp.float32), k)  # the row's chosen local experts first


def pair_layout(gates, k: int, bm: int, routed=None) -> Layout:
    """One block of bm rows per (row, expert) pair, pair p = row * k + j in block p, its row first and zero rows
    after (tensor-core tiles need bm >= 16 rows). No sort: for a few pairs (decode of one or two tokens) the
    sorted layout's small kernels cost more than the weights it would save from a second read."""
    n, e = gates.shape
    k = min(k, e)
    w, ids = _pairs(gates, k, routed)
    valid = w != 0
    p = n * k
    m = p * bm
    slot = jnp.arange(m, dtype=jnp.int32)
    src_row = jnp.where(slot % bm == 0, slot // bm // k, n)
    block_expert = jnp.where(valid, ids, -1).reshape(p).astype(jnp.int32)
    dest = jnp.where(valid, (jnp.arange(p, dtype=jnp.int32) * bm).reshape(n, k), m)
    return Layout(src_row, block_expert, dest, jnp.where(valid, w, 0.0))


def expert_layout(gates, k: int, bm: int, routed=None) -> Layout:
    """One block per expert, block e computed with expert e if a row picked it (else -1: skipped), and every block
    reading the same bm rows, x itself padded (the kernels' `shared_x`): for n <= bm rows, more pairs than
    PAIR_BLOCKS_MAX (decode of 3-32 tokens; `choose_blocks` gives 32-row blocks from 17 rows). Row r of block e is
    then x[r] through expert e, so pair (r, j) reads padded row ids[r, j] * bm + r. Each touched expert's weights
    are read once, as in the sorted layout, with no sort and no copy of x: one small kernel where the sorted layout
    took ~9 and the copy (~11 us of a ~160 us batch-8 Qwen3-30B-A3B decode layer on an H200, 2026-12-03). Rows that
    did not pick an expert are computed through it too (compute is not what a decode step is bound by) and never
    read."""
    n, e = gates.shape
    assert n <= bm, (n, bm)
    k = min(k, e)
    w, ids = _pairs(gates, k, routed)
    valid = w != 0
    touched = jnp.any((ids[:, :, None] == jnp.arange(e, dtype=jnp.int32)) & valid[:, :, None], axis=(0, 1))
    block_expert = jnp.where(touched, jnp.arange(e, dtype=jnp.int32), -1)
    m = e * bm
    dest = jnp.where(valid, ids * bm + jnp.arange(n, dtype=jnp.int32)[:, None], m)
    return Layout(None, block_expert, dest, jnp.where(valid, w, 0.0))


RANK_CHUNK = 256  # pairs per chunk of group_layout's prefix counts


def group_layout(gates, k: int, bm: int, routed=None) -> Layout:
    """Sort the (row, expert) pairs of a dense gate matrix [n, E] (at most k non-zeros per row) by expert: pair p
    = row * k + j goes to its expert's blocks at its rank among the expert's pairs (pairs in order of p, as a
    stable sort by expert would place them).

    No sort: a pair's rank is a count of equal experts, in integers. Within chunks of RANK_CHUNK pairs each pair
    counts the earlier pairs of its chunk with its expert (a compare-and-sum over [C, C] per chunk: C comparisons
    per pair); the chunks' per-expert counts [G, E], summed over the chunks before, add the rest. XLA makes each
    count one reduction kernel. It replaced a tensor-core form (a lower-triangular [C, C] matrix of ones times each
    chunk's one-hot [C, E], then a gather from the [G, C, E] float32 product: a 33 us product per 4-layer step of a
    2048-token Qwen3-30B-A3B prompt): 2,736 -> 2,708 us of GPU time per step on one H200 (2026-12-01). That form had
    replaced an argsort: 29 us per layer at 8192 tokens (cub's radix sort), with a scatter of 21 us and a
    cumulative sum of 12 us."""
    n, e = gates.shape
    k = min(k, e)
    w, ids = _pairs(gates, k, routed)
    valid = w != 0
    p = n * k
    nb = -(-p // bm) + min(e, p)
    m = nb * bm
    ex = jnp.where(valid, ids, e).reshape(p).astype(jnp.int32)  # e = "no expert": counted by no expert
    c = min(RANK_CHUNK, p)
    g = -(-p // c)
    ex_g = jnp.pad(ex, (0, g * c - p), constant_values=e).reshape(g, c)
    earlier = jnp.arange(c)[None, :] < jnp.arange(c)[:, None]  # [C, C]: j before i
    within = jnp.sum((ex_g[:, :, None] == ex_g[:, None, :]) & earlier, axis=2, dtype=jnp.int32)  # [G, C]
    totals = jnp.sum(ex_g[:, :, None] == jnp.arange(e, dtype=jnp.int32), axis=1, dtype=jnp.int32)  # [G, E]
    before = jnp.cumsum(totals, axis=0) - totals  # [G, E]: pairs of each expert in the chunks before
    ex_c = jnp.minimum(ex_g, e - 1)  # pairs with no expert get some rank here, but no dest
    rank = (within + jnp.take_along_axis(before, ex_c, axis=1)).reshape(g * c)[:p]
    counts = jnp.sum(totals, axis=0)  # [E]
    blocks = (counts + bm - 1) // bm
    block_end = jnp.cumsum(blocks)
    block_start = jnp.concatenate([jnp.zeros(1, jnp.int32), block_end])  # [E+1]; entry E is unused
    dest = jnp.where(ex < e, block_start[ex] * bm + rank, m)
    src_row = jnp.full(m, n, jnp.int32).at[dest].set(jnp.arange(p, dtype=jnp.int32) // k, mode="drop",
                                                      unique_indices=True)
    b = jnp.arange(nb, dtype=jnp.int32)
    block_expert = jnp.sum(block_end[None, :] <= b[:, None], axis=1).astype(jnp.int32)
    block_expert = jnp.where(block_expert < e, block_expert, -1)
    # Written out once: left to itself XLA fuses the counts into their consumers, and the combine, one of them,
    # then recounted each pair's rank for every element of its row (H200: a 4096-token prompt's combine took 1.6 ms
    # per layer instead of ~35 us, a batch-256 decode step's 111 us instead of ~4).
    src_row, block_expert, dest = lax.optimization_barrier((src_row, block_expert, dest))
    return Layout(src_row, block_expert, dest.reshape(n, k), jnp.where(valid, w, 0.0))


def _token_expert(ids_ref, w_ref, p):
    """The expert of pair p of one token, read in place from the router's outputs [1, k_pad]: -1 where the pair's
    weight is zero (a row without a token)."""
    return jnp.where(w_ref[0, p] != 0, ids_ref[0, p], -1)


def _gate_up_kernel(*refs, blk: Blocks, d: int, nb: int, nt: int, token: bool = False, shared_x: bool = False):
    """Kernel A. refs: block_expert, x (padded, sorted), W_gate, W_up, out. With `token` (`token_swiglu`): the
    router's ids and weights, then x as one block [bm, D] (the token's normed row on top of zero rows), the input
    of every block (pair p in block p). With `shared_x` (`expert_layout`): x is one block [bm, D] read by every
    block. (Building that tile in the kernel from the row alone, a broadcast and a
    select per step, made the kernel 1.6x slower on an H200: the tile then reaches the tensor cores through a
    layout conversion, not the pipelined loads.)"""
    if token:
        ids_ref, w_ref, x_ref, wg_ref, wu_ref, h_ref = refs
        i, j = pl.program_id(0), pl.program_id(1)
        e = _token_expert(ids_ref, w_ref, i)
        x_rows = pl.ds(0, blk.bm)
    else:
        block_expert_ref, x_ref, wg_ref, wu_ref, h_ref = refs
        i, j = _block_and_tile(blk, nb, nt)
        e = block_expert_ref[i]
        x_rows = pl.ds(0 if shared_x else i * blk.bm, blk.bm)

    @pl.when(e >= 0)
    def _():
        rows, cols = pl.ds(i * blk.bm, blk.bm), pl.ds(j * blk.bf, blk.bf)

        def step(t, acc):
            ag, au = acc
            ks = pl.ds(t * blk.bk, blk.bk)
            xt = x_ref[x_rows, ks]
            ag += jnp.dot(xt, wg_ref[e, ks, cols], preferred_element_type=jnp.float32)
            au += jnp.dot(xt, wu_ref[e, ks, cols], preferred_element_type=jnp.float32)
            return ag, au

        zero = jnp.zeros((blk.bm, blk.bf), jnp.float32)
        ag, au = lax.fori_loop(0, d // blk.bk, step, (zero, zero))
        h_ref[rows, cols] = (ag * jax.nn.sigmoid(ag) * au).astype(h_ref.dtype)


def _down_kernel(*refs, blk: Blocks, f: int, nb: int, nt: int, token: bool = False):
    """Kernel B. refs: block_expert, h, W_down, out; with `token`, the router's ids and weights instead of
    block_expert (pair p in block p)."""
    if token:
        ids_ref, w_ref, h_ref, wd_ref, y_ref = refs
        i, j = pl.program_id(0), pl.program_id(1)
        e = _token_expert(ids_ref, w_ref, i)
    else:
        block_expert_ref, h_ref, wd_ref, y_ref = refs
        i, j = _block_and_tile(blk, nb, nt)
        e = block_expert_ref[i]

    @pl.when(e >= 0)
    def _():
        rows, cols = pl.ds(i * blk.bm, blk.bm), pl.ds(j * blk.bd, blk.bd)

        def step(t, acc):
            ks = pl.ds(t * blk.bf, blk.bf)
            return acc + jnp.dot(h_ref[rows, ks], wd_ref[e, ks, cols], preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, f // blk.bf, step, jnp.zeros((blk.bm, blk.bd), jnp.float32))
        y_ref[rows, cols] = acc.astype(y_ref.dtype)


@dataclasses.dataclass(frozen=True)
class RowTiles:
    """Tiles of the row-gather kernel: rows per program (a divisor of the expert block's bm), columns per program,
    warps. The default was the fastest of 12 at 8192 tokens on an H200 (93 us), within 1 us of it at 2048
    (tools/probe_rows.py)."""

    rows: int = 16
    cols: int = 256
    warps: int = 4


def _gather_rows_kernel(block_expert_ref, src_ref, x_ref, out_ref, *, t: RowTiles, bm: int, n: int):
    i, j = pl.program_id(0), pl.program_id(1)

    # Rows of unused blocks are never read (the expert kernels skip them; the combine reads only real pairs' rows),
    # and padding rows' contents never reach a real row: each output row of a product depends on its own input row
    # only. So a tile of padding rows (an expert's rows fill a prefix of its blocks) is not written either.
    @pl.when((block_expert_ref[i * t.rows // bm] >= 0) & (src_ref[i * t.rows] < n))
    def _():
        rows, cols = pl.ds(i * t.rows, t.rows), pl.ds(j * t.cols, t.cols)
        src = src_ref[rows]
        tile = x_ref[jnp.minimum(src, n - 1), cols]  # a gathered load: each row is a contiguous piece of x
        out_ref[rows, cols] = jnp.where((src < n)[:, None], tile, jnp.zeros_like(tile))


def gather_rows(x, lay: Layout, bm: int, *, tiles: RowTiles = RowTiles(), interpret: bool = False):
    """The padded, expert-sorted copy of x that the expert kernels read: row r is x[src_row[r]], or zero for a padding
    row in a tile with real rows; tiles of padding rows only and rows of unused blocks are left unwritten. On an
    H200 (tools/probe_rows.py) 93 us at 8192 tokens against 211 us for XLA's gather of the same rows, 25 against 61
    us at 2048; leaving the padding-only tiles unwritten took 107 -> 82 us per 4-layer step at 2048 tokens. (A
    Pallas kernel for the combine, each row's weighted sum of its expert outputs, was slower than XLA's
    gather-and-sum at every tiling tried: 76-224 against 71 us at 8192 tokens.)"""
    n, d = x.shape
    m = lay.src_row.shape[0]
    r, c = min(tiles.rows, bm), pow2_divisor(d, tiles.cols)
    params = triton_params(tiles.warps, 1, interpret)
    return pl.pallas_call(
        functools.partial(_gather_rows_kernel, t=RowTiles(r, c, tiles.warps), bm=bm, n=n),
        out_shape=jax.ShapeDtypeStruct((m, d), x.dtype), grid=(m // r, d // c),
        compiler_params=params, interpret=interpret, name="grouped_gather_x",
    )(lay.block_expert, lay.src_row, x)


def gather_rows_xla(x, lay: Layout):
    """gather_rows in XLA, every padded row written: for the pair layout (one or two tokens, a handful of rows), and
    shapes the kernel does not tile."""
    return jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])[lay.src_row]


def combine(y, lay: Layout, dtype):
    """out[row] = sum over the row's pairs of weight * y[pair's padded row], summed in float32 (a gather, no
    scatter-add; pairs that do not exist have weight 0 and no row)."""
    m = y.shape[0]
    rows = jnp.where((lay.dest < m)[..., None], y[jnp.minimum(lay.dest, m - 1)].astype(jnp.float32), 0.0)
    return jnp.einsum("nkd,nk->nd", rows, lay.weight).astype(dtype)


def _per_block_call(kernel, name: str, blk: Blocks, block_expert, operands, out_shape, nt: int, interpret: bool,
                    pairs: int = 0, **static):
    """One of the expert kernels over every (row block, output tile) pair, in blk's launch order. block_expert: the
    experts of the blocks [NB], or for one token the router's (ids, weights) [1, k_pad] with NB = `pairs`."""
    token = isinstance(block_expert, tuple)
    nb = pairs if token else block_expert.shape[0]
    routing = block_expert if token else (block_expert,)
    return pl.pallas_call(
        functools.partial(kernel, blk=blk, nb=nb, nt=nt, token=token, **static), out_shape=out_shape,
        grid=(nb, nt) if token else _launch_grid(blk, nb, nt),
        compiler_params=triton_params(blk.warps, blk.stages, interpret), interpret=interpret, name=name,
    )(*routing, *operands)


def gate_up(xp, block_expert, w_gate, w_up, blk: Blocks, *, interpret: bool = False, pairs: int = 0):
    """Kernel A: h = silu(xp W_gate[e]) * (xp W_up[e]) for each block of bm rows of the padded, sorted xp [M, D]
    and its expert e = block_expert[block] (blocks of expert -1 are skipped, their rows left unwritten). When xp
    is a single block [bm, D] and there are more blocks, every block reads it (`expert_layout`). For one
    token, block_expert is the router's (ids, weights) [1, k_pad], xp the token's block [bm, D] (its row, then
    zeros) and `pairs` the k pairs (blocks) to compute: h [k * bm, D]."""
    d, f = xp.shape[1], w_gate.shape[2]
    token = isinstance(block_expert, tuple)
    m = pairs * blk.bm if token else block_expert.shape[0] * blk.bm
    shared = not token and xp.shape[0] != m
    if shared and xp.shape[0] != blk.bm:
        raise ValueError(f"kernel A: x has {xp.shape[0]} rows, neither {m} (a row block per block) nor {blk.bm}")
    return _per_block_call(_gate_up_kernel, "grouped_gate_up", blk, block_expert, (xp, w_gate, w_up),
                           jax.ShapeDtypeStruct((m, f), xp.dtype), f // blk.bf, interpret, pairs=pairs, d=d,
                           **({"shared_x": True} if shared else {}))


def down_proj(h, block_expert, w_down, blk: Blocks, *, interpret: bool = False):
    """Kernel B, with blk's down tiles: y = h W_down[e] for each block of rows of h [M, F], stored in h's dtype.
    block_expert as gate_up's (for one token: the router's (ids, weights), a block per pair)."""
    down = blk.down
    (m, f), d = h.shape, w_down.shape[2]
    return _per_block_call(_down_kernel, "grouped_down", down, block_expert, (h, w_down),
                           jax.ShapeDtypeStruct((m, d), h.dtype), d // down.bd, interpret, pairs=m // blk.bm, f=f)


@functools.partial(jax.jit, static_argnames=("k", "blk", "interpret"))
def token_swiglu(u, ids, w, w_gate, w_up, w_down, *, k: int, blk: Blocks, interpret: bool = False):
    """grouped_swiglu for one token (a batch-1 decode step) with nothing between the router and kernel A: u [bm, D]
    is the normed row the experts read on top of zero rows (written by the router's product kernel,
    `gemv_many(emit=bm)`), ids and w the router kernel's padded outputs [1, k_pad] (k_pad >= k), read in place.
    Kernel A reads every pair's block from u, so the pair layout's kernels (the blocks' experts, the gather of x
    into a padded buffer) are gone. The same products and combine as grouped_swiglu's pair layout. (Kernel B and
    the combine as one kernel, each program summing all pairs' products for a slice of D, was slower on an H200:
    19.4 us a layer against 10.2 for the two; docs/BENCHMARKS.md.)"""
    m = k * blk.bm
    h = gate_up(u, (ids, w), w_gate, w_up, blk, interpret=interpret, pairs=k)
    y = down_proj(h, (ids, w), w_down, blk, interpret=interpret)
    valid = w[:, :k] != 0
    dest = jnp.where(valid, (jnp.arange(k, dtype=jnp.int32) * blk.bm)[None, :], m)
    return combine(y, Layout(None, None, dest, jnp.where(valid, w[:, :k].astype(jnp.float32), 0.0)), u.dtype)


HOPPER_ENV = "MIXJAX_HOPPER_EXPERTS"  # "0": keep the Triton kernels on Hopper GPUs too (for comparisons)


def use_hopper(blk: Blocks, d_model: int, d_ff: int, interpret: bool = False) -> bool:
    """Whether kernels A and B run as the Hopper kernels: on an sm_90 GPU, for blocks and expert shapes their tiles
    take (`grouped_experts_hopper.fits`: 128-row blocks, each compute warpgroup taking 64 rows, the wgmma tile);
    not when $MIXJAX_HOPPER_EXPERTS is 0."""
    return (not interpret and os.environ.get(HOPPER_ENV, "1") != "0" and hopper.fits(blk.bm, d_model, d_ff)
            and hopper.hopper_available())


def skips_padding(d_model: int) -> bool:
    """Whether the Hopper kernels skip warpgroups of padding rows (`src_row`) for experts of this width. The test and
    branch come with every k-step of every tile. On an H200 (2026-12-01, GPU time per step, `tools/profile_step.py`)
    the skip paid for Qwen3-30B-A3B experts (d_model 2048): 2,768 -> 2,729 us at 2048 tokens, 4,968 -> 4,937 at
    4096, 11,005 -> 10,868 at 8192 (4 layers). It cost DeepSeek-V3's (d_model 7168): 19.56 -> 19.61 ms at 2048 tokens,
    53.8 -> 57.7 ms at 8192 (2 layers; the expert kernels 20% slower). Qwen3-235B-A22B's experts (d_model 4096, d_ff
    1536; tools/probe_hopper_experts.py --shape 128,8,4096,1536): kernels A + B 1,806 -> 1,831 us at 2048 tokens,
    4,382 -> 4,833 us at 8192 with the skip."""
    return d_model <= 2048


def layout_kind(n: int, k: int, bm: int) -> str:
    """The layout `grouped_swiglu` uses for n rows of k pairs in blocks of bm rows: "pair" (a block per pair) up to
    PAIR_BLOCKS_MAX pairs, "expert" (a block per expert, all rows in each) while the rows fit one block, else
    "sorted" (pairs sorted by expert, `group_layout`)."""
    if n * k <= PAIR_BLOCKS_MAX:
        return "pair"
    return "expert" if EXPERT_LAYOUT and n <= min(bm, EXPERT_LAYOUT_ROWS) else "sorted"


def make_layout(gates, k: int, bm: int, routed=None) -> tuple[str, Layout]:
    """(kind, layout) of n rows' pairs as `grouped_swiglu` lays them out in blocks of bm rows (`layout_kind`)."""
    kind = layout_kind(gates.shape[0], min(k, gates.shape[1]), bm)
    return kind, {"pair": pair_layout, "expert": expert_layout, "sorted": group_layout}[kind](gates, k, bm, routed)


@functools.partial(jax.jit, static_argnames=("k", "blk", "interpret"))
def grouped_swiglu(x, gates, w_gate, w_up, w_down, *, k: int, blk: Blocks, interpret: bool = False, routed=None):
    """sum_e gates[:, e] * down_e(silu(gate_e(x)) * up_e(x)) for x [n, D], gates [n, E] (<= k non-zeros per
    row), weights [E, D, F], [E, D, F], [E, F, D]. Returns [n, D] in x's dtype. Matmuls accumulate in float32;
    each expert output is stored in x's dtype (halving the combine's traffic in bf16: the gather of [n, k, D]
    rows took 5% of a long prefill) and the weighted sum over a row's experts is float32.
    routed: the router's (ids, weights) [n, k] that the gates were made from, when at hand (saves a top-k)."""
    n, d = x.shape
    kind, lay = make_layout(gates, k, blk.bm, routed)
    if kind == "expert":  # every block reads x itself
        xp = jnp.pad(x, ((0, blk.bm - n), (0, 0)))
    elif kind == "sorted" and d % 16 == 0:  # the sorted layout's copy of x: the Pallas kernel where it tiles
        xp = gather_rows(x, lay, blk.bm, interpret=interpret)
    else:
        xp = gather_rows_xla(x, lay)  # [M, D]
    if kind == "sorted" and use_hopper(blk, d, w_gate.shape[2], interpret):
        skip = dict(src_row=lay.src_row, n_x=n) if skips_padding(d) else {}
        h = hopper.gate_up(xp, lay.block_expert, w_gate, w_up, **skip)
        y = hopper.down_proj(h, lay.block_expert, w_down, **skip)
    else:
        h = gate_up(xp, lay.block_expert, w_gate, w_up, blk, interpret=interpret)
        y = down_proj(h, lay.block_expert, w_down, blk, interpret=interpret)
    return combine(y, lay, x.dtype)
