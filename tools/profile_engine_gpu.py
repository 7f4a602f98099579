"""Where the serving engine's decode interval goes on a GPU: one run of the engine (batch B, K steps per dispatch,
sampling at temperature 1 as bench.decode's engine rows) under the JAX profiler; prints GPU busy time per token,
the idle gaps between kernels, and the largest kernels. A development tool:
    python tools/profile_engine_gpu.py [--batch 1] [--tokens 96] [--steps 8] [--layers 4]"""
import argparse, collections, tempfile, threading, time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from mixjax.bench.decode import bench_config, bench_model, decode_vocab
from mixjax.serve.engine import Engine, Request, SamplingParams
from mixjax.sharding.mesh import make_mesh
from mixjax.sharding.runner import ShardedModel
from mixjax.sharding.strategies import STRATEGIES
from gpu_trace import gpu_kernels

ap = argparse.ArgumentParser(); ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--tokens", type=int, default=96); ap.add_argument("--steps", type=int, default=8)
ap.add_argument("--layers", type=int, default=4); ap.add_argument("--top", type=int, default=20)
a = ap.parse_args()
cfg = bench_config("qwen3-30b-a3b", a.layers, decode_vocab("qwen3-30b-a3b", None))
m = ShardedModel(cfg, make_mesh("1x1"), STRATEGIES["tp"], dtype=jnp.bfloat16, expert_impl="grouped")
m.set_state(nnx.state(bench_model(cfg)))
eng = Engine(m, None, max_batch=a.batch, max_seq_len=1024, prefill_buckets=[16], max_queue=a.batch,
             decode_steps=a.steps)
eng.warmup(variants=[(True, False, False)])
eng.start()


def run():
    left, done, stamps = [a.batch], threading.Event(), []

    def sink(ev):
        if ev["type"] == "token":
            stamps.extend([time.perf_counter()] * len(ev["ids"]))
        elif ev["type"] in ("done", "error"):
            left[0] -= 1
            if not left[0]:
                done.set()
    rng = np.random.RandomState(0)
    for i in range(a.batch):
        eng.submit(Request(rng.randint(0, m.vocab_size, 8).tolist(),
                           SamplingParams(max_tokens=a.tokens, temperature=1.0, seed=i, ignore_eos=True), sink))
    done.wait(300)
    return stamps


run()  # compiles what warmup left out
d = tempfile.mkdtemp()
with jax.profiler.trace(d, create_perfetto_trace=True):
    stamps = run()
eng.stop()
ks = [(e["ts"], e["dur"], e["name"]) for e in gpu_kernels(d)]
busy = sum(d_ for _, d_, _ in ks)
span = ks[-1][0] + ks[-1][1] - ks[0][0]
gaps, gap_n = collections.Counter(), collections.Counter()
for (t0, d0, n0), (t1, _, n1) in zip(ks, ks[1:]):
    g = t1 - (t0 + d0)
    if g > 5:
        gaps[f"{n0[:30]} -> {n1[:30]}"] += g
        gap_n[f"{n0[:30]} -> {n1[:30]}"] += 1
mid = next((i for i, (_, _, n) in enumerate(ks) if "MemcpyH2D" in n and i > len(ks) // 2), len(ks) // 2)
print("the stream around a dispatch in the middle (start us from the first, duration us, gap us before, name):")
for j in range(max(1, mid - 12), min(len(ks), mid + 12)):
    gap = ks[j][0] - ks[j - 1][0] - ks[j - 1][1]
    print(f"  {ks[j][0] - ks[0][0]:10.0f} {ks[j][1]:7.1f} {gap:7.1f}  {ks[j][2][:60]}")
tokens = a.tokens * a.batch
interval = (stamps[-1] - stamps[0]) / (len(stamps) - 1)  # as bench.decode: the first token (prefill) to the last
print(f"engine b={a.batch} K={a.steps}: {len(stamps)} tokens, interval {interval * 1e3:.3f} ms; "
      f"GPU span {span / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms ({busy / span:.0%}), busy per token-step "
      f"{busy / (tokens / a.batch):.1f} us, {len(ks)} kernels")
print(f"gaps over 5 us: {sum(gaps.values()) / 1e3:.2f} ms in all; total by neighbours (count):")
for k, v in gaps.most_common(10):
    print(f"  {v:9.0f} us  x{gap_n[k]:5d}  {k}")
tot = collections.Counter()
for _, d_, n in ks:
    tot[n[:60]] += d_
print("largest kernels, us per token-step:")
for k, v in tot.most_common(a.top):
    print(f"  {v / (tokens / a.batch):8.1f}  {k}")
