"""The one-row projection kernel (Pallas, interpreted on CPU) equals x @ W for each of its matrices."""

import jax.numpy as jnp
import numpy as np

from conftest import rel_err
from mixjax.kernels.gemv import BK, BN, gemv, supported


def test_gemv_equals_matmul_for_each_matrix():
    rng = np.random.RandomState(0)
    k = 2 * BK
    x = rng.randn(1, k).astype(np.float32)
    ws = [rng.randn(k, n).astype(np.float32) for n in (4 * BN, BN, 2 * BN)]  # q, k, v-like: unequal widths
    outs = gemv(jnp.asarray(x), [jnp.asarray(w) for w in ws], interpret=True)
    assert len(outs) == 3
    for out, w in zip(outs, ws):
        assert out.shape == (1, w.shape[1])
        assert rel_err(np.asarray(out), x @ w) < 1e-6
    (logits,) = gemv(jnp.asarray(x, jnp.bfloat16), [jnp.asarray(ws[0], jnp.bfloat16)], out_dtype=jnp.float32,
                     interpret=True)
    assert logits.dtype == jnp.float32


def test_gemv_tiles_any_shape_by_powers_of_two():
    rng = np.random.RandomState(1)
    x = rng.randn(1, 48).astype(np.float32)  # bk 16
    ws = [rng.randn(48, n).astype(np.float32) for n in (6, 64)]  # bn 2 for both
    for out, w in zip(gemv(jnp.asarray(x), [jnp.asarray(w) for w in ws], interpret=True), ws):
        assert rel_err(np.asarray(out), x @ w) < 1e-6


def test_gemv_supports_one_row_and_one_contraction_dimension():
    w = np.zeros((BK, BN), np.float32)
    assert supported(1, [w, w])
    assert not supported(2, [w])  # two rows: XLA's matrix product
    assert not supported(1, [w, np.zeros((2 * BK, BN))])
