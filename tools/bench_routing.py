"""How the benchmark's random model routes a prompt: per MoE layer, the experts used, the busiest expert's and the
top 8's share of the (row, expert) pairs, and the 128-row blocks the sorted layout would fill. `--init bench` is
the benchmark's model (`bench.decode.bench_model`), `--init plain` the model class's own N(0, 0.02) weights. A
development tool (the dense expert path on CPU; --impl grouped on a GPU):
    python tools/bench_routing.py [--preset qwen3-30b-a3b] [--layers 4] [--tokens 256] [--init plain,bench]
docs/evidence/bench-model-routing-cpu-2026-12-01.txt is its output (the routing is recorded by mixjax.bench.routing)."""
import argparse
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from mixjax.bench.decode import bench_config, bench_model, decode_vocab
from mixjax.bench.routing import recorded_routing
from mixjax.models import model_class
from mixjax.sharding.mesh import make_mesh
from mixjax.sharding.runner import ShardedModel
from mixjax.sharding.strategies import STRATEGIES

ap = argparse.ArgumentParser(); ap.add_argument("--preset", default="qwen3-30b-a3b")
ap.add_argument("--layers", type=int, default=4); ap.add_argument("--tokens", type=int, default=256)
ap.add_argument("--init", default="plain,bench"); ap.add_argument("--impl", default="dense")
a = ap.parse_args()
cfg = bench_config(a.preset, a.layers, decode_vocab(a.preset, None))
tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (1, a.tokens)), jnp.int32)
e = cfg.num_experts
for init in a.init.split(","):
    model = bench_model(cfg) if init == "bench" else model_class(cfg)(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    m = ShardedModel(cfg, make_mesh("1x1"), STRATEGIES["tp"], dtype=jnp.bfloat16, expert_impl=a.impl)
    m.set_state(nnx.state(model))
    del model
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
