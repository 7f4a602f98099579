"""Where the serving engine's host time goes with one decode step per dispatch: the engine loop run in this thread
under cProfile (no engine thread), one request of N greedy tokens on the bench model. A development tool:
    python tools/profile_engine_host.py [--layers 2] [--tokens 200] [--steps 1]"""
import argparse, cProfile, pstats, time
import jax.numpy as jnp
from flax import nnx
from mixjax.bench.decode import bench_config, bench_model
from mixjax.serve.engine import Engine, Request, SamplingParams
from mixjax.sharding.mesh import make_mesh
from mixjax.sharding.runner import ShardedModel
from mixjax.sharding.strategies import STRATEGIES

ap = argparse.ArgumentParser(); ap.add_argument("--layers", type=int, default=2)
ap.add_argument("--tokens", type=int, default=200); ap.add_argument("--steps", type=int, default=1)
ap.add_argument("--preset", default="qwen3-30b-a3b")
a = ap.parse_args()
cfg = bench_config(a.preset, a.layers, 151936 if a.preset.startswith("qwen3-30b") else 512)
m = ShardedModel(cfg, make_mesh("1x1"), STRATEGIES["tp"], dtype=jnp.bfloat16, expert_impl="auto")
m.set_state(nnx.state(bench_model(cfg)))
eng = Engine(m, None, max_batch=1, max_seq_len=1024, prefill_buckets=[16], decode_steps=a.steps)
eng.warmup(variants=[(False, False, False)])
for run in range(2):  # the first run compiles what warmup left out
    done = []
    eng.submit(Request(list(range(1, 9)), SamplingParams(max_tokens=a.tokens, temperature=0.0, ignore_eos=True),
                       lambda ev: done.append(ev) if ev["type"] in ("done", "error") else None))
    prof = cProfile.Profile() if run else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    iters = 0
    while not done:
        eng._iteration(); iters += 1
    if prof:
        prof.disable()
    dt = time.perf_counter() - t0
    print(f"run {run}: {iters} iterations, {dt * 1e3 / iters:.3f} ms per iteration, {dt * 1e3 / a.tokens:.3f} ms per token")
pstats.Stats(prof).sort_stats("tottime").print_stats(25)
