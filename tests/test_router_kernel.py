"""The Pallas softmax top-k router (interpreted on CPU) equals Qwen3MoE.route."""

import jax.numpy as jnp
import numpy as np
import pytest

from mixjax.kernels.router import softmax_top_k, supported
from mixjax.models.layers import matmul


def route(x, w, k, norm):  # Qwen3MoE.route, written out
    import jax

    probs = jax.nn.softmax(matmul(x, w).astype(jnp.float32), axis=-1)
    wk, ids = jax.lax.top_k(probs, k)
    if norm:
        wk = wk / wk.sum(-1, keepdims=True)
    return ids, wk.astype(x.dtype)


@pytest.mark.parametrize("n,d,e,k,norm,dtype", [(1, 64, 16, 2, True, jnp.float32), (2, 256, 128, 8, True, jnp.float32),
                                                (16, 48, 32, 6, False, jnp.float32), (3, 128, 64, 4, True, jnp.bfloat16),
                                                (2, 48, 6, 2, True, jnp.float32)])  # 6 experts: padded to 16
def test_router_kernel_equals_route(n, d, e, k, norm, dtype):
    rng = np.random.RandomState(n * d)
    x = jnp.asarray(rng.randn(n, d), dtype)
    w = jnp.asarray(rng.randn(d, e) * 0.3, dtype)
    ids, wk = softmax_top_k(x, w, k=k, norm=norm, interpret=True)
    want_ids, want_w = route(x, w, k, norm)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
    tol = 2e-5 if dtype == jnp.float32 else 1e-2  # float32: the split-K partial sums round in another order
    np.testing.assert_allclose(np.asarray(wk, np.float32), np.asarray(want_w, np.float32), rtol=tol, atol=tol)


def test_ties_pick_the_lower_expert_first():
    """Equal probabilities: the lower expert index comes first, as lax.top_k orders them."""
    x = jnp.ones((1, 16), jnp.float32)
    w = jnp.zeros((16, 16), jnp.float32).at[:, 5].set(1.0).at[:, 9].set(1.0)
    ids, _ = softmax_top_k(x, w, k=4, norm=False, interpret=True)
    assert np.asarray(ids)[0].tolist() == [5, 9, 0, 1]


def test_shapes_outside_the_kernel_are_declined():
    assert supported(16, 2048, 128) and not supported(17, 2048, 128) and not supported(1, 2050, 128)
