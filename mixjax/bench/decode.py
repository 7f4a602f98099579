"""Decode-step and prefill time against the hardware limits of the current device, with a peer in the same run.

    python -m mixjax.bench.decode --preset qwen3-30b-a3b --layers 4 --batch 1,8,32,128,256 --ctx 1024 \\
        --prefill 512,2048,8192 --peer --plot decode.png --json decode.json

Presets: `qwen3-30b-a3b` (Qwen3-30B-A3B's shapes, vocabulary 151,936 unless --vocab) and `tiny` build a
Qwen3MoeConfig; `deepseek-v3` (DeepSeek-V3's shapes: MLA, 256 routed experts top-8 with group-limited routing, one
shared expert, YaRN, vocabulary 129,280) and `deepseek-tiny` (the same structure, small enough for CPU) build a
DeepseekV3Config, every layer MoE unless --dense-layers N makes the first N dense (first_k_dense_replace).

    python -m mixjax.bench.decode --preset deepseek-v3 --layers 2 --batch 1,8,32,128 --ctx 1024 \\
        --prefill 512,2048 --engine 32 --engine-steps 8

Random bf16 weights of the preset's real shapes (fewer layers; `bench_model`: the attention's output projection drawn
smaller so that routing stays balanced in every layer, as in a trained model), the real decode step
(`ShardedModel.forward` with one token per sequence and a KV cache of --ctx positions), timed on the device after
warm-up (median of --iters), for each expert implementation in --impl (the grouped Pallas kernels and the dense
einsum over all experts).

Decode roofline: the bytes a step must read once over the HBM bandwidth measured in the same run (the faster of
two read probes, `measure_hbm_bandwidth`). The bytes are read off the model's abstract parameters (`param_counts`,
classified by path): every non-routed matrix (attention, MLA included, shared experts, dense MLPs, routers, at
their stored dtype), the LM head, per MoE layer the routed experts the batch touches in expectation under uniform
routing (E * (1 - (1 - k/E)^batch) of E), and the cache up to the current position as the model lays it out (Qwen3:
K and V; DeepSeek: the latent c_kv and k_pe). The embedding (B rows read) and norm vectors are left out. Bytes
only: mixjax's MLA decodes in the latent space (2 x ctx x heads x (2 kv_lora_rank + qk_rope) FLOPs per new token and
layer), so large DeepSeek batches at long contexts can be compute-bound.

Prefill (prompts of --prefill tokens, one per call or --prefill-rows R of them together as the engine's grouped
prefill runs prompts admitted at once; logits of the last position only, as the server does): tokens/s and
the achieved FLOP rate as a fraction of the bf16 matmul rate measured in the same run (one 8192^3 matmul). FLOPs
counted: 2 x the per-token active parameters (non-routed matrices, k/E of the routed experts; no embedding) per
token, the attention scores and values (causal, the pairs s <= t: Qwen3 2 x 2 x heads x head_dim x T(T+1)/2 per layer,
DeepSeek 2 x heads x (qk_nope + qk_rope + v_head_dim) x T(T+1)/2) and the LM head for one position. Each prompt
length is timed twice: every call waited for on the host (a lone prompt's latency, with the host's ~1 ms dispatch)
and back to back (a queue of prompts, whose dispatch overlaps the GPU: the slope over bursts of 2 and more prompts,
`time_prefill`; the burst's mean, start included, is printed beside it). A prompt that fails on the device (the dense
path's [experts, tokens, d_model] float32 buffer outgrows the memory at long DeepSeek prompts) is printed and kept
in the JSON as {"impl", "tokens", "error"}; the run goes on.

"step ms" is the median of forward steps each waited for on the host; "b2b" is the mean of steps dispatched back to
back without waiting (host dispatch hidden under the device). --engine N also runs the serving engine's decode loop
(sampling and host bookkeeping included) with `batch` requests of N tokens sampled at --engine-temperature
(default 1; "distinct" is the mean fraction of distinct tokens among the rows of a step), pipelined (step n+1 starts from
step n's tokens on the device), with one decode step per dispatch and with --engine-steps K per dispatch (K steps in
one device-side loop), and reports the interval between a request's tokens (its mean; median over requests).
The engine's requests start from 8-token prompts, so its steps read the KV cache up to positions 9 to N + 8, not
--ctx: its ratio is to the roofline of the positions it read (their mean: the cache bytes are linear in it), printed
as "eng roof ms" (that of the K-step run) and kept per run as engine_*_roofline_s / engine_*_mean_ctx (the two runs'
windows can differ a little: timing starts once the last request joined). At large batches the cache is most of a step's
bytes, so a ratio to the --ctx roofline would flatter the engine (2026-12-03: 98.8% where 71.3% is right).

--plot draws step time against batch with the roofline; --prefill-plot the prefill's share of the matmul rate
against the prompt length with each case's roofline ceiling; --replot JSON draws either from a saved --json result
without measuring.

--peer runs mixjax.bench.peer (Hugging Face transformers, same shapes) in a subprocess first, before JAX takes the
GPU's memory, and reports mixjax / peer throughput: "vs peer" for the forward waited for after every step (the peer
is timed that way too), and with --engine "eng vs peer" for the engine at K steps per dispatch, as a server runs.
Qwen3 presets only: with a DeepSeek preset it says so and skips the peer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixjax.bench.experts import measure_hbm_bandwidth, measure_matmul_rate, timeit
from mixjax.bench.layers import DEEPSEEK_PRESETS, PRESETS, add_decode_shape_args, decode_vocab, time_step
from mixjax.models import model_class
from mixjax.models.deepseek_v3 import DeepseekV3Config
from mixjax.models.qwen3_moe import Qwen3MoeConfig
from mixjax.planner.cost import touched_experts
from mixjax.sharding.mesh import make_mesh
from mixjax.sharding.runner import ShardedModel
from mixjax.sharding.strategies import STRATEGIES


def bench_config(preset: str, layers: int, vocab: int, dense_layers: int = 0):
    """The preset's config with `layers` layers and a `vocab`-token vocabulary: a Qwen3MoeConfig for the Qwen3
    presets, a DeepseekV3Config (the first `dense_layers` layers dense, the rest MoE) for the DeepSeek ones."""
    if preset in DEEPSEEK_PRESETS:
        p = dict(DEEPSEEK_PRESETS[preset], vocab_size=vocab)
        p["rope_scaling"] = dict(p["rope_scaling"])
        return DeepseekV3Config(num_hidden_layers=layers, first_k_dense_replace=dense_layers, rms_norm_eps=1e-6,
                                tie_word_embeddings=False, **p)
    if dense_layers:
        raise ValueError("--dense-layers applies to the DeepSeek presets only")
    p = dict(PRESETS[preset], vocab_size=vocab)
    return Qwen3MoeConfig(num_hidden_layers=layers, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=(),
                          rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling=None, max_position_embeddings=32768,
                          tie_word_embeddings=False, **p)


_COUNTS: dict = {}


# The attention's output projection in the benchmark's random model, relative to the other weights' N(0, 0.02): with
# every weight at 0.02 the attention's output (for a long prompt nearly the same average of random values in every
# row) outweighed the embedding ~50:1 in the residual stream, and the routers sent most rows of a prompt to the same
# few experts (Qwen3-30B-A3B shapes, a 256-token prompt: layers 1-3 used 61, 36 and 43 of 128 experts, the top 8
# taking 55-76% of the pairs), so long prompts read fewer expert weights than a trained, load-balanced model does.
# At 1/50 every layer used all 128, the top 8 taking 9-11% (uniform routing: ~9%). Decode rows were not affected.
ATTENTION_OUT_SCALE = 0.02


def bench_model(cfg, dtype=jnp.bfloat16, seed: int = 0):
    """The benchmark's model: random weights of cfg's shapes (`layers.param`: N(0, 0.02), norms at one), the
    attention's output projection scaled by ATTENTION_OUT_SCALE so that the routing stays balanced in every layer."""
    model = model_class(cfg)(cfg, dtype=dtype, rngs=nnx.Rngs(seed))
    for layer in model.layers:
        w = layer.attn.o_proj.w
        w[...] = (w[...].astype(jnp.float32) * ATTENTION_OUT_SCALE).astype(w.dtype)
    return model


