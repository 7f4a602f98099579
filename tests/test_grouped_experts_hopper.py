"""The Hopper (Mosaic GPU) expert kernels, run in Mosaic GPU's interpreter on CPU (TMA copies, barriers and the
three warpgroups simulated), compute the same function as numpy; and the dispatch takes them only where they tile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax.kernels import grouped_experts as ge
from mixjax.kernels import grouped_experts_hopper as gh

E, D, F, N, K = 4, 128, 128, 80, 2
TILES = gh.HopperTiles(bn=64, bk=64, split="m", stages=2, release=1, epi=32)  # 2 output tiles, 2 k-steps, 2 stores
CHAINED = gh.HopperTiles(bn=64, bk=64, split="m", stages=2, chain=True)
BY_COLUMNS = gh.HopperTiles(bn=128, bk=64, split="n", stages=2)  # each warpgroup: all 128 rows, 64 columns


@pytest.fixture(scope="module")
def problem():
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(N, D), jnp.bfloat16)
    gates = np.zeros((N, E), np.float32)
    gates[:70, [0, 1]] = gates[70:, [1, 2]] = 1.0  # 70 / 80 / 10 rows of experts 0-2; expert 3 untouched
    lay = ge.group_layout(jnp.asarray(gates), K, 128)
    real = (np.asarray(lay.src_row) < N).reshape(-1, 128).sum(1)
    assert real.tolist() == [70, 80, 10, 0, 0, 0]  # rows holding pairs per block; block 2: warpgroup 1's all padding
    wg, wu = (jnp.asarray(rng.randn(E, D, F) * 0.1, jnp.bfloat16) for _ in range(2))
    wd = jnp.asarray(rng.randn(E, F, D) * 0.1, jnp.bfloat16)
    return ge.gather_rows_xla(x, lay), lay.block_expert, lay.src_row, wg, wu, wd, x


def swiglu(rows, wg, wu, e):
    """Kernel A's function for one block's rows, in float32."""
    g, u = rows @ np.asarray(wg[e], np.float32), rows @ np.asarray(wu[e], np.float32)
    return g / (1 + np.exp(-g)) * u


def per_block(xp, block_expert, fn, bm=128):
    """fn(rows of a block, its expert) for each used block, stacked as the kernels lay out their output."""
    return np.concatenate([fn(xp[b * bm:(b + 1) * bm], e) for b, e in enumerate(block_expert) if e >= 0])


@pytest.mark.parametrize("tiles, programs, skip", [(TILES, 2, False), (CHAINED, 2, False), (CHAINED, 4, False),
                                                   (BY_COLUMNS, 2, False), (TILES, 2, True), (CHAINED, 4, True)])
def test_hopper_kernels_equal_numpy(problem, tiles, programs, skip):
    """2 programs walk 3 tiles each (BY_COLUMNS: 3 blocks of one tile, 2 programs); with 4, two programs have a
    single tile (chained: the first tile is the last). skip: the kernels are given the layout's source rows, and a
    warpgroup whose 64 rows are all padding (block 2's second) computes nothing: the rows that hold pairs must be
    the same."""
    xp, be, src_row, wg, wu, wd, _ = problem
    be_np = np.asarray(be)
    used = int((be_np >= 0).sum())
    assert used == 3 and be_np[-1] == -1  # three blocks walked by 2 programs, the unused one skipped
    f32 = lambda a: np.asarray(a, np.float32)
    pad = dict(src_row=src_row, n_x=N) if skip else {}
    real = np.flatnonzero(np.asarray(src_row)[:used * 128] < N) if skip else np.arange(used * 128)  # rows compared

    h = gh.gate_up(xp, be, wg, wu, tiles, **pad, interpret=True, programs=programs)
    want_h = per_block(f32(xp), be_np, lambda rows, e: swiglu(rows, wg, wu, e))
    got_h = f32(h[:used * 128])
    np.testing.assert_allclose(got_h[real], want_h[real], rtol=2e-2, atol=2e-2 * np.abs(want_h).max())
    y = gh.down_proj(h, be, wd, tiles, **pad, interpret=True, programs=programs)
    want_y = per_block(np.where(np.isfinite(got_h), got_h, 0), be_np, lambda rows, e: rows @ f32(wd[e]))
    got_y = f32(y[:used * 128])
    np.testing.assert_allclose(got_y[real], want_y[real], rtol=2e-2, atol=2e-2 * np.abs(want_y).max())


def test_hopper_kernels_take_64_row_blocks_split_by_columns(problem):
    """Blocks of 64 rows (less padding when experts hold one or two blocks' worth of rows), each compute warpgroup
    taking all 64 rows and half the columns: kernels A and B equal numpy on every used block. The layout of the
    same pairs fills 2 + 2 + 1 blocks of 64 rows against 3 of 128."""
    _, _, _, wg, wu, wd, x = problem
    gates = np.zeros((N, E), np.float32)
    gates[:70, [0, 1]] = gates[70:, [1, 2]] = 1.0
    lay = ge.group_layout(jnp.asarray(gates), K, 64)
    be = np.asarray(lay.block_expert)
    used = int((be >= 0).sum())
    assert used == 5
    xp = ge.gather_rows_xla(x, lay)
    f32 = lambda a: np.asarray(a, np.float32)
    tiles = gh.HopperTiles(bn=128, bk=64, split="n", stages=2)
    h = gh.gate_up(xp, lay.block_expert, wg, wu, tiles, interpret=True, programs=2)
    want_h = per_block(f32(xp), be, lambda rows, e: swiglu(rows, wg, wu, e), bm=64)
    np.testing.assert_allclose(f32(h[:used * 64]), want_h, rtol=2e-2, atol=2e-2 * np.abs(want_h).max())
    y = gh.down_proj(h, lay.block_expert, wd, tiles, interpret=True, programs=2)
    want_y = per_block(f32(h), be, lambda r, e: r @ f32(wd[e]), bm=64)
    np.testing.assert_allclose(f32(y[:used * 64]), want_y, rtol=2e-2, atol=2e-2 * np.abs(want_y).max())


def test_hopper_kernels_refuse_shapes_they_do_not_tile(problem):
    xp, be, _, wg, wu, wd, _ = problem
    with pytest.raises(ValueError, match="does not tile"):
        gh.gate_up(xp, be, wg, wu, gh.HopperTiles(bn=256))  # 128 output columns by 256
    with pytest.raises(ValueError, match="multiples of 64"):
        gh.gate_up(xp, jnp.concatenate([be, be]), wg, wu, TILES)  # twice the blocks: 64 rows, 32 per warpgroup
    with pytest.raises(ValueError, match="chained tiles need"):
        gh.gate_up(xp, be, wg, wu, gh.HopperTiles(bn=64, stages=3, chain=True))  # 3 stages, 2 k-steps
    with pytest.raises(ValueError, match="together"):
        gh.gate_up(xp, be, wg, wu, TILES, n_x=N)  # the padding rule needs the source rows too


def test_hopper_kernels_lower_for_cuda():
    """The production tiles at Qwen3-30B-A3B expert shapes go through Pallas' Mosaic GPU lowering (layouts, shared
    memory, pipeline) without a GPU."""
    S = jax.ShapeDtypeStruct
    nb, d, f = 6, 2048, 768
    be, xp, h = S((nb,), jnp.int32), S((nb * 128, d), jnp.bfloat16), S((nb * 128, f), jnp.bfloat16)
    w, wdn = S((8, d, f), jnp.bfloat16), S((8, f, d), jnp.bfloat16)
    src = S((nb * 128,), jnp.int32)
    for fn, args in ((gh.gate_up, (xp, be, w, w)), (gh.down_proj, (h, be, wdn))):
        for skip in (False, True):  # every row computed; warpgroups of padding rows skipped (x had 1000 rows)
            f = (lambda *a, fn=fn: fn(*a[:-1], src_row=a[-1], n_x=1000)) if skip else fn
            text = jax.jit(f).trace(*args, *((src,) if skip else ())).lower(lowering_platforms=("cuda",)).as_text()
            assert "mosaic_gpu" in text


def test_dispatch_takes_hopper_kernels_only_where_they_apply(monkeypatch):
    prompt = ge.choose_blocks(4096 * 8, 128, 2048, 768)
    decode = ge.choose_blocks(32 * 8, 128, 2048, 768)
    assert prompt.bm == 128 and decode.bm == 16
    assert not ge.use_hopper(prompt, 2048, 768)  # CPU
    monkeypatch.setattr(gh, "hopper_available", lambda: True)
    assert ge.use_hopper(prompt, 2048, 768)
    assert ge.use_hopper(prompt, 7168, 2048)  # DeepSeek-V3's experts
    assert not ge.use_hopper(decode, 2048, 768)  # 16-row blocks: below a wgmma tile per warpgroup
    assert not ge.use_hopper(prompt, 2048, 192)  # an F shard (768 over 4) that 128-column tiles do not divide
    assert not ge.use_hopper(prompt, 2048, 1408)  # kernel B's 22 k-steps: its 4 chained stages do not divide them
    assert not ge.use_hopper(prompt, 2048, 768, interpret=True)
    monkeypatch.setenv(ge.HOPPER_ENV, "0")
    assert not ge.use_hopper(prompt, 2048, 768)


def test_padding_skip_only_for_the_expert_widths_it_paid_for():
    """The Hopper kernels' padding skip (a branch in every k-step) is taken for Qwen3-30B-A3B-wide experts, where it
    paid at 2048-8192 tokens on an H200, and not for Qwen3-235B's 4096-wide or DeepSeek-V3's 7168-wide ones, where it
    cost up to 20%."""
    assert ge.skips_padding(2048) and ge.skips_padding(1024)
    assert not ge.skips_padding(4096) and not ge.skips_padding(7168)


def test_expert_layer_hopper_branch_equals_the_triton_branch(problem, monkeypatch):
    """The expert layer (`grouped_swiglu`) through the Hopper kernels (the padded copy, kernels A and B with the
    padding skip, the combine) equals its Triton-kernel branch on the same layout. Both run interpreted here, with
    tiles that fit these small experts; they accumulate in float32 in different orders, so equal to rounding."""
    import dataclasses
    import functools
    _, _, _, wg, wu, wd, x = problem
    gates = np.zeros((N, E), np.float32)
    gates[:70, [0, 1]] = 0.5
    gates[70:, [1, 2]] = 0.5
    small = dict(interpret=True, programs=2)
    monkeypatch.setattr(gh, "gate_up", functools.partial(gh.gate_up, t=TILES, **small))
    monkeypatch.setattr(gh, "down_proj", functools.partial(gh.down_proj, t=TILES, **small))
    blk = dataclasses.replace(ge.choose_blocks(N * K, E, D, F), bm=128)
    layer = functools.partial(ge.grouped_swiglu.__wrapped__, x, jnp.asarray(gates), wg, wu, wd, k=K, blk=blk,
                              interpret=True)
    monkeypatch.setattr(ge, "use_hopper", lambda *a, **k: False)
    triton = np.asarray(layer(), np.float32)
    monkeypatch.setattr(ge, "use_hopper", lambda *a, **k: True)
    hopper = np.asarray(layer(), np.float32)
    assert np.abs(triton).max() > 0
    np.testing.assert_allclose(hopper, triton, rtol=2e-2, atol=1e-2 * np.abs(triton).max())
