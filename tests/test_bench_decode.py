"""mixjax.bench.decode: the roofline and FLOP counts for both families, and a tiny DeepSeek run end to end (CPU)."""

import json

import jax
import jax.numpy as jnp
import pytest

from mixjax.bench import decode
from mixjax.bench.decode import (bench_config, param_counts, prefill_bytes, prefill_flops, prefill_roofline,
                                 step_bytes)
from mixjax.sharding.mesh import make_mesh
from mixjax.sharding.runner import ShardedModel
from mixjax.sharding.strategies import STRATEGIES


# The Qwen3-only formulas bench.decode used before the counts were read off the model (copied by hand).
def old_attn_params(cfg):
    d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    return d * hd * (2 * h + 2 * kv)


def old_step_bytes(cfg, batch, ctx, elem=2):
    d, kv, hd = cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim
    e, k, f = cfg.num_experts, cfg.top_k, cfg.moe_intermediate_size
    touched = e * (1 - (1 - k / e) ** batch)
    experts = touched * 3 * d * f * elem
    router = d * e * elem
    kv_cache = batch * ctx * 2 * kv * hd * elem
    head = cfg.vocab_size * d * elem
    return cfg.num_hidden_layers * (old_attn_params(cfg) * elem + experts + router + kv_cache) + head


def old_prefill_flops(cfg, t):
    d, h, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    per_token = old_attn_params(cfg) + d * cfg.num_experts + cfg.top_k * 3 * d * cfg.moe_intermediate_size
    scores = 2 * 2 * h * hd * t * (t + 1) / 2
    return cfg.num_hidden_layers * (2 * per_token * t + scores) + 2 * d * cfg.vocab_size


@pytest.mark.parametrize("layers", [1, 4])
def test_qwen_counts_equal_the_old_formulas(layers):
    cfg = bench_config("qwen3-30b-a3b", layers, 151936)
    for batch in (1, 8, 32, 128, 256):
        for ctx in (64, 1024, 8192):
            assert step_bytes(cfg, batch, ctx) == pytest.approx(old_step_bytes(cfg, batch, ctx), rel=1e-9)
    for t in (1, 512, 2048, 8192):
        assert prefill_flops(cfg, t) == pytest.approx(old_prefill_flops(cfg, t), rel=1e-9)


def test_deepseek_counts():
    cfg = bench_config("deepseek-tiny", 2, 512)
    d, h, e, k, f = cfg.hidden_size, cfg.num_attention_heads, cfg.num_experts, cfg.top_k, cfg.moe_intermediate_size
    nope, rope, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    c = param_counts(cfg)
    # MLA + shared expert + router per layer, by hand
    mla = (d * cfg.q_lora_rank + cfg.q_lora_rank * h * (nope + rope) + d * (cfg.kv_lora_rank + rope)
           + cfg.kv_lora_rank * h * (nope + v) + h * v * d)
    assert c["fixed_params"] == 2 * (mla + 3 * d * f * cfg.num_shared_experts + d * e)
    assert c["fixed_bytes"] == 2 * (2 * (mla + 3 * d * f) + 4 * d * e)  # the router is float32
    assert c["head_params"] == d * cfg.vocab_size
    assert {layer: r[2] for layer, r in c["routed"].items()} == {0: e * 3 * d * f * 2, 1: e * 3 * d * f * 2}
    # the latent cache (c_kv + k_pe), as the model lays it out
    assert c["cache_bytes_per_token"] == cfg.kv_cache_bytes_per_token(2) == 2 * (cfg.kv_lora_rank + rope) * 2
    model = ShardedModel(cfg, make_mesh("1x1"), STRATEGIES["tp"], dtype=jnp.bfloat16)
    assert step_bytes(cfg, 1, 1000) - step_bytes(cfg, 1, 0) == pytest.approx(model.cache_bytes(1, 1000), rel=1e-9)
    # the experts the batch touches in expectation: 1 - (1 - k/E)^B of them, all E in the limit
    ctx, per_expert = 16, 3 * d * f * 2 * 2  # two MoE layers
    base = c["fixed_bytes"] + c["head_bytes"]
    prev = 0
    for b in (1, 2, 4, 16, 64, 1024):
        got = step_bytes(cfg, b, ctx)
        touched = e * (1 - (1 - k / e) ** b)
        assert got == pytest.approx(base + touched * per_expert + b * ctx * c["cache_bytes_per_token"], rel=1e-12)
        assert got > prev
        prev = got
    assert step_bytes(cfg, 1, ctx) - base - ctx * c["cache_bytes_per_token"] == pytest.approx(k * per_expert)
    # dense first layers hold no routed experts
    assert list(param_counts(bench_config("deepseek-tiny", 2, 512, dense_layers=1))["routed"]) == [1]
    # prefill: active parameters per token, MLA over the causal t(t+1)/2 (query, key) pairs, one LM-head row
    t = 32
    want = (2 * t * (c["fixed_params"] + 2 * k * 3 * d * f) + 2 * 2 * h * (nope + rope + v) * t * (t + 1) / 2
            + 2 * d * cfg.vocab_size)
    assert prefill_flops(cfg, t) == pytest.approx(want, rel=1e-12)


