"""What positions that carry no token cost, padded with token 0 (a real token: its routes reach the experts, as
before 2026-12-02) against NO_TOKEN (routing weight zero: the expert kernels skip it), on the benchmark's model:
  - a prompt padded up to its prefill bucket, alone and four to a call (the engine's grouped prefill);
  - a decode call of K steps on R rows of which only some hold a request (the engine's decode rows).
Times are per call, dispatched back to back (`mixjax.bench.decode.back_to_back`). A development tool:
    python tools/probe_padding.py [--preset qwen3-30b-a3b] [--layers 4] [--bucket 2048] [--iters 10]
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixjax.bench.decode import back_to_back, bench_config, bench_model, decode_vocab
from mixjax.models.base import NO_TOKEN
from mixjax.sharding.mesh import make_mesh
from mixjax.sharding.runner import ShardedModel, decode_loop
from mixjax.sharding.strategies import STRATEGIES

ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="qwen3-30b-a3b")
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--bucket", type=int, default=2048)
ap.add_argument("--lengths", default="256,512,1024,1536,2048", help="lone prompts' lengths in the bucket")
ap.add_argument("--group", default="300,700,1100,1900", help="one grouped call's prompt lengths")
ap.add_argument("--decode", default="8:1,32:1,32:8,8:8,1:1", help="decode calls as rows:live")
ap.add_argument("--ctx", type=int, default=4096)
ap.add_argument("--steps", type=int, default=8)
ap.add_argument("--iters", type=int, default=10)
args = ap.parse_args()

cfg = bench_config(args.preset, args.layers, decode_vocab(args.preset, None))
sm = ShardedModel(cfg, make_mesh("1x1"), STRATEGIES["tp"], dtype=jnp.bfloat16)
sm.set_state(nnx.state(bench_model(cfg)))
V = cfg.vocab_size
print(f"{args.preset}, {args.layers} layers, experts {sm.expert_impl}, {jax.devices()[0].device_kind}", flush=True)


def prefill_ms(lengths: list[int], pad: int) -> float:
    b = args.bucket
    tokens = np.full((len(lengths), b), pad, np.int32)
    prompts = np.random.RandomState(sum(lengths))  # the same prompts for either padding
    for i, n in enumerate(lengths):
        tokens[i, :n] = prompts.randint(0, V, n)
    tokens = jnp.asarray(tokens)
    pos = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[None], tokens.shape)
    last = jnp.asarray([n - 1 for n in lengths], jnp.int32)
    state = {"cache": sm.init_cache(len(lengths), b)}

    def run():
        logits, state["cache"] = sm.forward_last(tokens, pos, state["cache"], last, fresh=True)
        return logits
    jax.block_until_ready(run())
    return back_to_back(run, args.iters)[0] * 1e3


decode_fn = jax.jit(lambda leaves, tok, pos, cache: decode_loop(
    sm._forward, leaves, tok, pos, cache, args.steps,
    lambda i, lg: (jnp.argmax(lg[:, :V], -1).astype(jnp.int32),))[1:], donate_argnums=(3,))


def decode_ms(rows: int, live: int, pad: int) -> float:
    live_tokens = np.random.RandomState(rows * 1000 + live).randint(0, V, live)  # the same for either padding
    tokens = jnp.asarray(np.r_[live_tokens, np.full(rows - live, pad)].astype(np.int32))
    pos = jnp.asarray(np.r_[np.full(live, 1024), np.zeros(rows - live)].astype(np.int32))  # live rows 1k deep
    state = {"cache": sm.init_cache(rows, args.ctx)}

    def run():
        last, state["cache"] = decode_fn(sm.leaves, tokens, pos, state["cache"])
        return last
    jax.block_until_ready(run())
    return back_to_back(run, args.iters)[0] * 1e3


print(f"\nprefill, bucket {args.bucket}: ms per call, back to back")
print("| prompts (tokens) | padded with token 0 | padded with NO_TOKEN | saved |\n|---|---|---|---|")
for lengths in [[int(x)] for x in args.lengths.split(",")] + [[int(x) for x in args.group.split(",")]]:
    a, b = prefill_ms(lengths, 0), prefill_ms(lengths, NO_TOKEN)
    print(f"| {' + '.join(map(str, lengths))} | {a:.3f} | {b:.3f} | {100 * (1 - b / a):.1f}% |", flush=True)

print(f"\ndecode, {args.steps} steps per call, cache {args.ctx}: ms per call, back to back")
print("| rows : live | idle rows token 0 | idle rows NO_TOKEN | saved |\n|---|---|---|---|")
for spec in args.decode.split(","):
    rows, live = map(int, spec.split(":"))
    a = decode_ms(rows, live, 0)
    b = decode_ms(rows, live, NO_TOKEN) if live < rows else a
    print(f"| {rows} : {live} | {a:.3f} | {b:.3f} | {100 * (1 - b / a):.1f}% |", flush=True)
