"""The embedded default model loads with no arguments and writes recognisable text."""

import mixjax


def test_default_model_generates_text():
    llm = mixjax.LLM(progress=False)
    assert llm.tokenizer is not None and llm.tokenizer.chat_template
    counted = llm.generate("Max counted: one, two,", max_new_tokens=12)[0]
    assert counted.startswith(" three, four")
    story = llm.generate("Once upon a time", max_new_tokens=30)[0]
    assert " went to the " in story and story.count(".") >= 2


def test_generate_steps_per_call_gives_the_same_tokens():
    """LLM.generate decodes several steps per device call; the tokens do not depend on how many: seeded sampling
    (per-step keys), a stop token reached mid-call, rows of different lengths, and max_new_tokens not a multiple
    of the call size."""
    llm = mixjax.LLM(progress=False)
    prompts = [llm.tokenizer.encode(p) for p in ("Once upon a time", "Max counted: one,", "The")]
    greedy = llm.generate(prompts, max_new_tokens=13, steps_per_call=1)
    stop = greedy[0][6]
    for kw in (dict(temperature=0.9, top_p=0.9, seed=3), dict(stop_token_ids=[stop])):
        one = llm.generate(prompts, max_new_tokens=13, steps_per_call=1, **kw)
        assert llm.generate(prompts, max_new_tokens=13, steps_per_call=4, **kw) == one
        assert llm.generate(prompts, max_new_tokens=13, steps_per_call=8, **kw) == one
    assert len(one[0]) == greedy[0].index(stop) and all(len(o) <= 13 for o in one)


def test_default_model_load_sharded_greedy_and_export_roundtrip():
    """The checkpoint through the low-level path: load_sharded on a 1x1 mesh, a greedy loop on the KV cache
    (one token per call, so one compile), and mixjax.export writing back the very tensors it was read from."""
    from pathlib import Path

    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    from mixjax.export import hf_tensors
    from mixjax.sharding.mesh import make_mesh
    from mixjax.sharding.runner import load_sharded
    from mixjax.sharding.strategies import STRATEGIES

    d = Path(mixjax.__file__).parent / "default_model"
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    sm = load_sharded(d, make_mesh("1x1"), STRATEGIES["tp"], progress=False)

    ids = tok.encode("Max counted: one, two,").ids
    cache, out = sm.init_cache(1, 64), []
    for pos in range(len(ids) + 10):
        t = ids[pos] if pos < len(ids) else out[-1]
        logits, cache = sm.forward(jnp.asarray([[t]], jnp.int32), jnp.asarray([[pos]], jnp.int32), cache)
        if pos >= len(ids) - 1:
            out.append(int(jnp.argmax(logits[0, -1, :sm.vocab_size])))
    assert tok.decode(out).startswith(" three, four, five")

    ref = load_file(str(d / "model.safetensors"))
    got = hf_tensors(nnx.merge(sm.graphdef, sm.state), dtype=np.float16)
    assert sorted(got) == sorted(ref) and "lm_head.weight" not in got
    for name, arr in ref.items():
        np.testing.assert_array_equal(got[name], arr, err_msg=name)
