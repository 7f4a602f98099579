"""The prompt path's kernels (Pallas, run interpreted on CPU): the experts' sorted layout without a sort, the row
copies around the expert kernels, and MLA flash attention, each against a plain reference."""

import jax
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


def test_group_layout_is_written_out_behind_a_barrier():
    """The layout's outputs leave group_layout through an optimisation barrier: without one XLA fused the rank counts
    into the combine on an H200, which recounted them for every element of a row (1.6 ms per layer at 4096 tokens)."""
    ids = jnp.zeros((8, 2), jnp.int32)
    hlo = jax.jit(lambda i: ge.group_layout(jnp.zeros((8, 4)), 2, 16, routed=(i, jnp.ones((8, 2))))).lower(ids)
    assert "optimization_barrier" in hlo.as_text()


def test_gather_rows_fills_used_blocks_with_x_rows():
    """Row r of every used block is x[src_row[r]], or zero for a padding row in a tile of 16 rows with real rows;
    tiles of padding rows only are not written (what is there is never read into a real row)."""
    rng = np.random.RandomState(0)
    n, e, k, d, bm = 45, 8, 3, 64, 32
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(n)]).astype(np.int32)
    w = (rng.rand(n, k) + 0.1).astype(np.float32)
    w[3] = 0
    lay = ge.group_layout(jnp.zeros((n, e)), k, bm, routed=(jnp.asarray(ids), jnp.asarray(w)))
    x = rng.randn(n, d).astype(np.float32)
    src, blocks = np.asarray(lay.src_row), np.asarray(lay.block_expert)
    got = np.asarray(ge.gather_rows(jnp.asarray(x), lay, bm, tiles=ge.RowTiles(16, 32), interpret=True))
    used = np.repeat(blocks >= 0, bm)
    assert used.sum() < used.size  # some blocks unused: they are not written, and not read
    written = used & np.repeat(src[::16] < n, 16)  # tiles whose first row is real
    assert written.sum() < used.sum()  # some tiles of padding rows only
    want = np.where((src < n)[:, None], x[np.minimum(src, n - 1)], 0)
    np.testing.assert_array_equal(got[written], want[written])


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


@pytest.mark.parametrize("b,t,h,d", [(2, 24, 4, 64), (1, 40, 8, 128), (1, 6, 1, 16)])
def test_norm_rope_equals_the_xla_path_bit_for_bit(b, t, h, d):
    """The fused per-head RMSNorm + RoPE kernel rounds as the XLA path does (RMSNorm then apply_rope, bf16)."""
    from mixjax.kernels.norm_rope import norm_rope
    from mixjax.models.layers import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq

    rng = np.random.RandomState(t)
    x = jnp.asarray(rng.randn(b, t, h, d) * 3, jnp.bfloat16)
    norm = RMSNorm(d, "n", eps=1e-6, dtype=jnp.bfloat16)
    norm.w[...] = jnp.asarray(rng.randn(d) * 0.5 + 1, jnp.bfloat16)
    pos = jnp.asarray(np.broadcast_to(np.arange(5, 5 + t), (b, t)), jnp.int32)
    cos, sin = rope_cos_sin(pos, *rope_inv_freq(d, 1e6, None, 4096))
    want = jax.jit(lambda x: apply_rope(norm(x), cos, sin))(x)
    got = norm_rope(x, norm.w[...], cos, sin, eps=1e-6, interpret=True)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_norm_rope_reads_q_and_k_heads_of_a_fused_output():
    """heads/first pick q's and k's heads out of a fused [q | k | v] output: the same values as on their own."""
    from mixjax.kernels.norm_rope import norm_rope
    from mixjax.models.layers import rope_cos_sin, rope_inv_freq

    rng = np.random.RandomState(0)
    qkv = jnp.asarray(rng.randn(1, 8, 8 + 2 + 2, 32), jnp.bfloat16)
    w = jnp.asarray(rng.randn(32) + 1, jnp.bfloat16)
    cos, sin = rope_cos_sin(jnp.arange(8)[None], *rope_inv_freq(32, 1e4, None, 64))
    for h, first in ((8, 0), (2, 8)):
        got = norm_rope(qkv, w, cos, sin, eps=1e-6, heads=h, first=first, interpret=True)
        alone = norm_rope(qkv[:, :, first:first + h], w, cos, sin, eps=1e-6, interpret=True)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(alone, np.float32))
    with pytest.raises(ValueError, match="multiple of heads"):
        norm_rope(qkv, w, cos, sin, eps=1e-6, heads=4, first=10, interpret=True)


def test_norm_rope_refuses_heads_triton_cannot_tile():
    from mixjax.kernels.norm_rope import norm_rope, supported

    assert supported(32, 128) and supported(4, 128) and not supported(3, 128) and not supported(4, 96)
    with pytest.raises(ValueError, match="powers of two"):
        norm_rope(jnp.zeros((1, 4, 3, 64)), jnp.ones(64), jnp.zeros((1, 4, 32)), jnp.zeros((1, 4, 32)), eps=1e-6,
                  interpret=True)
