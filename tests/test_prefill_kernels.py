"""The prompt path's kernels (Pallas, run interpreted on CPU): the experts' sorted layout without a sort, the row
copies around the expert kernels, and MLA flash attention, each against a plain reference."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import interpreted_model, rel_err
from mixjax.kernels import grouped_experts as ge
from mixjax.kernels.flash_attention import mla_flash_attention, mla_supported
from mixjax.models.layers import attend, causal_mask


def sorted_dest(ids, valid, e, bm):
    """Each pair's padded row by a stable sort on the expert, written out by hand."""
    ex = np.where(valid, ids, e).reshape(-1)
    counts = np.bincount(ex, minlength=e + 1)[:e]
    start = np.concatenate([[0], np.cumsum(-(-counts // bm))]) * bm
    m = (-(-ex.size // bm) + min(e, ex.size)) * bm
    dest, seen = np.full(ex.size, m), np.zeros(e, int)
    for p in np.argsort(ex, kind="stable"):
        if ex[p] < e:
            dest[p] = start[ex[p]] + seen[ex[p]]
            seen[ex[p]] += 1
    return dest.reshape(ids.shape), m


@pytest.mark.parametrize("n,e,k,bm", [(5, 16, 2, 16), (300, 128, 8, 64), (700, 8, 2, 32)])
def test_group_layout_is_a_stable_sort_by_expert(n, e, k, bm):
    """Several chunks of prefix counts (n * k > 256), rows without pairs, experts with none."""
    rng = np.random.RandomState(n)
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(n)]).astype(np.int32)
    w = rng.rand(n, k).astype(np.float32) + 0.1
    w[::7] = 0  # every 7th row routes nowhere
    lay = ge.group_layout(jnp.zeros((n, e)), k, bm, routed=(jnp.asarray(ids), jnp.asarray(w)))
    want, m = sorted_dest(ids, w != 0, e, bm)
    np.testing.assert_array_equal(np.asarray(lay.dest), want)
    src = np.asarray(lay.src_row)
    assert src.shape == (m,)
    for (row, j), d in np.ndenumerate(want):
        if d < m:
            assert src[d] == row
    assert (src < n).sum() == (want < m).sum()  # every other padded row is a zero row
    blocks = np.asarray(lay.block_expert)
    for d, ex in zip(want.reshape(-1), np.where(w != 0, ids, -1).reshape(-1)):
        if d < m:
            assert blocks[d // bm] == ex


def test_gather_rows_fills_used_blocks_with_x_rows():
    """Row r of every used block is x[src_row[r]], or zero for a padding row."""
    rng = np.random.RandomState(0)
    n, e, k, d, bm = 45, 8, 3, 64, 16
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(n)]).astype(np.int32)
    w = (rng.rand(n, k) + 0.1).astype(np.float32)
    w[3] = 0
    lay = ge.group_layout(jnp.zeros((n, e)), k, bm, routed=(jnp.asarray(ids), jnp.asarray(w)))
    x = rng.randn(n, d).astype(np.float32)
    src, blocks = np.asarray(lay.src_row), np.asarray(lay.block_expert)
    got = np.asarray(ge.gather_rows(jnp.asarray(x), lay, bm, tiles=ge.RowTiles(16, 32), interpret=True))
    used = np.repeat(blocks >= 0, bm)
    assert used.sum() < used.size  # some blocks unused: they are not written, and not read
    want = np.where((src < n)[:, None], x[np.minimum(src, n - 1)], 0)
    np.testing.assert_array_equal(got[used], want[used])


@pytest.mark.parametrize("t,start,s", [(20, 0, 32), (20, 12, 32), (64, 0, 64)])
def test_mla_flash_attention_equals_attend(t, start, s):
    """Whole prompts and a chunk that starts mid-cache, a prompt that is not a whole number of query tiles."""
    rng = np.random.RandomState(t + start)
    b, h, nope, rope, v = 2, 3, 16, 8, 12
    qn, qr = rng.randn(b, t, h, nope), rng.randn(b, t, h, rope)
    kv, kr = rng.randn(b, s, h, nope + v), rng.randn(b, s, rope)
    pos = np.broadcast_to(np.arange(start, start + t, dtype=np.int32), (b, t))
    f = lambda a: jnp.asarray(a, jnp.float32)
    got = mla_flash_attention(f(qn), f(qr), f(kv), f(kr), jnp.asarray(pos), scale=0.3, tiles=(16, 16, 4, 2),
                              interpret=True)
    k = np.concatenate([kv[..., :nope], np.broadcast_to(kr[:, :, None], (b, s, h, rope))], -1)
    want = attend(f(np.concatenate([qn, qr], -1)), f(k), f(kv[..., nope:]), causal_mask(jnp.asarray(pos), s), 0.3)
    assert rel_err(np.asarray(got), np.asarray(want)) < 1e-5


def test_mla_support_rule():
    assert mla_supported(128, 64, 128, 1024, gpu=True)
    assert not mla_supported(16, 8, 12, 64, gpu=True)  # Triton tiles need powers of two >= 16
    assert mla_supported(16, 8, 12, 64, gpu=False)
    assert not mla_supported(128, 64, 128, 1000, gpu=False)  # the cache in whole 16-slot blocks


def test_deepseek_prompt_with_mla_flash_matches_reference(monkeypatch):
    """deepseek_v3_a through the Pallas path, every prompt in the expanded (flash) form: the whole prompt, then its
    first half and its second half as a chunk that starts mid-cache."""
    from mixjax.models import deepseek_v3

    monkeypatch.setattr(deepseek_v3, "ABSORB_MAX_TOKENS", 0)
    model, ref, tokens, pos = interpreted_model("deepseek_v3_a")
    b, t = tokens.shape
    logits, _ = model.forward(jnp.asarray(tokens), jnp.asarray(pos), model.init_cache(b, 32))
    assert rel_err(np.asarray(logits)[..., : model.vocab_size], ref["logits"]) < 1e-4
    half = t // 2
    _, cache = model.forward(jnp.asarray(tokens[:, :half]), jnp.asarray(pos[:, :half]), model.init_cache(b, 32))
    logits, _ = model.forward(jnp.asarray(tokens[:, half:]), jnp.asarray(pos[:, half:]), cache)
    assert rel_err(np.asarray(logits)[..., : model.vocab_size], ref["logits"][:, half:]) < 1e-4
