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


@pytest.mark.parametrize("pallas", [None, "interpret"])
def test_qwen3_routes_on_float32_logits_of_a_bf16_model(pallas):
    """A bf16 model's router logits are not rounded to bf16 before the choice: two experts whose logits differ by
    less than a bf16 unit (1 and 1 + 2^-10 after the norm's scaling, equal once rounded) are told apart as the
    float32 model tells them, on XLA's path, the router kernel's (prompts, batch > 1) and the one-token path's
    (the router's gemv with the residual sum and the norm). A rounding there flips a near-tie, which moves the row
    further than any other rounding does."""
    from flax import nnx
    from mixjax.models.layers import RMSNorm
    from mixjax.models.qwen3_moe import Qwen3MoE, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=16, moe_intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=8,
                         num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=(),
                         rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling=None, max_position_embeddings=64,
                         tie_word_embeddings=False)
    moe = Qwen3MoE(cfg, "mlp", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    w = np.full((8, 16), 0.0, np.float32)
    w[:, 0] = -2.0
    w[0, 0] = w[1, 0] = 1.0
    w[1, 1] = 2.0 ** -10  # expert 1's logit: 1 + 2^-10 times expert 0's
    w[2, 0] = 2.0  # expert 2: the first choice; 0 and 1 compete for the second
    moe.router.w[...] = jnp.asarray(w, jnp.bfloat16)
    x = jnp.asarray(np.eye(16, dtype=np.float32)[:2].sum(0, keepdims=True), jnp.bfloat16)  # [1, 16]: 1, 1, 0, ...
    ids, _ = moe.route(jnp.concatenate([x, x]), pallas)  # two rows: the router kernel's path under Pallas
    np.testing.assert_array_equal(np.sort(np.asarray(ids), axis=1), [[1, 2], [1, 2]])
    if pallas:
        norm = RMSNorm(16, "norm", eps=1e-6, dtype=jnp.bfloat16)
        ids, _, _ = moe.route_token(x, jnp.zeros_like(x), norm, pallas, live=None, rows=16)
        np.testing.assert_array_equal(np.sort(np.asarray(ids[:, :2]), axis=1), [[1, 2]])