def test_deepseek_v3_preset_shapes():
    cfg = bench_config("deepseek-v3", 2, 129280)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_experts, cfg.top_k, cfg.first_k_dense_replace) == (
        7168, 128, 256, 8, 0)
    assert cfg.rope_scaling["factor"] == 40 and cfg.rope_interleave
    c = param_counts(cfg)
    total = sum(r[2] for r in c["routed"].values()) + c["fixed_bytes"] + 2 * c["head_bytes"]  # + embedding
    assert 45e9 < total < 60e9  # what docs/BENCHMARKS.md quotes for the GPU command (fits one H200)


def test_deepseek_tiny_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "measure_hbm_bandwidth", lambda: 1e11)
    monkeypatch.setattr(decode, "measure_matmul_rate", lambda: 1e12)
    out = tmp_path / "ds.json"
    assert decode.main(["--preset", "deepseek-tiny", "--layers", "2", "--dense-layers", "1", "--batch", "1,2",
                        "--ctx", "16", "--impl", "dense", "--prefill", "8", "--prefill-rows", "1,2", "--iters", "1",
                        "--dtype", "float32", "--peer", "--json", str(out),
                        "--prefill-plot", str(tmp_path / "prefill.png")]) == 0
    assert (tmp_path / "prefill.png").stat().st_size > 0
    res = json.loads(out.read_text())
    assert res["peer"] is None and res["args"]["vocab"] == 512
    assert [r["batch"] for r in res["decode"]] == [1, 2]
    for r in res["decode"]:
        assert {"impl", "batch", "step_s", "roofline_s", "ratio", "tokens_per_s", "speedup_vs_peer",
                "back_to_back_step_s", "back_to_back_ratio"} <= set(r)
        assert r["step_s"] > 0 and r["roofline_s"] > 0
    p, p2 = res["prefill"]
    assert (p["rows"], p2["rows"]) == (1, 2) and p["tokens"] == p2["tokens"] == 8
    assert {"impl", "tokens", "time_s", "tokens_per_s", "flops", "flop_rate", "matmul_fraction", "roofline_s",
            "bound", "ratio", "b2b_time_s", "b2b_matmul_fraction", "b2b_ratio",
            "burst_mean_s"} <= set(p)
    assert p["flops"] == prefill_flops(bench_config("deepseek-tiny", 2, 512, dense_layers=1), 8)
    assert p["b2b_time_s"] > 0 and p["b2b_matmul_fraction"] == pytest.approx(p["flops"] / p["b2b_time_s"]
                                                                             / res["matmul_rate"])
    # two prompts in one call: twice the FLOPs, twice the tokens per call
    assert p2["flops"] == pytest.approx(2 * p["flops"])
    assert p2["tokens_per_s"] == pytest.approx(16 / p2["time_s"])
    # the plots again from the saved result, measuring nothing
    monkeypatch.setattr(decode, "time_prefill", lambda *a: pytest.fail("--replot measured"))
    assert decode.main(["--replot", str(out), "--plot", str(tmp_path / "d2.png"),
                        "--prefill-plot", str(tmp_path / "p2.png")]) == 0
    assert (tmp_path / "d2.png").stat().st_size > 0 and (tmp_path / "p2.png").stat().st_size > 0
    with pytest.raises(SystemExit):  # nothing to draw
        decode.main(["--replot", str(out)])


def test_prompt_that_fails_on_the_device_is_reported_not_raised(tmp_path, monkeypatch):
    """A prefill that the device cannot run (here: the out-of-memory error XLA raises) becomes a row with its error,
    and the prompts after it are still measured."""
    real = decode.time_prefill

    def fails_at_16(model, t, iters, rows):
        if t == 16:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 56.02GiB")
        return real(model, t, iters, rows)

    monkeypatch.setattr(decode, "time_prefill", fails_at_16)
    monkeypatch.setattr(decode, "measure_hbm_bandwidth", lambda: 1e11)
    monkeypatch.setattr(decode, "measure_matmul_rate", lambda: 1e12)
    out = tmp_path / "r.json"
    assert decode.main(["--preset", "deepseek-tiny", "--layers", "1", "--batch", "1", "--ctx", "16", "--impl",
                        "dense", "--prefill", "16,8", "--iters", "1", "--dtype", "float32", "--json", str(out)]) == 0
    failed, done = json.loads(out.read_text())["prefill"]
    assert failed == {"impl": "dense", "tokens": 16, "rows": 1, "error": "RESOURCE_EXHAUSTED: Out of memory while trying to "
                                                                "allocate 56.02GiB"}
    assert done["tokens"] == 8 and done["time_s"] > 0


