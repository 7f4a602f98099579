"""Where a small-batch decode step's time goes on a GPU: host enqueue vs device, one step per call vs several
steps in one call (runner.decode_loop, greedy; --unroll U unrolls its scan), under the XLA_FLAGS of the environment. A development tool:
    python tools/probe_launch.py 1,8 [--steps 8] [--profile]"""
import argparse, collections, os, statistics, tempfile, time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from mixjax.bench.decode import bench_config, bench_model
from mixjax.sharding.mesh import make_mesh
from mixjax.sharding.runner import ShardedModel, decode_loop
from mixjax.sharding.strategies import STRATEGIES
from gpu_trace import gpu_kernels

ap = argparse.ArgumentParser(); ap.add_argument("batch"); ap.add_argument("--steps", type=int, default=8)
ap.add_argument("--profile", action="store_true"); ap.add_argument("--unroll", type=int, default=1); ap.add_argument("--layers", type=int, default=4); ap.add_argument("--top", type=int, default=12)
a = ap.parse_args()
print("XLA_FLAGS:", os.environ.get("XLA_FLAGS", ""), flush=True)
cfg = bench_config("qwen3-30b-a3b", a.layers, 151936)
m = ShardedModel(cfg, make_mesh("1x1"), STRATEGIES["tp"], dtype=jnp.bfloat16, expert_impl="grouped")
m.set_state(nnx.state(bench_model(cfg)))
fwd = m._forward
V = cfg.vocab_size


def multi(leaves, tok, pos, cache):  # the engine's loop (runner.decode_loop), greedy
    outs, last, cache = decode_loop(fwd, leaves, tok, pos, cache, a.steps,
                                    lambda i, lg: (jnp.argmax(lg[:, :V], axis=-1).astype(jnp.int32),), unroll=a.unroll)
    return last, pos + a.steps, cache, outs[0]


def single(leaves, tok, pos, cache):
    logits, cache = fwd(leaves, tok[:, None], pos[:, None], cache)
    return jnp.argmax(logits[:, 0, :V], axis=-1).astype(jnp.int32), pos + 1, cache


multi_j = jax.jit(multi, donate_argnums=(3,))
single_j = jax.jit(single, donate_argnums=(3,))


def gpu_profile(run, label, reps=5):
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(reps):
            run()
    busy, n, lo, hi, tot = 0.0, 0, 1e30, 0, collections.Counter()
    for e in gpu_kernels(d):
        busy += e["dur"]; n += 1; lo = min(lo, e["ts"]); hi = max(hi, e["ts"] + e["dur"]); tot[e["name"][:90]] += e["dur"]
    small = sum(v for v in tot.values() if v / reps < 8 * 4)
    print(f"  kernels under 8 us per layer-call: {small / reps:.0f} us/call in {sum(1 for v in tot.values() if v / reps < 32)} distinct kernels")
    print(f"  profile {label}: GPU busy {busy / reps:.0f} us/call, {n // reps} kernels/call, span {(hi - lo) / reps:.0f} us/call")
    for k, v in tot.most_common(a.top):
        print(f"     {v / reps:8.1f} us  {k}")


for b in map(int, a.batch.split(",")):
    ctx = 1024
    tok = jnp.asarray(np.random.RandomState(b).randint(0, V, b), jnp.int32)  # distinct rows: routing spreads
    pos = jnp.full((b,), ctx - 2 * a.steps - 40, jnp.int32)
    st = {"cache": m.init_cache(b, ctx)}
    p0 = pos

    def run1():
        t, _, st["cache"] = single_j(m.leaves, tok, p0, st["cache"]); return t

    def runk():
        t, _, st["cache"], out = multi_j(m.leaves, tok, p0, st["cache"]); return out

    for r in (run1, runk):
        for _ in range(3):
            jax.block_until_ready(r())
    res = {}
    for name, r, k in (("1-step", run1, 1), (f"{a.steps}-step", runk, a.steps)):
        syn, disp = [], []
        for _ in range(20):
            t0 = time.perf_counter(); o = r(); t1 = time.perf_counter(); jax.block_until_ready(o)
            syn.append(time.perf_counter() - t0); disp.append(t1 - t0)
        t0 = time.perf_counter()
        for _ in range(20):
            o = r()
        jax.block_until_ready(o); b2b = (time.perf_counter() - t0) / 20
        res[name] = statistics.median(syn) / k
        print(f"b={b} {name}: synced {statistics.median(syn) * 1e3 / k:.3f} ms/token-step, enqueue returns after "
              f"{statistics.median(disp) * 1e3:.3f} ms/call, back-to-back {b2b * 1e3 / k:.3f} ms/token-step", flush=True)
    if a.profile:
        gpu_profile(run1, f"b={b} 1-step")
        gpu_profile(runk, f"b={b} {a.steps}-step")
