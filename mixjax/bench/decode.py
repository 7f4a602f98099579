"""Decode-step time against the HBM roofline on the current device.

    python -m mixjax.bench.decode --preset qwen3-30b-a3b --layers 4 --batch 1,8,32,128 [--ctx 1024]

Random bf16 weights of the preset's real shapes (fewer layers), the real decode step (`ShardedModel.forward` with
one token per sequence and a KV cache of --ctx positions), timed on the device after warm-up (median of --iters).
The roofline time is the bytes a step must read once (attention and dense weights, embedding/LM head, the experts
the batch touches in expectation under uniform routing, the KV cache up to the current position) over the HBM
bandwidth measured in the same run (a large device-to-device copy, bytes read + written).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixjax.bench.layers import PRESETS, time_step
from mixjax.models.qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
from mixjax.sharding.mesh import make_mesh
from mixjax.sharding.runner import ShardedModel
from mixjax.sharding.strategies import STRATEGIES


def measure_hbm_bandwidth(n_bytes: int = 2 << 30, iters: int = 10) -> float:
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    copy(x).block_until_ready()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        copy(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n_bytes / statistics.median(times)


def step_bytes(cfg: Qwen3MoeConfig, batch: int, ctx: int, elem: int = 2) -> float:
    d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn = d * hd * (2 * h + 2 * kv) * elem
    e, k, f = cfg.num_experts, cfg.top_k, cfg.moe_intermediate_size
    touched = e * (1 - (1 - k / e) ** batch)
    experts = touched * 3 * d * f * elem
    router = d * e * elem
    kv_cache = batch * ctx * 2 * kv * hd * elem
    head = cfg.vocab_size * d * elem
    return cfg.num_hidden_layers * (attn + experts + router + kv_cache) + head


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--batch", default="1,8,32,128")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    p = dict(PRESETS[args.preset], vocab_size=args.vocab)
    cfg = Qwen3MoeConfig(num_hidden_layers=args.layers, norm_topk_prob=True, decoder_sparse_step=1,
                         mlp_only_layers=(), rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling=None,
                         max_position_embeddings=32768, tie_word_embeddings=False, **p)
    bw = measure_hbm_bandwidth()
    model = ShardedModel(cfg, make_mesh("1x1"), STRATEGIES["tp"], dtype=jnp.bfloat16)
    model.set_state(nnx.state(Qwen3MoeForCausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))
    rows = []
    print(f"{jax.devices()[0].device_kind}; measured HBM bandwidth {bw / 1e12:.2f} TB/s; preset {args.preset}, "
          f"{args.layers} layers, ctx {args.ctx}, bf16")
    print(f"{'batch':>6s} {'step ms':>9s} {'roofline ms':>12s} {'ratio':>7s} {'tok/s':>9s}")
    for b in (int(x) for x in args.batch.split(",")):
        t = time_step(model, b, 1, args.ctx, args.iters)  # one new token per sequence at position ctx-1
        roof = step_bytes(cfg, b, args.ctx) / bw
        rows.append(dict(batch=b, step_s=t, roofline_s=roof, ratio=roof / t, tokens_per_s=b / t))
        print(f"{b:6d} {t * 1e3:9.3f} {roof * 1e3:12.3f} {roof / t:7.1%} {b / t:9.0f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "hbm_bw": bw, "args": vars(args), "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