def test_prefill_roofline_is_the_larger_bound():
    """DeepSeek-V3 at 2048 tokens touches every expert with ~64 rows each: its weights take longer to read than its
    FLOPs take to compute on an H200 (memory-bound); Qwen3-30B-A3B at 8192 tokens is compute-bound."""
    bw, rate = 4.3e12, 900e12
    ds = bench_config("deepseek-v3", 2, 129280)
    c = param_counts(ds)
    experts = sum(r[2] for r in c["routed"].values())
    assert prefill_bytes(ds, 2048) == pytest.approx(c["fixed_bytes"] + c["head_bytes"] + experts
                                                    + 2048 * c["cache_bytes_per_token"], rel=1e-6)
    t, bound = prefill_roofline(ds, 2048, bw, rate)
    assert bound == "memory" and t == pytest.approx(prefill_bytes(ds, 2048) / bw)
    t, bound = prefill_roofline(bench_config("qwen3-30b-a3b", 4, 151936), 8192, bw, rate)
    assert bound == "compute" and t == pytest.approx(prefill_flops(bench_config("qwen3-30b-a3b", 4, 151936), 8192)
                                                     / rate)
    # a 2048-token Qwen3 prompt reads every expert for ~128 rows each: memory-bound alone, compute-bound with a second
    # prompt in the same call (the weights are read once for both)
    q = bench_config("qwen3-30b-a3b", 4, 151936)
    assert prefill_roofline(q, 2048, bw, rate)[1] == "memory"
    t, bound = prefill_roofline(q, 2048, bw, rate, rows=2)
    assert bound == "compute" and t == pytest.approx(2 * prefill_flops(q, 2048) / rate)
    assert prefill_bytes(q, 2048, rows=2) == pytest.approx(prefill_bytes(q, 4096), rel=1e-6)


def test_bench_model_routes_a_long_prompt_evenly():
    """The benchmark's random model (`bench_model`) sends a prompt's rows to every expert in every layer, as a trained,
    load-balanced model does. With all weights at N(0, 0.02) (the model class's own init) the attention's output
    outweighed the token's embedding and the later layers sent a third or more of the pairs to one expert: a long
    prompt then read fewer expert weights than the roofline and a trained model."""
    import numpy as np
    from flax import nnx
    from mixjax.bench.decode import bench_model
    from mixjax.bench.routing import recorded_routing
    from mixjax.models import model_class

    cfg = bench_config("tiny", 4, 256)
    t = 256
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (1, t)), jnp.int32)
    busiest = {}
    for name, model in (("plain", model_class(cfg)(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))),
                        ("bench", bench_model(cfg, jnp.float32))):
        m = ShardedModel(cfg, make_mesh("1x1"), STRATEGIES["tp"], dtype=jnp.float32, expert_impl="dense")
        m.set_state(nnx.state(model))
        with recorded_routing() as seen:
            m.forward(tokens, jnp.arange(t, dtype=jnp.int32)[None], m.init_cache(1, t))
            jax.effects_barrier()
        assert len(seen) == 4
        counts = [np.bincount(ids.reshape(-1), minlength=cfg.num_experts) for ids in seen]
        busiest[name] = max(c.max() / c.sum() for c in counts)  # uniform routing: ~1/16 of the pairs
        if name == "bench":
            assert all((c > 0).all() for c in counts)
    assert busiest["bench"] < 0.15 < 0.3 < busiest["plain"]


def test_engine_ratio_is_to_the_roofline_of_the_positions_it_read(tmp_path, monkeypatch):
    """The engine decodes from 8-token prompts, so its steps read far less of the cache than --ctx positions: its
    ratio must be to the roofline of the positions it read, not to the --ctx one (which flattered it at large
    batches). The peer (a stand-in here: torch is not installed) is compared with the waited forward and, as a
    server runs, with the engine at K steps per dispatch."""
    monkeypatch.setattr(decode, "measure_hbm_bandwidth", lambda: 1e11)
    monkeypatch.setattr(decode, "measure_matmul_rate", lambda: 1e12)
    monkeypatch.setattr(decode, "run_peer", lambda args: {"peer": "stand-in", "rows": [{"batch": 2, "step_s": 3.0}]})
    out = tmp_path / "eng.json"
    assert decode.main(["--preset", "tiny", "--layers", "1", "--batch", "2", "--ctx", "64", "--impl", "dense",
                        "--iters", "1", "--dtype", "float32", "--engine", "6", "--engine-steps", "2", "--peer",
                        "--json", str(out), "--plot", str(tmp_path / "d.png")]) == 0
    (r,) = json.loads(out.read_text())["decode"]
    cfg = bench_config("tiny", 1, json.loads(out.read_text())["args"]["vocab"])
    for key in ("engine_pipelined", "engine_multistep2"):
        # tokens 1..5 of each request (the first comes from the prefill) read 8 + j positions, j in 1..5
        assert 9 <= r[key + "_mean_ctx"] <= 13
        assert r[key + "_roofline_s"] == pytest.approx(decode.step_bytes(cfg, 2, r[key + "_mean_ctx"]) / 1e11)
        assert r[key + "_roofline_s"] < r["roofline_s"]  # 64 positions counted for the forward
        assert r[key + "_ratio"] == pytest.approx(r[key + "_roofline_s"] / r[key + "_step_s"])
    assert r["speedup_vs_peer"] == pytest.approx(3.0 / r["step_s"])
    assert r["engine_speedup_vs_peer"] == pytest.approx(3.0 / r["engine_multistep2_step_s"])
