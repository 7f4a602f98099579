"""Host dispatch vs device time of the bench decode step: synced per step, dispatch return, and unsynced."""
import sys, time, statistics
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from mixjax.bench.decode import bench_config, bench_model
from mixjax.sharding.mesh import make_mesh
from mixjax.sharding.runner import ShardedModel
from mixjax.sharding.strategies import STRATEGIES
cfg = bench_config("qwen3-30b-a3b", 4, 151936)
m = ShardedModel(cfg, make_mesh("1x1"), STRATEGIES["tp"], dtype=jnp.bfloat16, expert_impl="grouped")
m.set_state(nnx.state(bench_model(cfg)))
for b in map(int, sys.argv[1].split(",")):
    tok = jnp.zeros((b, 1), jnp.int32) + 7
    pos = jnp.full((b, 1), 1023, jnp.int32)
    cache = m.init_cache(b, 1024)
    for _ in range(3):
        lg, cache = m.forward(tok, pos, cache)
    lg.block_until_ready()
    disp, tot = [], []
    for _ in range(10):
        t0 = time.perf_counter(); lg, cache = m.forward(tok, pos, cache); t1 = time.perf_counter()
        lg.block_until_ready(); t2 = time.perf_counter(); disp.append(t1 - t0); tot.append(t2 - t0)
    t0 = time.perf_counter()
    for _ in range(10):
        lg, cache = m.forward(tok, pos, cache)
    lg.block_until_ready(); un = (time.perf_counter() - t0) / 10
    print(f"b={b}: synced {statistics.median(tot)*1e3:.3f} ms, dispatch returns after {statistics.median(disp)*1e3:.3f} ms, unsynced {un*1e3:.3f} ms/step", flush=True)
