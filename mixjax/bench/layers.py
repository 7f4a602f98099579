"""Time one decoder layer's attention and MoE per strategy on the current devices.

    python -m mixjax.bench.layers --mesh 2x4 --batch 64 --seq 1 [--preset qwen3-30b-a3b-tiny]

For every strategy the mesh admits, it builds a one-layer model with random weights of the preset's shapes
and times (a) the layer with a dense MLP in place of the MoE (attention + a small MLP) and (b) the layer with the
MoE; their difference is the MoE's time. Time: the median of --iters runs after warm-up, each ended by
`block_until_ready` (host dispatch included: on a GPU that is most of a one-layer forward), or with --device-time
the device time per forward (the slope over programs of 2 and 8 independent forwards). It prints the bytes each
strategy moves per rank and link (from the same formulas the planner uses) and each strategy's time relative to
the fastest.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from mixjax.bench.experts import device_seconds_per_op
from mixjax.models.qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
from mixjax.sharding.dispatch import dispatch_bytes
from mixjax.sharding.fused import fused_bytes
from mixjax.sharding.mesh import LayoutError, check_layout, make_mesh, mesh_sizes
from mixjax.sharding.runner import ShardedModel
from mixjax.sharding.strategies import STRATEGIES

PRESETS = {
    # Qwen3-30B-A3B's layer shapes (one layer)
    "qwen3-30b-a3b": dict(vocab_size=1024, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8),
    # small enough for CPU
    "tiny": dict(vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                 num_attention_heads=8, num_key_value_heads=8, head_dim=16, num_experts=16, num_experts_per_tok=2),
}

# DeepSeek-V3 shapes for bench.decode only (DeepseekV3Config fields; the layer count, first_k_dense_replace and the
# vocabulary come from the command line). YaRN as in DeepSeek-V3's config.json.
DEEPSEEK_YARN = dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                     mscale=1.0, mscale_all_dim=1.0)
_DEEPSEEK_COMMON = dict(num_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True, rope_theta=10000.0,
                        rope_scaling=DEEPSEEK_YARN, rope_interleave=True, max_position_embeddings=163840)
DEEPSEEK_PRESETS = {
    "deepseek-v3": dict(_DEEPSEEK_COMMON, vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, num_experts=256,
                        num_experts_per_tok=8, n_group=8, topk_group=4),
    # small enough for CPU (same structure: q LoRA, YaRN, grouped routing, one shared expert)
    "deepseek-tiny": dict(_DEEPSEEK_COMMON, vocab_size=512, hidden_size=128, intermediate_size=256,
                          moe_intermediate_size=64, num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32,
                          qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_experts=16,
                          num_experts_per_tok=4, n_group=4, topk_group=2),
}
QWEN_DECODE_VOCAB = 151936  # bench.decode's default vocabulary for the Qwen3 presets (Qwen3's real one)


def add_decode_shape_args(ap, batch: str = "1,8,32,128,256"):
    """The model-shape and decode-shape options that bench.decode and its peer (bench.peer) share."""
    ap.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(PRESETS) + sorted(DEEPSEEK_PRESETS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dense-layers", type=int, default=0, metavar="N",
                    help="DeepSeek presets: the first N layers have a dense MLP (first_k_dense_replace; default 0, "
                         "every layer MoE)")
    ap.add_argument("--vocab", type=int, default=None,
                    help=f"vocabulary (default: {QWEN_DECODE_VOCAB} for the Qwen3 presets, the preset's own for "
                         "the DeepSeek ones)")
    ap.add_argument("--batch", default=batch)
    ap.add_argument("--ctx", type=int, default=1024)


def decode_vocab(preset: str, vocab: int | None) -> int:
    """--vocab, or the preset family's default when it was not given."""
    if vocab is not None:
        return vocab
    return DEEPSEEK_PRESETS[preset]["vocab_size"] if preset in DEEPSEEK_PRESETS else QWEN_DECODE_VOCAB


def layer_config(preset: str, moe: bool) -> Qwen3MoeConfig:
    p = PRESETS[preset]
    return Qwen3MoeConfig(num_hidden_layers=1, norm_topk_prob=True, decoder_sparse_step=1,
                          mlp_only_layers=() if moe else (0,), rms_norm_eps=1e-6, rope_theta=1e6,
                          rope_scaling=None, max_position_embeddings=32768, tie_word_embeddings=True, **p)


def time_step(model: ShardedModel, batch: int, seq: int, ctx: int, iters: int, back_to_back: bool = False,
              samples: bool = False):
    """Median seconds of one forward of `batch` x `seq` new tokens ending at position ctx - 1 (KV cache of ctx
    slots), after compile and warm-up, each step dispatched and waited for (what a server that reads every step's
    tokens on the host sees). samples=True: (median, list of every timed run). back_to_back=True: (median, mean
    time per step of `iters` steps dispatched without waiting in between: the device-bound rate)."""
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, model.vocab_size, (batch, seq)), jnp.int32)
    pos = jnp.asarray(np.broadcast_to(np.arange(ctx - seq, ctx, dtype=np.int32), (batch, seq)))
    cache = model.init_cache(batch, ctx)
    for _ in range(2):  # compile and warm up
        logits, cache = model.forward(tokens, pos, cache)
    logits.block_until_ready()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        logits, cache = model.forward(tokens, pos, cache)
        logits.block_until_ready()
        times.append(time.perf_counter() - t0)
    if samples:
        return statistics.median(times), times
    if not back_to_back:
        return statistics.median(times)
    t0 = time.perf_counter()
    for _ in range(iters):
        logits, cache = model.forward(tokens, pos, cache)
    logits.block_until_ready()
    return statistics.median(times), (time.perf_counter() - t0) / iters


