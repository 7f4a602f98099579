"""Parity with Hugging Face transformers (fixtures written by tools/make_fixtures.py): float32 logits within
1e-4 relative error and identical greedy continuations, through the public Python API."""

import numpy as np
import pytest

import mixjax
from conftest import FIXTURES, fixture_dirs, reference, rel_err

NAMES = [p.name for p in fixture_dirs()]


@pytest.fixture(scope="module", params=NAMES)
def loaded(request):
    return request.param, mixjax.LLM(FIXTURES / request.param, mesh="1x1", strategy="tp", progress=False)


def test_fixtures_cover_both_families():
    import json
    archs = {json.loads((FIXTURES / n / "config.json").read_text())["architectures"][0] for n in NAMES}
    assert archs == {"Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM"}


def test_logits_match_reference(loaded):
    name, llm = loaded
    ref = reference(name)
    got = llm.logits(ref["input_ids"].tolist())
    assert got.shape == ref["logits"].shape
    assert rel_err(got, ref["logits"]) < 1e-4


def test_greedy_matches_reference(loaded):
    name, llm = loaded
    ref = reference(name)
    want = ref["greedy"].reshape(-1).tolist()
    got = llm.generate(ref["prompt"].tolist(), max_new_tokens=len(want), temperature=0.0, stop_token_ids=set())[0]
    assert got == want


DEEPSEEK = [n for n in NAMES if "deepseek" in n]


@pytest.mark.parametrize("name", DEEPSEEK)
def test_mla_latent_and_expanded_attention_match_reference(name, monkeypatch):
    """MLA attends in the latent space for few new tokens (decode) and expands the latent into per-head keys and
    values for long prompts: both forms give the reference's logits, for the whole prompt at once and one token at a
    time (every position's logits from decode steps over the cache)."""
    import jax.numpy as jnp

    from mixjax.models import deepseek_v3

    ref = reference(name)
    ids = ref["input_ids"]
    b, t = ids.shape
    for limit in (0, 10 ** 6):  # expanded everywhere / latent everywhere
        monkeypatch.setattr(deepseek_v3, "ABSORB_MAX_TOKENS", limit)
        llm = mixjax.LLM(FIXTURES / name, mesh="1x1", strategy="tp", progress=False)
        assert rel_err(llm.logits(ids.tolist()), ref["logits"]) < 1e-4
        m, cache, steps = llm.model, llm.model.init_cache(b, t), []
        for i in range(t):
            lg, cache = m.forward(jnp.asarray(ids[:, i: i + 1], jnp.int32), jnp.full((b, 1), i, jnp.int32), cache)
            steps.append(np.asarray(lg)[:, 0, : m.vocab_size])
        assert rel_err(np.stack(steps, axis=1), ref["logits"]) < 1e-4


def test_fused_products_of_a_long_input_are_apart():
    """FusedLinear.products: from UNSHARED_ROWS rows each group of parts is its own product with its own handle on
    x (an optimisation barrier, so that XLA's dot merger does not merge them back); fewer rows get the one fused
    product. The values are x times each part's weight either way."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from mixjax.models.layers import UNSHARED_ROWS, FusedLinear

    lin = FusedLinear(32, (64, 16, 16), (None, None), ["q", "k", "v"], "qkv", dtype=jnp.float32, rngs=nnx.Rngs(0),
                      out_major=True)
    w = np.asarray(lin.w[...])
    for rows, apart in ((UNSHARED_ROWS, True), (UNSHARED_ROWS // 4, False)):
        x = jnp.asarray(np.random.RandomState(rows).randn(rows, 32), jnp.float32)
        f = jax.jit(lambda x: lin.products(x, ((0,), (1, 2))))
        assert ("optimization_barrier" in f.lower(x).as_text()) == apart  # what XLA is given
        ys = f(x)
        assert len(ys) == (2 if apart else 1)
        got = np.concatenate([np.asarray(y) for y in ys], axis=-1)
        np.testing.assert_allclose(got, np.asarray(x) @ w.T, rtol=1e-5, atol=1e-5)
