"""The router kernel (Pallas, interpreted on CPU) routes as the XLA router does: softmax, top k (the lower index
first on ties), optional renormalisation."""

import jax.numpy as jnp
import numpy as np
import pytest

from mixjax.kernels.router import route, softmax_topk


def numpy_route(logits, k, norm):
    ids = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # ties: the lower index first
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    w = np.take_along_axis(p, ids, 1)
    return ids, (w / w.sum(1, keepdims=True) if norm else w)


@pytest.mark.parametrize("n,e,k,norm", [(1, 128, 8, True), (3, 24, 8, False), (5, 60, 4, True), (2, 8, 8, True)])
def test_router_kernel_equals_numpy_and_xla(n, e, k, norm):
    """Each row has ties across the top-k boundary; e=24 and 60 are padded to powers of two inside; k=e=8 takes
    every expert."""
    rng = np.random.RandomState(n * e + k)
    logits = rng.randn(n, e).astype(np.float32)
    for r in range(n):
        order = np.argsort(-logits[r], kind="stable")
        logits[r, order[max(0, k - 2):k + 2]] = logits[r, order[max(0, k - 2)]]
    want_ids, want_w = numpy_route(logits, k, norm)
    ids, w = route(jnp.asarray(logits), k=k, norm=norm, interpret=True)
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_allclose(np.asarray(w), want_w, rtol=1e-6, atol=1e-7)
    xla_ids, xla_w = softmax_topk(jnp.asarray(logits), k, norm)
    np.testing.assert_array_equal(np.asarray(xla_ids), want_ids)
    np.testing.assert_allclose(np.asarray(xla_w), want_w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("e", [128, 60])
def test_router_kernel_reads_bf16_logits_as_their_float32_values(e):
    """A router product's bf16 logits go to the kernel as they are (it converts them itself): the same ids and
    weights as the float32 values of those logits."""
    logits = jnp.asarray(np.random.RandomState(e).randn(3, e), jnp.bfloat16)
    ids, w = route(logits, k=8, norm=True, interpret=True)
    want_ids, want_w = route(logits.astype(jnp.float32), k=8, norm=True, interpret=True)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_ids))
    np.testing.assert_array_equal(np.asarray(w), np.asarray(want_w))


def test_router_kernel_masks_rows_without_a_token_and_rounds_the_weights():
    """live= zeroes the weights of rows that carry no token, dtype= rounds them as XLA's conversion does, and
    padded=True returns the kernel's [n, k_pad] outputs whose first k columns are the routing."""
    logits = jnp.asarray(np.random.RandomState(1).randn(3, 128), jnp.float32)
    ids, w = route(logits, k=8, norm=True, interpret=True)
    live = jnp.asarray([True, False, True])
    pids, pw = route(logits, k=8, norm=True, live=live, dtype=jnp.bfloat16, padded=True, interpret=True)
    assert pids.shape == pw.shape == (3, 16) and pw.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(pids[:, :8]), np.asarray(ids))
    want = jnp.where(live[:, None], w, 0).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(pw[:, :8], np.float32), np.asarray(want, np.float32))
