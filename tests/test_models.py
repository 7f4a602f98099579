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
