"""The one-row product kernel (mixjax.kernels.gemv, run interpreted on CPU): (RMSNorm(x) or x) @ W^T in float32
equals numpy's, and shapes it cannot take are refused by name."""
import jax.numpy as jnp
import numpy as np
import pytest

from mixjax.kernels.gemv import gemv, gemv_many, supported, tiles


def _ref(x, w, norm=None, eps=None):
    x = x.astype(np.float64)
    if norm is not None:
        x = norm * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x @ w.T.astype(np.float64)


@pytest.mark.parametrize("n,k,with_norm", [(24, 64, True), (8, 48, False), (6, 32, True), (40, 128, False)])
def test_gemv_equals_reference(n, k, with_norm):
    rng = np.random.RandomState(n + k)
    x, w = rng.randn(1, k).astype(np.float32), rng.randn(n, k).astype(np.float32)
    norm = (1 + 0.3 * rng.randn(k)).astype(np.float32) if with_norm else None
    got = gemv(jnp.asarray(x), jnp.asarray(w), norm=None if norm is None else jnp.asarray(norm),
               eps=1e-6 if with_norm else None, interpret=True)
    np.testing.assert_allclose(np.asarray(got), _ref(x, w, norm, 1e-6), rtol=1e-5, atol=1e-5)


def test_gemv_blocks_cover_every_row():
    """A forced small tile still writes each of the N outputs once: a wrong block index map would leave zeros."""
    rng = np.random.RandomState(0)
    x, w = rng.randn(1, 64).astype(np.float32), rng.randn(32, 64).astype(np.float32)
    got = gemv(jnp.asarray(x), jnp.asarray(w), interpret=True, block=(2, 16, 4))
    np.testing.assert_allclose(np.asarray(got), _ref(x, w), rtol=1e-5, atol=1e-5)


def test_gemv_refuses_what_it_cannot_tile():
    with pytest.raises(ValueError, match="one row"):
        gemv(jnp.ones((2, 64)), jnp.ones((8, 64)), interpret=True)
    with pytest.raises(ValueError, match="multiple of 16"):
        gemv(jnp.ones((1, 40)), jnp.ones((8, 40)), interpret=True)
    with pytest.raises(ValueError, match="together"):
        gemv(jnp.ones((1, 64)), jnp.ones((8, 64)), norm=jnp.ones(64), interpret=True)
    assert not supported(8, 48) and supported(8, 48, gpu=False) and supported(4096, 2048)
    assert tiles(4096, 2048) == (4, 2048, 8) and tiles(6, 32) == (2, 32, 8)
    with pytest.raises(ValueError, match="does not divide"):
        gemv_many(jnp.ones((1, 64)), (jnp.ones((8, 64)), jnp.ones((6, 64))), interpret=True, block=(4, 16, 4))


def test_gemv_many_equals_each_projection():
    """q, k and v of different widths from one normed row in one launch: each output equals its own product."""
    rng = np.random.RandomState(3)
    x = rng.randn(1, 64).astype(np.float32)
    ws = [rng.randn(n, 64).astype(np.float32) for n in (32, 8, 8)]
    norm = (1 + 0.3 * rng.randn(64)).astype(np.float32)
    outs = gemv_many(jnp.asarray(x), tuple(map(jnp.asarray, ws)), norm=jnp.asarray(norm), eps=1e-6, interpret=True)
    assert [o.shape for o in outs] == [(1, 32), (1, 8), (1, 8)]
    for o, w in zip(outs, ws):
        np.testing.assert_allclose(np.asarray(o), _ref(x, w, norm, 1e-6), rtol=1e-5, atol=1e-5)


def test_gemv_adds_the_residual_and_emits_the_row_it_read():
    """add= takes the residual sum h = x + a (rounded to x's dtype, as XLA's add) before the norm, and emit=16
    returns the normed row the products read, on top of zero rows: in bf16 the row equals XLA's RMSNorm(h) bit for
    bit, and the product is that row's (to bf16 rounding: XLA may keep excess precision where the kernel rounds)."""
    from mixjax.models.layers import RMSNorm

    rng = np.random.RandomState(7)
    x, a = (jnp.asarray(rng.randn(1, 64), jnp.bfloat16) for _ in range(2))
    w = jnp.asarray(rng.randn(16, 64), jnp.bfloat16)
    norm = RMSNorm(64, "n", eps=1e-6, dtype=jnp.bfloat16)
    norm.w[...] = jnp.asarray(1 + 0.3 * rng.randn(64), jnp.bfloat16)
    y, u = gemv_many(x, (w,), norm=norm.w[...], eps=1e-6, add=a, emit=16, interpret=True)
    want_u = norm(x + a)
    assert u.shape == (16, 64)
    np.testing.assert_array_equal(np.asarray(u[:1], np.float32), np.asarray(want_u, np.float32))
    assert not np.asarray(u[1:], np.float32).any()
    want_y = _ref(np.asarray(want_u, np.float32), np.asarray(w, np.float32))
    np.testing.assert_allclose(np.asarray(y, np.float32), want_y, rtol=0, atol=1e-2 * np.abs(want_y).max())
    with pytest.raises(ValueError, match="x's shape"):
        gemv_many(x, (w,), add=a[:, :32], interpret=True)


def test_gemv_out_dtype_keeps_the_float32_sums():
    """out_dtype=float32 (a router's logits) returns the float32 sums of a bf16 row and weight unrounded: equal to
    float64 arithmetic on the bf16 values within float32 summation error, and rounded to bf16 they are the default
    output."""
    rng = np.random.RandomState(11)
    x, w = jnp.asarray(rng.randn(1, 64), jnp.bfloat16), jnp.asarray(rng.randn(16, 64), jnp.bfloat16)
    (f32,) = gemv_many(x, (w,), interpret=True, out_dtype=jnp.float32)
    (bf16,) = gemv_many(x, (w,), interpret=True)
    assert f32.dtype == jnp.float32 and bf16.dtype == jnp.bfloat16
    want = _ref(np.asarray(x, np.float32), np.asarray(w, np.float32))
    np.testing.assert_allclose(np.asarray(f32), want, rtol=1e-6, atol=1e-5)
    assert np.abs(np.asarray(f32) - np.asarray(f32.astype(jnp.bfloat16), np.float32)).max() > 0  # not rounded
    np.testing.assert_array_equal(np.asarray(f32.astype(jnp.bfloat16), np.float32), np.asarray(bf16, np.float32))
