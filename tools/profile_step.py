"""Per-kernel GPU time of one bench decode step (or prefill), from a JAX profiler trace (perfetto JSON).
A development tool: python tools/profile_step.py BATCH[,BATCH..] [--prefill T] [--impl grouped]."""
import argparse, collections, glob, gzip, json, os, tempfile
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from mixjax.bench.decode import bench_config
from mixjax.models.qwen3_moe import Qwen3MoeForCausalLM
from mixjax.sharding.mesh import make_mesh
from mixjax.sharding.runner import ShardedModel
from mixjax.sharding.strategies import STRATEGIES

ap = argparse.ArgumentParser(); ap.add_argument("batch"); ap.add_argument("--prefill", type=int, default=0)
ap.add_argument("--impl", default="grouped"); ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--ctx", type=int, default=1024); ap.add_argument("--top", type=int, default=25)
a = ap.parse_args()
cfg = bench_config("qwen3-30b-a3b", a.layers, 151936)
m = ShardedModel(cfg, make_mesh("1x1"), STRATEGIES["tp"], dtype=jnp.bfloat16, expert_impl=a.impl)
m.set_state(nnx.state(Qwen3MoeForCausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))
for b in map(int, a.batch.split(",")):
    t = a.prefill or 1
    ctx = a.prefill or a.ctx
    tok = jnp.zeros((b, t), jnp.int32) + 7
    pos = jnp.asarray(np.broadcast_to(np.arange(ctx - t, ctx, dtype=np.int32), (b, t)))
    cache = m.init_cache(b, ctx)
    run = (lambda c: m.forward_last(tok, pos, c, jnp.full((b,), t - 1, jnp.int32), fresh=True)) if a.prefill else \
          (lambda c: m.forward(tok, pos, c))
    for _ in range(3):
        lg, cache = run(cache)
    lg.block_until_ready()
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(5):
            lg, cache = run(cache)
        lg.block_until_ready()
    f = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[0]
    ev = json.load(gzip.open(f))
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    names = {}
    for e in ev:
        if e.get("ph") == "M" and e.get("name") in ("thread_name", "process_name"):
            names[(e["pid"], e.get("tid"))] = e["args"]["name"]
    tot = collections.Counter(); cnt = collections.Counter(); gpu_total = 0.0; t_lo, t_hi = 1e30, 0
    for e in ev:
        if e.get("ph") != "X": continue
        pname = names.get((e["pid"], None), "") + "/" + names.get((e["pid"], e.get("tid")), "")
        if "/device:GPU" not in pname or "Stream" not in pname: continue
        t_lo = min(t_lo, e["ts"]); t_hi = max(t_hi, e["ts"] + e["dur"])
        key = e["name"]
        hlo = (e.get("args") or {}).get("hlo_op") or (e.get("args") or {}).get("long_name")
        if hlo and hlo not in key:
            key = f"{key} [{str(hlo)[:60]}]"
        tot[key] += e["dur"] / 5; cnt[key] += 1; gpu_total += e["dur"] / 5
    if not gpu_total:
        print(sorted(set(names.values()))[:40])
    print(f"== batch {b} {'prefill ' + str(t) if a.prefill else 'decode'}: GPU kernel time per step {gpu_total:.0f} us, span {(t_hi - t_lo) / 5:.0f} us, {sum(cnt.values())//5} kernels")
    for n_, us in tot.most_common(a.top):
        print(f"  {us:8.1f} us  x{cnt[n_]//5:3d}  {n_[:110]}")
