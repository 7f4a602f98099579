"""Token sampling (mixjax.sampling.sample): greedy rows take the argmax, sampled rows draw exactly what
jax.random.categorical draws with the same key, filters cut the distribution, and the draws follow the softmax."""
import jax
import jax.numpy as jnp
import numpy as np

from mixjax.sampling import _top_k_top_p, sample


def _keys(n, step=0):
    return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), step))(jnp.arange(n))


def test_mixed_batch_matches_categorical_and_argmax():
    rng = np.random.RandomState(0)
    logits = jnp.asarray(rng.randn(6, 50) * 3, jnp.float32)
    temp = jnp.asarray([0.0, 1.0, 0.7, 0.0, 1.3, 2.0], jnp.float32)
    top_k, top_p = jnp.asarray([0, 0, 5, 0, 0, 3], jnp.int32), jnp.asarray([1, 0.8, 1, 1, 0.5, 1], jnp.float32)
    for step in range(4):
        keys = _keys(6, step)
        for filt in (False, True):
            ids, lp = sample(logits, keys, temp, top_k, top_p, draw=True, filter=filt)
            scaled = logits / jnp.maximum(temp, 1e-6)[:, None]
            if filt:
                scaled = _top_k_top_p(scaled, top_k, top_p)
            want = jnp.where(temp > 0, jax.vmap(jax.random.categorical)(keys, scaled), jnp.argmax(logits, -1))
            np.testing.assert_array_equal(np.asarray(ids), np.asarray(want))
            np.testing.assert_allclose(np.asarray(lp), np.asarray(
                jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, None], -1)[:, 0]), rtol=1e-6)


def test_greedy_flag_and_filters_to_one_token_are_argmax():
    logits = jnp.asarray(np.random.RandomState(1).randn(4, 30), jnp.float32)
    best = np.asarray(jnp.argmax(logits, -1))
    ones, keys = jnp.ones(4, jnp.float32), _keys(4)
    ids, _ = sample(logits, keys, ones, jnp.zeros(4, jnp.int32), ones, draw=False, filter=False)
    np.testing.assert_array_equal(np.asarray(ids), best)
    ids, _ = sample(logits, keys, ones, jnp.ones(4, jnp.int32), ones)  # top-k 1
    np.testing.assert_array_equal(np.asarray(ids), best)
    ids, _ = sample(logits, keys, ones, jnp.zeros(4, jnp.int32), jnp.full(4, 1e-4, jnp.float32))  # top-p ~0
    np.testing.assert_array_equal(np.asarray(ids), best)


def test_draws_follow_the_softmax():
    """4000 rows over a 4-token vocabulary at temperature 1: each token's frequency within 0.03 of its probability
    (about 4 standard deviations)."""
    n = 4000
    logits = jnp.broadcast_to(jnp.asarray([2.0, 1.0, 0.5, -1.0], jnp.float32), (n, 4))
    ones = jnp.ones(n, jnp.float32)
    ids, _ = sample(logits, _keys(n), ones, jnp.zeros(n, jnp.int32), ones, draw=True, filter=False)
    freq = np.bincount(np.asarray(ids), minlength=4) / n
    np.testing.assert_allclose(freq, np.asarray(jax.nn.softmax(logits[0])), atol=0.03)
