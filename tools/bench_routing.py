"""How the benchmark's random model routes a prompt: per MoE layer, the experts used, the busiest expert's and the
top 8's share of the (row, expert) pairs, and the 128-row blocks the sorted layout would fill. `--init bench` is
the benchmark's model (`bench.decode.bench_model`), `--init plain` the model class's own N(0, 0.02) weights. A
development tool (the dense expert path on CPU; --impl grouped on a GPU):
    python tools/bench_routing.py [--preset qwen3-30b-a3b] [--layers 4] [--tokens 256] [--init plain,bench]
        [--decode 1,8,32,128]
--decode B,...: instead of a prompt, one decode step of B distinct random tokens at position 1023 (as the decode
benchmark's forward), and the experts it touches per layer against uniform routing's expectation E (1 - (1 - k/E)^B),
which the decode roofline counts.
docs/evidence/bench-model-routing-cpu-2026-12-01.txt is its output (the routing is recorded by mixjax.bench.routing)."""
import argparse
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from mixjax.bench.decode import bench_config, bench_model, decode_vocab
from mixjax.planner.cost import touched_experts
from mixjax.bench.routing import recorded_routing
from mixjax.models import model_class
from mixjax.sharding.mesh import make_mesh
from mixjax.sharding.runner import ShardedModel
from mixjax.sharding.strategies import STRATEGIES

ap = argparse.ArgumentParser(); ap.add_argument("--preset", default="qwen3-30b-a3b")
ap.add_argument("--layers", type=int, default=4); ap.add_argument("--tokens", type=int, default=256)
ap.add_argument("--init", default="plain,bench"); ap.add_argument("--impl", default="dense")
ap.add_argument("--decode", default="", help="batches of one decode step each, e.g. 1,8,32,128")
a = ap.parse_args()
cfg = bench_config(a.preset, a.layers, decode_vocab(a.preset, None))
tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (1, a.tokens)), jnp.int32)
e = cfg.num_experts
for init in a.init.split(","):
    model = bench_model(cfg) if init == "bench" else model_class(cfg)(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    m = ShardedModel(cfg, make_mesh("1x1"), STRATEGIES["tp"], dtype=jnp.bfloat16, expert_impl=a.impl)
    m.set_state(nnx.state(model))
    del model
    if a.decode:
        k = cfg.num_experts_per_tok
        for b in map(int, a.decode.split(",")):
            ids = jnp.asarray(np.random.RandomState(b).randint(0, cfg.vocab_size, (b, 1)), jnp.int32)
            with recorded_routing() as seen:
                m.forward(ids, jnp.full((b, 1), 1023, jnp.int32), m.init_cache(b, 1024))
                jax.effects_barrier()
            print(f"{init} init, {a.preset}, a decode step of batch {b}: experts touched per layer "
                  f"{[len(np.unique(s)) for s in seen]} of {e}; uniform routing expects {touched_experts(e, k, b):.0f}",
                  flush=True)
        continue
    with recorded_routing() as seen:
        m.forward_last(tokens, jnp.arange(a.tokens, dtype=jnp.int32)[None], m.init_cache(1, a.tokens),
                       jnp.full((1,), a.tokens - 1, jnp.int32), fresh=True)
        jax.effects_barrier()
    print(f"{init} init, {a.preset}, a {a.tokens}-token prompt (8 of {e} experts are {8 / e:.1%} of them; uniform "
          f"random routing puts a little more on the 8 busiest):", flush=True)
    for layer, ids in enumerate(seen):  # the callbacks of one forward arrive in layer order on one device
        c = np.bincount(ids.reshape(-1), minlength=e)
        top = np.sort(c)[::-1]
        print(f"  layer {layer}: experts used {np.sum(c > 0)}/{e}; busiest {c.max() / c.sum():.1%} of the pairs, top 8 "
              f"{top[:8].sum() / c.sum():.1%}; 128-row blocks {int(np.sum(-(-c // 128)))}", flush=True)