def param_counts(cfg, elem: int = 2) -> dict:
    """What the rooflines need, read off the model's abstract parameters (`nnx.eval_shape` of the family's class,
    built in bf16 for elem 2 / float32 for 4; leaves that the family keeps in float32, e.g. DeepSeek's router, count
    4 bytes) and its cache layout. Leaves are classified by their path:

    - routed experts (the stacked [E, ...] weights under an MoE block's `experts`): per MoE layer, (E, k, bytes,
      parameters) of all E experts;
    - the token embedding: not counted (a step reads only B of its rows), except as the LM head when tied;
    - the LM head: `head_bytes`, `head_params`;
    - everything else with two or more dims (attention, MLA included, shared experts, dense MLPs, routers):
      `fixed_bytes`, `fixed_params`. Vectors (RMSNorm weights, DeepSeek's router bias) are left out: they are
      under 0.1% of a layer and the Qwen3 figures stay those of the earlier hand-written formulas.

    `cache_bytes_per_token`: all layers' cache entries (Qwen3: K and V; DeepSeek: the latent c_kv and k_pe) for one
    position of one sequence, elem bytes per element."""
    key = (repr(cfg), elem)
    if key in _COUNTS:
        return _COUNTS[key]
    dtype = {2: jnp.bfloat16, 4: jnp.float32}[elem]
    cls = model_class(cfg)
    abstract = nnx.eval_shape(lambda: cls(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    out = dict(fixed_bytes=0, fixed_params=0, head_bytes=0, head_params=0, routed={})
    for path, leaf in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        names = [str(p) for p in path]
        shape = tuple(leaf.shape)
        n = math.prod(shape)
        nbytes = n * jnp.dtype(leaf.dtype).itemsize
        if names[0] == "layers" and "experts" in names:
            layer = int(names[1])
            e_, k_, b_, p_ = out["routed"].get(layer, (shape[0], cfg.top_k, 0, 0))
            out["routed"][layer] = (e_, k_, b_ + nbytes, p_ + n)
        elif names[0] == "lm_head" or (names[0] == "embed" and cfg.tie_word_embeddings):
            out["head_bytes"] += nbytes
            out["head_params"] += n
        elif names[0] == "embed" or len(shape) < 2:
            continue
        else:
            out["fixed_bytes"] += nbytes
            out["fixed_params"] += n
    out["cache_bytes_per_token"] = sum(math.prod(e.feature_shape) * elem for i in range(cfg.num_hidden_layers)
                                       for e in abstract.cache_entries(i))
    _COUNTS[key] = out
    return out


def step_bytes(cfg, batch: int, ctx: int, elem: int = 2) -> float:
    """Bytes one decode step of `batch` sequences at position ctx - 1 must read once: the non-routed weights and
    the LM head, per MoE layer the experts the batch touches in expectation under uniform routing
    (E * (1 - (1 - k/E)^batch) of E), and the KV cache up to ctx positions."""
    c = param_counts(cfg, elem)
    experts = sum(touched_experts(e, k, batch) / e * b for e, k, b, _ in c["routed"].values())
    return c["fixed_bytes"] + c["head_bytes"] + experts + batch * ctx * c["cache_bytes_per_token"]


def attention_flops(cfg, t: int) -> float:
    """Score and value FLOPs of a t-token prompt (batch 1) over all layers that causal attention needs (key s <=
    query position: t(t+1)/2 pairs per head). Qwen3: 2 x 2 x heads x head_dim per pair and layer (on the GPU cuDNN's
    causal attention skips the rest). DeepSeek (MLA, `mixjax.models.deepseek_v3.MLA`; prompts of more than
    ABSORB_MAX_TOKENS tokens, which are the ones benchmarked): the latent is expanded to per-head keys of qk_nope +
    qk_rope dims and values of v_head_dim, 2 x heads x (qk_nope + qk_rope + v_head_dim) per pair and layer (the
    flash kernel skips key blocks after a query tile's last position; XLA's `attend`, off the Pallas path,
    computes the whole masked t x t matrix, which is not counted)."""
    h = cfg.num_attention_heads
    if isinstance(cfg, DeepseekV3Config):
        per_layer = 2 * h * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * t * (t + 1) / 2
    else:
        per_layer = 2 * 2 * h * cfg.head_dim * t * (t + 1) / 2
    return cfg.num_hidden_layers * per_layer


def prefill_flops(cfg, t: int, rows: int = 1) -> float:
    """FLOPs of a t-token prefill (LM head on the last position only): 2 x the per-token active parameters
    (all non-routed ones and k/E of each MoE layer's routed experts; the embedding is a lookup) per token, the
    attention scores and values (`attention_flops`), and the LM head for one row; times `rows` prompts of t tokens
    prefilled together (each attends to its own tokens only)."""
    c = param_counts(cfg)
    active = c["fixed_params"] + sum(k / e * p for e, k, _, p in c["routed"].values())
    return rows * (2 * active * t + attention_flops(cfg, t) + 2 * c["head_params"])


def prefill_bytes(cfg, t: int, elem: int = 2, rows: int = 1) -> float:
    """Bytes a prefill of `rows` prompts of t tokens, together, must move at least once: the non-routed weights,
    the LM head, the experts the rows x t tokens touch in expectation under uniform routing (at 2048 tokens every
    DeepSeek-V3 expert: 22.5 GB per layer) and the cache entries it writes: `step_bytes` of rows x t rows with one
    cache entry each (the LM head's rows read are left out, as for decode)."""
    return step_bytes(cfg, rows * t, 1, elem)


def prefill_roofline(cfg, t: int, bw: float, rate: float, rows: int = 1) -> tuple[float, str]:
    """(seconds, bound): the larger of the prefill's FLOPs at the matmul rate and its bytes at the HBM bandwidth.
    A prompt whose tokens spread over many experts reads more weights than it has FLOPs to hide them under (DeepSeek-
    V3 at 2048 tokens: ~64 rows per expert, a third of the H200's ~210 FLOP/byte ridge), so its matmul-rate fraction
    is bounded well below 100% by the bytes, not by the kernels."""
    flops, byts = prefill_flops(cfg, t, rows) / rate, prefill_bytes(cfg, t, rows=rows) / bw
    return (flops, "compute") if flops >= byts else (byts, "memory")


def time_prefill(model: ShardedModel, t: int, iters: int, rows: int = 1) -> tuple[float, float, float]:
    """(seconds per prompt waited for, seconds per prompt back to back, mean of a burst): each call synchronised on
    the host (a lone prompt's latency, host dispatch included), and the throughput of a queue of prompts dispatched
    one after the other: the slope of a burst's time over bursts of 2 and 2 + `iters` prompts (each the best of 3),
    so that the burst's start drops out: the host's work on the first call, which nothing overlaps (0.4-1.5 ms
    on an H200 for 512- to 8192-token Qwen3 prompts, 2026-12-01). Before 2026-12-01 this benchmark reported the
    mean of a burst of 5, start included (the third value: that mean, over 2 + `iters` prompts). rows: prompts of
    t distinct tokens prefilled in one call, as the engine's grouped prefill does (the times are per call)."""
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, model.vocab_size, (rows, t)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (rows, t))
    last = jnp.full((rows,), t - 1, jnp.int32)
    state = {"cache": model.init_cache(rows, t)}

    def run():
        logits, state["cache"] = model.forward_last(tokens, pos, state["cache"], last, fresh=True)
        return logits

    waited = timeit(run, iters=iters)
    return (waited, *back_to_back(run, iters))


def back_to_back(run, iters: int) -> tuple[float, float]:
    """(seconds per call of `run` dispatched back to back, mean of a burst): the slope of a burst's time over bursts
    of 2 and 2 + `iters` calls, each the best of 3, so that the burst's start (the host's work on the first call,
    which nothing overlaps) drops out; and the mean of the longer burst, start included."""
    def burst(n):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            outs = [run() for _ in range(n)]
            jax.block_until_ready(outs)
            best = min(best, time.perf_counter() - t0)
        return best

    lo, hi = 2, 2 + iters
    t_lo, t_hi = burst(lo), burst(hi)
    return max((t_hi - t_lo) / (hi - lo), 1e-12), t_hi / hi


def engine_step_time(model: ShardedModel, batch: int, ctx: int, n_tokens: int, pipeline: bool,
                     decode_steps: int = 1, temperature: float = 1.0) -> tuple[float, float]:
    """Mean interval between consecutive tokens of a request, the median over `batch` requests decoding together in
    the serving engine (mixjax.serve.engine) with a KV cache of ctx slots: the engine's decode step as a server runs
    it, sampling and host bookkeeping included. Only tokens after the last request joined count. A mean, not a
    median of gaps: with decode_steps K > 1 tokens arrive in bursts of K.

    Requests sample at `temperature` (seeded, one seed per request). Greedy requests on random weights fall into
    the same few tokens: at DeepSeek-V3 shapes (2026-11-29) the rows of a greedy batch then touched so few experts
    that the engine ran faster than the forward with distinct tokens, and faster than the roofline that assumes
    them. Also returns how distinct the rows stay: the mean over steps of (distinct tokens in the batch) / batch, and
    the mean number of cache positions the timed steps read (a request's token j >= 1 comes from a decode step
    that reads its prompt's positions and j more), for the roofline of the same work."""
    import threading

    from mixjax.serve.engine import Engine, Request, SamplingParams

    eng = Engine(model, None, max_batch=batch, max_seq_len=ctx, prefill_buckets=[16], max_queue=batch,
                 pipeline=pipeline, decode_steps=decode_steps)
    eng.warmup(variants=[(temperature > 0, False, False)])  # the only sampling program used here
    eng.start()
    stamps, ids, done = [[] for _ in range(batch)], [[] for _ in range(batch)], threading.Event()
    left = [batch]

    def sink_for(i):
        def sink(ev):
            if ev["type"] == "token":
                stamps[i].extend([time.monotonic()] * len(ev["ids"]))
                ids[i].extend(ev["ids"])
            elif ev["type"] in ("done", "error"):
                left[0] -= 1
                if not left[0]:
                    done.set()
        return sink

    rng = np.random.RandomState(0)
    prompt = 8
    for i in range(batch):
        eng.submit(Request(rng.randint(0, model.vocab_size, prompt).tolist(),
                           SamplingParams(max_tokens=n_tokens, temperature=temperature, seed=i, ignore_eos=True),
                           sink_for(i)))
    done.wait(600)
    eng.stop()
    joined = max(s[0] for s in stamps)
    means, read = [], []
    for s in stamps:
        first = next((j for j, t in enumerate(s) if t >= joined), len(s))
        if len(s) - first > 1:
            means.append((s[-1] - s[first]) / (len(s) - first - 1))
            read.extend(prompt + j for j in range(first + 1, len(s)))  # the tokens whose intervals are timed
    steps = min(len(r) for r in ids)
    distinct = statistics.mean(len({r[j] for r in ids}) / batch for j in range(steps)) if steps else float("nan")
    return statistics.median(means), distinct, statistics.mean(read)


def run_peer(args) -> dict | None:
    if args.preset in DEEPSEEK_PRESETS:
        print(f"--peer: the transformers peer (mixjax.bench.peer) covers the Qwen3 presets only; no peer run for "
              f"{args.preset}", flush=True)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "peer.json")
        cmd = [sys.executable, "-m", "mixjax.bench.peer", "--preset", args.preset, "--layers", str(args.layers),
               "--vocab", str(args.vocab), "--batch", args.batch, "--ctx", str(args.ctx), "--json", out]
        r = subprocess.run(cmd, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        if r.returncode or not os.path.exists(out):
            print(f"peer run failed (exit {r.returncode}); no peer figures", flush=True)
            return None
        with open(out) as f:
            return json.load(f)


def plot(path: str, result: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dec, a = result["decode"], result["args"]
    for impl in result["args"]["impl"].split(","):
        rows = [r for r in dec if r["impl"] == impl]
        line, = ax.plot([r["batch"] for r in rows], [r["step_s"] * 1e3 for r in rows], "o-",
                        label=f"mixjax ({impl} experts), each step waited for")
        ax.plot([r["batch"] for r in rows], [r["back_to_back_step_s"] * 1e3 for r in rows], "o:",
                color=line.get_color(), alpha=0.6, label=f"mixjax ({impl} experts), back to back")
    rows = [r for r in dec if r["impl"] == dec[0]["impl"]]
    for key in sorted({k for r in rows for k in r if k.startswith("engine_") and k.endswith("_step_s")}):
        er = [r for r in rows if key in r]
        what = "1 step" if key == "engine_pipelined_step_s" else key[len("engine_multistep"):-len("_step_s")] + " steps"
        ax.plot([r["batch"] for r in er], [r[key] * 1e3 for r in er], "^-.",
                label=f"mixjax serving engine, {what} per dispatch (per token)")
    ax.plot([r["batch"] for r in rows], [r["roofline_s"] * 1e3 for r in rows], "k--",
            label=f"HBM roofline (cache of {a['ctx']} positions)")
    eroof = sorted({k[:-len("_roofline_s")] for r in rows for k in r if k.startswith("engine_")
                    and k.endswith("_roofline_s")})
    if eroof:  # the engine decodes from short prompts: its steps read less of the cache (the K-step run's, last)
        er = [r for r in rows if eroof[-1] + "_roofline_s" in r]
        ax.plot([r["batch"] for r in er], [r[eroof[-1] + "_roofline_s"] * 1e3 for r in er], "k:",
                label=f"HBM roofline at the engine's positions "
                      f"(mean {statistics.mean(r[eroof[-1] + '_mean_ctx'] for r in er):.0f})")
    if result.get("peer"):
        pr = result["peer"]["rows"]
        ax.plot([r["batch"] for r in pr], [r["step_s"] * 1e3 for r in pr], "s-", label=result["peer"]["peer"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (sequences, one new token each)")
    ax.set_ylabel("decode step (ms)")
    ax.set_title(f"{a['preset']}, {a['layers']} layers, ctx {a['ctx']}, bf16 — {result['device']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_prefill(path: str, result: dict, target: float = 0.5):
    """PNG of the prefill's achieved share of the matmul rate (back to back) against the prompt length, a line per
    expert implementation and prompts per call, each with its ceiling (the share its roofline allows: 100% where
    compute-bound, FLOPs time / bytes time where memory-bound) dotted, and the issue's target dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [r for r in result["prefill"] if "error" not in r]
    for impl, rows in sorted({(r["impl"], r.get("rows", 1)) for r in done}):
        rs = sorted((r for r in done if r["impl"] == impl and r.get("rows", 1) == rows), key=lambda r: r["tokens"])
        what = f"{rows} prompts per call" if rows > 1 else "1 prompt per call"
        line, = ax.plot([r["tokens"] for r in rs], [100 * r["b2b_matmul_fraction"] for r in rs], "o-",
                        label=f"mixjax ({impl} experts), {what}")
        ceiling = [100 * min(1.0, r["flops"] / result["matmul_rate"] / r["roofline_s"]) for r in rs]
        ax.plot([r["tokens"] for r in rs], ceiling, ":", color=line.get_color(), alpha=0.7,
                label=f"its roofline's ceiling ({what})")
    ax.axhline(100 * target, color="k", ls="--", lw=1, label=f"target: {target:.0%} of the matmul rate")
    ax.set_xscale("log", base=2)
    lengths = sorted({r["tokens"] for r in done})
    ax.set_xticks(lengths, [str(t) for t in lengths])
    ax.set_ylim(0, 105)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("achieved share of the bf16 matmul rate (%)")
    a = result["args"]
    ax.set_title(f"prefill, {a['preset']}, {a['layers']} layers, bf16 — {result['device']} "
                 f"(matmul {result['matmul_rate'] / 1e12:.0f} TFLOP/s)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_decode_shape_args(ap, "1,8,32,128,256")
    ap.add_argument("--impl", default="grouped,dense", help="expert implementations to time, comma-separated")
    ap.add_argument("--prefill", default="", help="prompt lengths for the prefill measurement, e.g. 512,2048,8192")
    ap.add_argument("--prefill-rows", default="1", metavar="R",
                    help="prompts prefilled together in one call, comma-separated (default 1): each prompt length is "
                         "timed for each R, as the engine's grouped prefill (--prefill-rows of mixjax.serve) runs "
                         "prompts admitted together")
    ap.add_argument("--peer", action="store_true", help="also time Hugging Face transformers (same shapes)")
    ap.add_argument("--engine", type=int, default=0, metavar="TOKENS",
                    help="also time the serving engine's decode loop (pipelined, one step per dispatch and "
                         "--engine-steps per dispatch), TOKENS per request")
    ap.add_argument("--engine-steps", type=int, default=8, metavar="K",
                    help="decode steps per dispatch for the engine's multi-step measurement (default 8)")
    ap.add_argument("--engine-temperature", type=float, default=1.0,
                    help="the engine requests' sampling temperature (default 1.0; 0 is greedy, whose rows on random "
                         "weights collapse onto a few tokens and touch fewer experts than the roofline counts)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="weights and activations (the rooflines count 2 bytes per element either way)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG of step time against batch, roofline drawn in")
    ap.add_argument("--prefill-plot", default=None, metavar="PNG",
                    help="PNG of the prefill's share of the matmul rate against the prompt length")
    ap.add_argument("--replot", default=None, metavar="JSON",
                    help="measure nothing: draw --plot / --prefill-plot from a saved --json result")
    args = ap.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        if not (args.plot or args.prefill_plot):
            ap.error("--replot needs --plot and/or --prefill-plot")
        if args.plot:
            plot(args.plot, saved)
        if args.prefill_plot:
            if not any("error" not in r for r in saved["prefill"]):
                ap.error(f"{args.replot} holds no prefill measurement")
            plot_prefill(args.prefill_plot, saved)
        return 0
    args.vocab = decode_vocab(args.preset, args.vocab)
    if args.dense_layers and args.preset not in DEEPSEEK_PRESETS:
        ap.error("--dense-layers applies to the DeepSeek presets only")
    peer = run_peer(args) if args.peer else None
    cfg = bench_config(args.preset, args.layers, args.vocab, args.dense_layers)
    bw, rate = measure_hbm_bandwidth(), measure_matmul_rate()
    device = jax.devices()[0].device_kind
    dtype = jnp.dtype(args.dtype)
    weights = nnx.state(bench_model(cfg, dtype))
    print(f"{device}; measured HBM {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s; preset "
          f"{args.preset}, {args.layers} layers" + (f" ({args.dense_layers} dense)" if args.dense_layers else "")
          + f", vocab {args.vocab}, ctx {args.ctx}, {args.dtype}")
    peer_t = {r["batch"]: r["step_s"] for r in peer["rows"]} if peer else {}
    decode, prefill = [], []
    for impl in args.impl.split(","):
        model = ShardedModel(cfg, make_mesh("1x1"), STRATEGIES["tp"], dtype=dtype, expert_impl=impl)
        model.set_state(weights)
        print(f"[{impl} experts]\n{'batch':>6s} {'step ms':>9s} {'roofline ms':>12s} {'ratio':>7s} {'tok/s':>9s} "
              f"{'vs peer':>8s} {'b2b ms':>8s} {'b2b ratio':>9s}"
              + (f" {'eng 1/call':>10s} {'ratio':>6s} {'eng ' + str(args.engine_steps) + '/call':>10s} {'ratio':>6s}"
                    f" {'distinct':>8s} {'eng roof ms':>11s} {'eng vs peer':>11s}" if args.engine else ""))
        for b in (int(x) for x in args.batch.split(",")):
            # one new token per sequence at position ctx-1
            t, t_b2b = time_step(model, b, 1, args.ctx, args.iters, back_to_back=True)
            roof = step_bytes(cfg, b, args.ctx) / bw
            vs = peer_t[b] / t if b in peer_t else float("nan")
            decode.append(dict(impl=impl, batch=b, step_s=t, roofline_s=roof, ratio=roof / t, tokens_per_s=b / t,
                               speedup_vs_peer=vs, back_to_back_step_s=t_b2b, back_to_back_ratio=roof / t_b2b))
            row = decode[-1]
            extra = ""
            if args.engine:
                for k in (1, args.engine_steps):
                    te, distinct, mean_ctx = engine_step_time(model, b, args.ctx, args.engine, True, k,
                                                              args.engine_temperature)
                    eroof = step_bytes(cfg, b, mean_ctx) / bw  # the roofline of the positions the engine read
                    key = "engine_pipelined" if k == 1 else f"engine_multistep{k}"
                    row[key + "_step_s"], row[key + "_ratio"] = te, eroof / te
                    row[key + "_distinct_tokens"] = distinct
                    row[key + "_roofline_s"], row[key + "_mean_ctx"] = eroof, mean_ctx
                    extra += f" {te * 1e3:10.3f} {eroof / te:6.1%}"
                # the peer against the engine as a server runs it (K steps per dispatch), not the waited forward
                row["engine_speedup_vs_peer"] = peer_t[b] / te if b in peer_t else float("nan")
                extra += f" {distinct:8.0%} {eroof * 1e3:11.3f} {row['engine_speedup_vs_peer']:10.1f}x"
            print(f"{b:6d} {t * 1e3:9.3f} {roof * 1e3:12.3f} {roof / t:7.1%} {b / t:9.0f} {vs:7.1f}x "
                  f"{t_b2b * 1e3:8.3f} {roof / t_b2b:9.1%}{extra}", flush=True)
        if args.prefill:
            print(f"{'prompt':>10s} {'ms':>9s} {'tok/s':>9s} {'TFLOP/s':>8s} {'of matmul':>9s} {'roofline ms':>11s} "
                  f"{'bound':>7s} {'ratio':>6s} {'b2b ms':>8s} {'tok/s':>9s} {'of matmul':>9s} {'ratio':>6s}")
        lengths = [int(x) for x in args.prefill.split(",") if x]
        for rows, t_len in ((r, t) for r in (int(x) for x in args.prefill_rows.split(",")) for t in lengths):
            name = f"{rows} x {t_len}" if rows > 1 else f"{t_len}"
            try:
                t, t_b2b, t_burst = time_prefill(model, t_len, max(4, args.iters // 4), rows)
            except jax.errors.JaxRuntimeError as e:  # e.g. the dense path's [E, T, D] buffer at long prompts
                why = str(e).strip().splitlines()[0][:200]
                prefill.append(dict(impl=impl, tokens=t_len, rows=rows, error=why))
                print(f"{name:>10s} failed on the device: {why}", flush=True)
                continue
            fl, n_tok = prefill_flops(cfg, t_len, rows), rows * t_len
            roof, bound = prefill_roofline(cfg, t_len, bw, rate, rows)
            prefill.append(dict(impl=impl, tokens=t_len, rows=rows, time_s=t, tokens_per_s=n_tok / t, flops=fl,
                                flop_rate=fl / t, matmul_fraction=fl / t / rate,
                                bytes=prefill_bytes(cfg, t_len, rows=rows), roofline_s=roof, bound=bound,
                                ratio=roof / t, b2b_time_s=t_b2b, b2b_tokens_per_s=n_tok / t_b2b,
                                b2b_matmul_fraction=fl / t_b2b / rate, b2b_ratio=roof / t_b2b, burst_mean_s=t_burst,
                                burst_matmul_fraction=fl / t_burst / rate))
            print(f"{name:>10s} {t * 1e3:9.2f} {n_tok / t:9.0f} {fl / t / 1e12:8.1f} {fl / t / rate:9.1%} "
                  f"{roof * 1e3:11.2f} {bound:>7s} {roof / t:6.1%} {t_b2b * 1e3:8.2f} {n_tok / t_b2b:9.0f} "
                  f"{fl / t_b2b / rate:9.1%} {roof / t_b2b:6.1%}   (burst mean {t_burst * 1e3:.2f} ms, "
                  f"{fl / t_burst / rate:.1%})", flush=True)
        del model
    result = {"device": device, "hbm_bw": bw, "matmul_rate": rate, "args": vars(args), "decode": decode,
              "prefill": prefill, "peer": peer}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(args.plot, result)
    if args.prefill_plot and prefill:
        plot_prefill(args.prefill_plot, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