def device_time(model: ShardedModel, batch: int, seq: int, ctx: int) -> float:
    """Device seconds of one forward (`bench.experts.device_seconds_per_op`: the slope over programs of 2 and 8
    forwards in one jit, so that the host's dispatch and wait, hundreds of us for a sharded one-layer program and
    more than the layer itself on a GPU, drop out). Each forward gets its own tokens and cache, so XLA cannot
    merge any of their work."""
    rng = np.random.RandomState(0)
    pos = jnp.asarray(np.broadcast_to(np.arange(ctx - seq, ctx, dtype=np.int32), (batch, seq)))
    inputs = [(model.leaves, jnp.asarray(rng.randint(0, model.vocab_size, (batch, seq)), jnp.int32), pos,
               model.init_cache(batch, ctx)) for _ in range(8)]
    return device_seconds_per_op(model._forward, inputs)


def build(cfg, mesh, strategy, dtype, chunks):
    model = ShardedModel(cfg, mesh, STRATEGIES[strategy], dtype=dtype, fused_chunks=chunks)
    tp = model.par.attn_tp_size
    real = Qwen3MoeForCausalLM(cfg, tp=tp, vocab_padded=model.vocab_padded, dtype=dtype, rngs=nnx.Rngs(0))
    return model.set_state(nnx.state(real))


def bytes_per_rank(cfg, strategy: str, sizes: dict, tokens: int, elem: int) -> dict[str, float]:
    """Bytes one device sends per MoE layer on each link (the planner's formulas)."""
    n, g = sizes["node"], sizes["gpu"]
    d = cfg.hidden_size
    act = tokens * d * elem
    st = STRATEGIES[strategy]
    out = {"intra": 0.0, "inter": 0.0}
    if strategy == "tp":
        out["intra"] = out["inter"] = 2 * 2 * act  # two all-reduces over all devices
        if n == 1:
            out["inter"] = 0
        return out
    if strategy == "hybrid_fused":
        b = fused_bytes(tokens // n, d, cfg.num_experts, cfg.top_k, n, g, elem)
        return {"intra": b["intra_node"], "inter": b["inter_node"] * (n - 1) / n}  # own block stays home
    ep = int(np.prod([sizes[a] for a in st.moe_ep]))
    local_tokens = tokens // int(np.prod([sizes[a] for a in st.attn_dp]) or 1)
    if "gpu" in st.attn_tp and "gpu" in st.moe_ep:
        local_tokens //= g
    b = dispatch_bytes(local_tokens, d, cfg.num_experts, cfg.top_k, ep, elem)
    a2a = (b["dispatch"] + b["combine"]) * b["leaves_rank_fraction"]
    ar = 2 * (tokens // n) * d * elem if "gpu" in st.attn_tp and g > 1 else 0
    if st.moe_ep == ("node",):
        out = {"intra": 2 * ar, "inter": a2a}
    else:
        out = {"intra": ar + a2a * (g - 1) / max(ep - 1, 1), "inter": a2a * (ep - g) / max(ep - 1, 1)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mesh", default=None, help="NODExGPU (default: 1 x all local devices)")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=1, help="tokens per sequence per step (1 = decode)")
    ap.add_argument("--ctx", type=int, default=128, help="KV cache length")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--strategies", default=",".join(sorted(STRATEGIES)))
    ap.add_argument("--device-time", action="store_true",
                    help="device time per forward (slope over programs of 2 and 8 forwards) instead of "
                         "each forward dispatched and waited for")
    args = ap.parse_args(argv)
    mesh = make_mesh(args.mesh or f"1x{len(jax.devices())}")
    sizes = dict(mesh_sizes(mesh))
    dtype = jnp.dtype(args.dtype)
    rows = []
    names = args.strategies.split(",")
    for name in tqdm(names, desc="strategies"):
        moe_cfg, dense_cfg = layer_config(args.preset, True), layer_config(args.preset, False)
        try:
            check_layout(moe_cfg, mesh, STRATEGIES[name])
        except LayoutError as e:
            print(f"skip {name}: {e}")
            continue
        timer = device_time if args.device_time else \
            (lambda m, b_, s_, c_: time_step(m, b_, s_, c_, args.iters))
        t_dense = timer(build(dense_cfg, mesh, name, dtype, args.chunks), args.batch, args.seq, args.ctx)
        t_moe = timer(build(moe_cfg, mesh, name, dtype, args.chunks), args.batch, args.seq, args.ctx)
        b = bytes_per_rank(moe_cfg, name, sizes, args.batch * args.seq, dtype.itemsize)
        rows.append((name, t_dense, t_moe, t_moe - t_dense, b))
    if not rows:
        return 1
    best = min(r[2] for r in rows)
    print(f"\nmesh {sizes['node']}x{sizes['gpu']} on {jax.devices()[0].device_kind}, preset {args.preset}, "
          f"batch {args.batch} x seq {args.seq}, {args.dtype}, "
          + ("device time per forward" if args.device_time else "each forward waited for (host dispatch included)"))
    print(f"{'strategy':14s} {'layer(dense) ms':>15s} {'layer(MoE) ms':>14s} {'MoE part ms':>12s} "
          f"{'intra B/rank':>13s} {'inter B/rank':>13s} {'vs best':>8s}")
    for name, td, tm, dm, b in rows:
        print(f"{name:14s} {td * 1e3:15.3f} {tm * 1e3:14.3f} {dm * 1e3:12.3f} {b['intra']:13.0f} "
              f"{b['inter']:13.0f} {tm / best:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


