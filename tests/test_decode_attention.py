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
