"""The decode attention kernel (Pallas, interpreted on CPU) equals write_cache + attend with causal_mask."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from mixjax.kernels.decode_attention import decode_attention, plan
from mixjax.models.layers import RMSNorm, apply_rope, attend, causal_mask, rope_cos_sin, rope_inv_freq, write_cache


def reference(q, k_new, v_new, kc, vc, pos, scale):
    kc = write_cache(kc, k_new[:, :, None], pos, seq_axis=2)
    vc = write_cache(vc, v_new[:, :, None], pos, seq_axis=2)
    out = attend(q[:, None], kc, vc, causal_mask(pos[:, None], kc.shape[2]), scale, heads_major=True)
    return out[:, 0], kc, vc


# (batch, query heads, KV heads, head dim, cache slots, positions): groups of 8 (padded to 16 rows) and 16, one
# chunk and several, a position in the first block, mid-cache, at the last slot and past the end (clamped write);
# groups of 6 (not a power of two: the chunks combined by XLA, not by the combine kernel).
@pytest.mark.parametrize("b,h,kv,d,s,pos", [(1, 8, 1, 16, 64, [37]), (3, 8, 2, 32, 128, [0, 70, 127]),
                                            (2, 32, 2, 16, 256, [255, 300]), (4, 16, 4, 16, 48, [5, 16, 33, 47]),
                                            (2, 12, 2, 32, 128, [10, 127])])
def test_decode_attention_equals_reference(b, h, kv, d, s, pos):
    rng = np.random.RandomState(b * s)
    f = lambda *shape: jnp.asarray(rng.randn(*shape).astype(np.float32))
    q, k_new, v_new, kc, vc = f(b, h, d), f(b, kv, d), f(b, kv, d), f(b, kv, s, d), f(b, kv, s, d)
    pos = jnp.asarray(pos, jnp.int32)
    want = reference(q, k_new, v_new, kc, vc, pos, d ** -0.5)
    got = decode_attention(q, k_new, v_new, kc, vc, pos, scale=d ** -0.5, interpret=True)
    assert rel_err(np.asarray(got[0]), np.asarray(want[0])) < 1e-5
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))  # the caches, bit for bit
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))


def test_larger_key_blocks_equal_reference():
    """`block` (a tuning knob: fewer, larger steps per program) changes the tiling, not the function."""
    rng = np.random.RandomState(7)
    f = lambda *shape: jnp.asarray(rng.randn(*shape).astype(np.float32))
    b, h, kv, d, s = 2, 8, 2, 16, 512
    q, k_new, v_new, kc, vc = f(b, h, d), f(b, kv, d), f(b, kv, d), f(b, kv, s, d), f(b, kv, s, d)
    pos = jnp.asarray([300, 511], jnp.int32)
    assert plan(b, kv, s, bk=128) == (128, 4)
    want = reference(q, k_new, v_new, kc, vc, pos, d ** -0.5)
    got = decode_attention(q, k_new, v_new, kc, vc, pos, scale=d ** -0.5, interpret=True, block=128)
    assert rel_err(np.asarray(got[0]), np.asarray(want[0])) < 1e-5
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))
    with pytest.raises(ValueError, match="powers of two from 16 dividing the cache"):
        plan(b, kv, 48, bk=32)


def test_chunks_fill_the_gpu_for_small_batches():
    assert plan(1, 4, 1024) == (64, 16)  # 4 programs would leave most SMs idle: 16 chunks of one block each
    assert plan(64, 4, 1024) == (64, 1)  # 256 programs already
    assert plan(2, 4, 48) == (16, 1)  # 3 blocks: no whole split


@pytest.mark.parametrize("b,h,kv,d,s,pos", [(1, 8, 1, 32, 64, [37]), (3, 16, 2, 64, 128, [0, 70, 300])])
def test_decode_attention_with_qk_norm_and_rope_equals_reference(b, h, kv, d, s, pos):
    """Raw q / k projections in, the kernel normalises (RMSNorm with the q-norm / k-norm weights) and rotates
    (RoPE) them as the model's XLA path does; the cache holds the rotated key."""
    rng = np.random.RandomState(b * d)
    f = lambda *shape: jnp.asarray(rng.randn(*shape).astype(np.float32))
    q, k_new, v_new, kc, vc = f(b, h, d), f(b, kv, d), f(b, kv, d), f(b, kv, s, d), f(b, kv, s, d)
    qw, kw = f(d) * 0.5 + 1, f(d) * 0.5 + 1
    pos = jnp.asarray(pos, jnp.int32)
    inv_freq, factor = rope_inv_freq(d, 10000.0, None, 4096)
    cos, sin = rope_cos_sin(pos[:, None], inv_freq, factor)  # [B, 1, D/2]
    norm = lambda x, w: RMSNorm.__call__(type("N", (), {"w": w, "eps": 1e-6})(), x)
    qr = apply_rope(norm(q, qw)[:, None], cos, sin)[:, 0]
    kr = apply_rope(norm(k_new, kw)[:, None], cos, sin)[:, 0]
    want = reference(qr, kr, v_new, kc, vc, pos, d ** -0.5)
    got = decode_attention(q, k_new, v_new, kc, vc, pos, scale=d ** -0.5, interpret=True,
                           qk_norm=(qw, kw, cos[:, 0], sin[:, 0]), eps=1e-6)
    assert rel_err(np.asarray(got[0]), np.asarray(want[0])) < 1e-5
    assert rel_err(np.asarray(got[1]), np.asarray(want[1])) < 1e-6  # the rotated key, written into its slot
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))


