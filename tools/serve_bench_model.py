"""The OpenAI-compatible server (`mixjax.serve`'s engine and HTTP app) on the benchmark's model: random bf16 weights
of a preset's real shapes (`mixjax.bench.decode.bench_model`, balanced routing) instead of a checkpoint, so that a
GPU can be load-tested (`python -m mixjax.bench.serve`) without writing and reading gigabytes of weights. No
tokenizer: prompts are token ids. A development tool:
    python tools/serve_bench_model.py --preset qwen3-30b-a3b --layers 4 [any option of python -m mixjax.serve]
The plan is one device, tensor-parallel strategy (1x1). With --direct "LOAD", no HTTP server: the load that
`mixjax.bench.serve` would send with the options LOAD (e.g. "--requests 384 --arrival bursty --burst 128 --rate 128
--prompt-len 128:512 --output-len 256:256 --vocab-hi 150000") is submitted to the engine in this process, and the
same report is printed: what the engine delivers without the HTTP layer and the client. --direct may be given
several times: the loads run one after the other on the same warmed-up engine."""
import argparse, shlex, sys, threading, time
import numpy as np
from pathlib import Path
import jax.numpy as jnp
from flax import nnx
from mixjax.bench.decode import bench_config, bench_model, decode_vocab
from mixjax.serve.__main__ import _run_http, decode_steps_for, engine_options, parse_args, settle_gc
from mixjax.serve.engine import Engine
from mixjax.sharding.mesh import make_mesh
from mixjax.sharding.runner import ShardedModel
from mixjax.sharding.strategies import STRATEGIES

own = argparse.ArgumentParser(add_help=False)
own.add_argument("--preset", default="qwen3-30b-a3b")
own.add_argument("--layers", type=int, default=4)
own.add_argument("--direct", action="append", default=None, metavar="LOAD")
mine, rest = own.parse_known_args()
args = parse_args(rest)
cfg = bench_config(mine.preset, mine.layers, decode_vocab(mine.preset, None))
sm = ShardedModel(cfg, make_mesh("1x1"), STRATEGIES["tp"], dtype=jnp.bfloat16)
sm.set_state(nnx.state(bench_model(cfg)))
args.decode_steps = decode_steps_for(args.decode_steps, sm.mesh.devices.flat[0].platform)
try:
    opts = engine_options(args)
except ValueError as e:
    sys.exit(f"error: {e}")
engine = Engine(sm, None, **opts)
print(f"bench model {mine.preset}, {mine.layers} layers, experts {sm.expert_impl}; {engine.slots} slots x "
      f"{engine.max_seq_len} positions, buckets {engine.buckets} (grouped on rows {engine.group_rows}), "
      f"{args.decode_steps} decode steps per dispatch on rows {engine.decode_rows}, prefill while decoding "
      f"{engine.max_prefill_tokens or 'unlimited'} tokens; "
      f"warm-up {engine.warmup():.1f} s", flush=True)


def run_direct(load_options: str):
    """Submit the load that `bench.serve` would send with these options to the running engine; print its report."""
    from mixjax.bench import serve as load
    from mixjax.serve.engine import Request, SamplingParams
    la = load.parse_args(shlex.split(load_options))
    starts, work = load.workload(la)  # the requests bench.serve would send, at the same times
    stamps, t_sent, done = [[] for _ in work], [0.0] * len(work), threading.Semaphore(0)

    def sink_for(i):
        def sink(ev):
            if ev["type"] == "token":
                stamps[i].extend([time.perf_counter()] * len(ev["ids"]))
            else:
                done.release()
        return sink
    t_begin = time.perf_counter()
    for i, (prompt, n) in enumerate(work):
        time.sleep(max(0.0, starts[i] - (time.perf_counter() - t_begin)))
        t_sent[i] = time.perf_counter()
        engine.submit(Request(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), sink_for(i)))
    for _ in work:
        done.acquire()
    wall = time.perf_counter() - t_begin
    results = [{"status": 200, "ttft": s_[0] - t0, "itl": list(np.diff(s_)), "tokens": len(s_)}
               for s_, t0 in zip(stamps, t_sent)]
    print(f"--direct {load_options}", flush=True)
    load.emit(load.report(la, results, wall), la.json)


if mine.direct:
    settle_gc(args.gc_freeze, engine.metrics)  # as the server does before it serves
    engine.start()
    for load_options in mine.direct:
        run_direct(load_options)
    engine.stop()
    sys.exit(0)
_run_http(args, engine, Path(f"{mine.preset}-{mine.layers}l-bench"), "1x1", "tp", "bench model, one device")
sys.exit(0)