@pytest.mark.parametrize("b,h,kv,d,s,pos", [(1, 32, 4, 32, 64, [37]), (2, 32, 8, 16, 128, [0, 90])])
def test_decode_attention_reads_a_fused_qkv_output_in_place(b, h, kv, d, s, pos):
    """q, k and v given as one fused projection's output [B, H + 2K, D]: the kernel reads its rows in place
    (each program's 16 rows run past its group into the next group or the k / v heads, and those rows' results
    are discarded) and returns what it returns for q, k and v apart."""
    from mixjax.kernels.decode_attention import reads_in_place
    rng = np.random.RandomState(h + b)
    f = lambda *shape: jnp.asarray(rng.randn(*shape).astype(np.float32))
    qkv, kc, vc = f(b, h + 2 * kv, d), f(b, kv, s, d), f(b, kv, s, d)
    qw, kw = f(d) * 0.5 + 1, f(d) * 0.5 + 1
    pos = jnp.asarray(pos, jnp.int32)
    cos, sin = rope_cos_sin(pos[:, None], *rope_inv_freq(d, 10000.0, None, 4096))
    kw_args = dict(scale=d ** -0.5, interpret=True, qk_norm=(qw, kw, cos[:, 0], sin[:, 0]), eps=1e-6)
    assert reads_in_place(h, kv, h + 2 * kv, 0)
    want = decode_attention(qkv[:, :h], qkv[:, h:h + kv], qkv[:, h + kv:], kc, vc, pos, **kw_args)
    got = decode_attention(qkv, None, None, kc, vc, pos, fused=(0, h, h, h + kv), **kw_args)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_in_place_reads_stay_inside_the_fused_output():
    from mixjax.kernels.decode_attention import reads_in_place
    assert reads_in_place(32, 4, 40, 0)  # Qwen3-30B-A3B: the last group's 8 padding rows are the 4 k and 4 v heads
    assert not reads_in_place(8, 1, 10, 0)  # one KV head: its group's 16 rows would run 6 past the end
    assert reads_in_place(64, 4, 72, 0)  # groups of 16: no padding rows


@pytest.mark.parametrize("b,kv,s,programs", [(1, 2, 64, 2), (3, 2, 128, 4)])
def test_one_chunk_output_equals_the_combine_kernel(monkeypatch, b, kv, s, programs):
    """A call that reads the cache in one chunk per (row, KV head) writes its output from the attention kernel, the
    same bits as the combine kernel after it: the same operations in the same order (weights exp(0) = 1, sums of
    one term)."""
    import mixjax.kernels.decode_attention as da
    h, d = 8, 16
    rng = np.random.RandomState(b + s)
    f = lambda *shape: jnp.asarray(rng.randn(*shape).astype(np.float32))
    q, k_new, v_new, kc, vc = f(b, h, d), f(b, kv, d), f(b, kv, d), f(b, kv, s, d), f(b, kv, s, d)
    pos = jnp.asarray([s - 1, 40, 3][:b], jnp.int32)
    assert plan(b, kv, s, programs=programs)[1] == 1
    run = lambda: decode_attention(q, k_new, v_new, kc, vc, pos, scale=d ** -0.5, interpret=True, programs=programs)
    outs = {}
    for direct in (False, True):
        monkeypatch.setattr(da, "ONE_CHUNK_OUTPUT", direct)
        decode_attention.clear_cache()  # the knob is read at trace time
        outs[direct] = run()
    for g, w in zip(outs[True], outs[False]):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert rel_err(np.asarray(outs[True][0]), np.asarray(reference(q, k_new, v_new, kc, vc, pos, d ** -0.5)[0])) < 1e-5
