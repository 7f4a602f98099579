"""`python -m mixjax.serve`: an OpenAI-compatible server for a Hugging Face MoE checkpoint."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import mixjax

DTYPES = ("float32", "bfloat16")
# The thread switch interval while serving, ms. H200, bursts of 128 streaming requests (docs/BENCHMARKS.md, "Serving on
# one H200", fourteenth session): TTFT p50 over 7 runs each, median 153 ms at Python's 5 ms, 144 at 1, 127 at 0.2.
GIL_SWITCH_MS = 0.2


def positive_or(value: str, option: str, word: str) -> int | None:
    """An option that takes a positive integer or a word ("auto", "none"): None for the word, else the integer;
    ValueError naming the option for anything else."""
    if value.strip().lower() == word:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{option} must be a positive integer or '{word}', not {value!r}")
    return n


def decode_steps_for(value: str, platform: str) -> int:
    """--decode-steps: a positive integer, or "auto" (8 on GPU, 1 elsewhere)."""
    k = positive_or(value, "--decode-steps", "auto")
    return (8 if platform == "gpu" else 1) if k is None else k


def parse_row_counts(value: str | None, option: str, none: bool = False) -> list[int] | None:
    """A list of row counts (--decode-rows, --prefill-rows): None (the engine's default), positive integers separated
    by commas, or with none=True also "none" (an empty list)."""
    if value is None:
        return None
    if none and value.strip().lower() == "none":
        return []
    try:
        rows = [int(x) for x in value.split(",")]
    except ValueError:
        rows = [0]
    if any(r < 1 for r in rows):
        alternatives = ", or 'none'" if none else ""
        raise ValueError(f"{option} must be positive integers separated by commas{alternatives}, not {value!r}")
    return rows


def parse_decode_rows(value: str | None) -> list[int] | None:
    """--decode-rows: None (the engine's default), "none" (no programs on fewer rows) or positive integers."""
    return parse_row_counts(value, "--decode-rows", none=True)


def parse_max_prefill_tokens(value: str | None) -> dict:
    """--max-prefill-tokens: {} (the engine's default), {"max_prefill_tokens": None} for "none" (no limit), or a
    positive integer."""
    return {} if value is None else {"max_prefill_tokens": positive_or(value, "--max-prefill-tokens", "none")}


def engine_options(args) -> dict:
    """The Engine's keyword arguments from the command line (args.decode_steps already resolved); ValueError on a
    bad value."""
    return dict(max_batch=args.max_batch, max_seq_len=args.max_seq_len, max_queue=args.max_queue,
                prefill_buckets=[int(b) for b in args.prefill_buckets.split(",")] if args.prefill_buckets else None,
                pipeline=not args.no_pipeline, decode_steps=args.decode_steps,
                prefill_rows=parse_row_counts(args.prefill_rows, "--prefill-rows"),
                decode_rows=parse_decode_rows(args.decode_rows)) | parse_max_prefill_tokens(args.max_prefill_tokens)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mixjax.serve", description=__doc__)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled mixjax/default_model)")
    p.add_argument("--mesh", default=None, help="NODExGPU, e.g. 1x8 (default: 1x1 on CPU, 1xN on N accelerators)")
    p.add_argument("--strategy", default="auto", help="tp, ep, dp_ep, hybrid, hybrid_fused or auto")
    p.add_argument("--max-batch", type=int, default=8, help="decode slots (requests generating at once)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context limit: prompt + completion tokens")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    p.add_argument("--prefill-buckets", default=None,
                   help="comma-separated prefill lengths (default: 32,128,512 below --max-seq-len; on GPUs also "
                        "2048, capped at --max-seq-len)")
    p.add_argument("--prefill-rows", default=None, metavar="R1,R2,..",
                   help="row counts of the grouped prefill programs: waiting prompts of one bucket are prefilled "
                        "together, as many as the largest holds, each group by the smallest that holds it; 1: one "
                        "prompt per call (default: 4, and on GPUs also 16)")
    p.add_argument("--decode-rows", default=None,
                   help="comma-separated row counts of the multi-step decode programs compiled besides --max-batch: "
                        "a call runs the fewest rows that hold its requests' slots (default: 1,8,32,128 below "
                        "--max-batch, mixjax.serve.engine.DECODE_ROWS; 'none' for all slots in every call)")
    p.add_argument("--max-prefill-tokens", default=None, metavar="N",
                   help="while requests are decoding, the prefill work admitted between two decode calls: tokens of "
                        "the prefill programs, padding included (a group: its rows x its bucket); at least one "
                        "prompt, or of a long prompt's chunks. The other waiting prompts (or chunks) follow after "
                        "single decode steps, so that running requests pause for a part of a burst at a time. "
                        "'none': admit every prompt that has a slot at once (default: 8192, "
                        "mixjax.serve.engine.MAX_PREFILL_TOKENS)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: directory name)")
    p.add_argument("--no-pipeline", action="store_true",
                   help="read each decode step's tokens before dispatching the next (default: pipelined, the next "
                        "step starts from the sampled tokens on the device while the host reads them)")
    p.add_argument("--decode-steps", default="auto", metavar="K",
                   help="decode steps per dispatch: K > 1 runs K steps in one device-side loop and reads K tokens "
                        "per request at once, paying the host's per-step work once per K tokens; tokens stream in "
                        "bursts of K. Default auto: 8 on GPU (where one step per dispatch is host-bound at small "
                        "batch: ~1 ms of dispatch per step on an H200), 1 elsewhere")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds to let in-flight requests finish after SIGTERM")
    p.add_argument("--http", default="auto", choices=("auto", "httptools", "h11"),
                   help="HTTP parser (uvicorn's): auto takes httptools (C) when installed, else h11 (pure Python)")
    p.add_argument("--loop", default="auto", choices=("auto", "uvloop", "asyncio"),
                   help="event loop (uvicorn's): auto takes uvloop when installed, else asyncio")
    p.add_argument("--gil-switch-ms", type=float, default=GIL_SWITCH_MS, metavar="MS",
                   help="Python's thread switch interval while serving (sys.setswitchinterval; Python's default is "
                        f"5): how long the engine's thread may wait for the GIL while the HTTP event loop runs "
                        f"(default {GIL_SWITCH_MS:g})")
    p.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                   help="do not freeze the objects alive after the warm-up out of Python's garbage collections "
                        "(default: frozen, gc.freeze: full collections then skip them)")
    g = p.add_argument_group("multi-host (docs/MULTIHOST.md)", "One process per host, the same options on every "
                             "process; process 0 serves HTTP. Without these, a SLURM (srun) or Open MPI (mpirun) "
                             "launch of several processes is detected by jax.distributed.")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordination service (env MIXJAX_COORDINATOR)")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="number of processes (env MIXJAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="this process, 0..N-1; 0 runs the HTTP server (env MIXJAX_PROCESS_ID)")
    g.add_argument("--failure-timeout", type=float, default=None, metavar="S",
                   help="seconds without a heartbeat from another process before every process stops with an "
                        "error (env MIXJAX_FAILURE_TIMEOUT, default 20)")
    g.add_argument("--init-timeout", type=float, default=None, metavar="S",
                   help="seconds for all processes to join (env MIXJAX_INIT_TIMEOUT, default 300)")
    args = p.parse_args(argv)
    if not args.gil_switch_ms > 0:  # checked before minutes of loading and warm-up, not after
        p.error(f"--gil-switch-ms must be positive, got {args.gil_switch_ms:g}")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mixjax import distributed

    try:
        spec = distributed.resolve_spec(args.coordinator, args.num_processes, args.process_id,
                                        args.failure_timeout, args.init_timeout)
    except distributed.DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    cluster = None
    if spec is not None:  # before anything starts a JAX backend
        print(f"mixjax joining a cluster: {spec.describe()}; failure timeout {spec.failure_timeout:g}s", flush=True)
        try:
            cluster = distributed.initialize(spec)
        except distributed.DistributedError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(distributed.EXIT_CLUSTER_FAILURE)
    try:
        _serve(args, cluster)
    except distributed.DistributedError as e:
        if cluster is not None:
            cluster.fail(str(e))  # exits
        print(f"error: {e}", file=sys.stderr)
        sys.exit(distributed.EXIT_CLUSTER_FAILURE)
    except SystemExit as e:
        if cluster is None or e.code in (0, None):
            raise
        # a bad option or checkpoint: say so and leave at once (the other processes, unless they stop for the same
        # reason, see this one go: JAX ends them when process 0 is gone, the watchdog when another one is)
        print(e.code if isinstance(e.code, str) else f"error: exit status {e.code}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(e.code if isinstance(e.code, int) else 2)


def _serve(args, cluster):
    import hashlib

    import jax.numpy as jnp

    from mixjax import distributed
    from mixjax.models import load_config
    from mixjax.serve.engine import Engine
    from mixjax.serve.plan_choice import choose_plan
    from mixjax.sharding.mesh import LayoutError, make_mesh
    from mixjax.sharding.runner import ShardedModel
    from mixjax.sharding.strategies import get_strategy
    from mixjax.tokenizer import Tokenizer

    me = "" if cluster is None else f" process {cluster.process_id}"
    model_dir = Path(args.model) if args.model else Path(mixjax.__file__).parent / "default_model"
    if not (model_dir / "config.json").is_file():
        sys.exit(f"error: {model_dir} is not a checkpoint directory (no config.json)")
    cfg = load_config(model_dir)
    try:
        mesh_shape, strategy, reason = choose_plan(cfg, args.mesh, args.strategy)
        mesh = make_mesh(mesh_shape)
        sm = ShardedModel(cfg, mesh, get_strategy(strategy),
                          dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype])
    except (LayoutError, ValueError) as e:
        sys.exit(f"error: {e}")
    try:
        args.decode_steps = decode_steps_for(args.decode_steps, mesh.devices.flat[0].platform)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"mixjax{me} plan: mesh {mesh_shape}, strategy {strategy} ({reason}); {args.decode_steps} decode step(s) "
          f"per dispatch", flush=True)
    try:
        opts = engine_options(args)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if cluster is not None:  # every process must build the same engine, or their compiled steps would not match
        cluster.agree("serving", {
            "config.json": hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()[:16],
            "mesh": mesh_shape, "strategy": strategy, "dtype": args.dtype,
            **{k: v for k, v in opts.items() if k not in ("max_queue", "pipeline")}})
        hosts = {p: sorted(d.id for d in mesh.devices[p]) for p in range(mesh.devices.shape[0])}
        print(f"mixjax{me}: node {cluster.process_id} of the mesh = this process, devices {hosts[cluster.process_id]}",
              flush=True)
    t0 = time.monotonic()
    sm.load(model_dir, progress=False)
    st = sm.load_stats
    print(f"mixjax{me} read {st['bytes_read']} bytes of weights in {st['slices_read']} slices (the whole model has "
          f"{st['model_bytes']} bytes)", flush=True)
    tok = Tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    engine = Engine(sm, tok, cluster=cluster, **opts)
    if cluster is not None:
        cluster.watchdog.on_failure.append(engine.mark_failed)
        engine.metrics.processes = cluster.num_processes
    print(f"mixjax{me} loaded {model_dir} in {time.monotonic() - t0:.1f}s; {engine.slots} slots x "
          f"{engine.max_seq_len} positions, prefill buckets {engine.buckets} "
          f"(grouped prompts: programs of {engine.group_rows} rows; prefill while decoding: "
          f"{engine.max_prefill_tokens or 'no limit'} tokens per call); compiling...", flush=True)
    print(f"mixjax{me} warm-up (all compiles) took {engine.warmup():.1f}s", flush=True)
    if cluster is not None and not cluster.is_leader:
        return _follow(engine, cluster, args.gc_freeze)
    if cluster is not None:
        engine.metrics.plan_channel = cluster.channel
    _run_http(args, engine, model_dir, mesh_shape, strategy, reason)
    if cluster is not None and engine.failed is not None:  # a failure raced with a shutdown signal
        print(f"mixjax: error: engine unhealthy: {engine.failed}", file=sys.stderr, flush=True)
        os._exit(distributed.EXIT_CLUSTER_FAILURE)
    if cluster is not None:
        ch = cluster.channel
        print(f"mixjax sent {ch.n} step plans ({ch.bytes_sent} bytes) in {ch.send_seconds:.3f}s", flush=True)
        cluster.shutdown()
    print("mixjax stopped", flush=True)


def _follow(engine, cluster, gc_freeze: bool = True):
    """Processes other than 0: no HTTP; run process 0's step plans until it stops."""
    me = cluster.process_id

    def ignore(signum, _frame):
        print(f"mixjax process {me}: signal {signum} ignored; this process stops when process 0 does (or after "
              f"the failure timeout if process 0 is gone)", flush=True)

    signal.signal(signal.SIGTERM, ignore)
    signal.signal(signal.SIGINT, ignore)
    settle_gc(gc_freeze, engine.metrics)
    print(f"mixjax process {me} of {cluster.num_processes} ready; following process 0's step plans", flush=True)
    try:
        engine.follow()
    except Exception as e:
        cluster.watchdog.fail_after_check(f"process {me} could not run a step plan: {e}")  # exits
    cluster.shutdown()
    print(f"mixjax process {me} stopped", flush=True)


def http_and_loop(http: str = "auto", loop: str = "auto") -> tuple[str, str]:
    """uvicorn's HTTP parser and event loop, "auto" resolved as uvicorn resolves it (httptools and uvloop when they
    import), so that the ready line can name them. Both are dependencies: under bursts of streaming requests the
    pure-Python ones (h11, asyncio) added TTFT and held the GIL that the engine's thread needs (docs/BENCHMARKS.md,
    "Serving on one H200")."""
    have = lambda mod: importlib.util.find_spec(mod) is not None
    if http == "auto":
        http = "httptools" if have("httptools") else "h11"
    if loop == "auto":
        loop = "uvloop" if have("uvloop") else "asyncio"
    return http, loop


def settle_gc(freeze: bool, metrics) -> int:
    """After the warm-up: time the process's garbage collections into the metrics and, with freeze, collect once and
    move every object alive into Python's permanent generation (gc.freeze), so that later full collections do not
    walk them. After the warm-up a server holds ~280k objects (the model's modules, jax's traced and compiled
    programs), which a full collection walks: ~150 ms on a 2-core CPU (tools/probe_gc.py), ~0.25-0.3 s on an H200
    host, where one came in about every other load run, stopping the engine's thread and the HTTP loop alike.
    Returns the objects frozen."""
    metrics.watch_gc()
    if not freeze:
        return 0
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def set_gil_switch(ms: float):
    """Python's thread switch interval: a thread that wants the GIL while another runs Python code waits this long
    before asking it to let go. The engine's thread wants it back after every device call, and under load the HTTP
    event loop holds it while it parses requests and writes streams: at Python's 5 ms the engine's next dispatch
    could wait that long each time."""
    sys.setswitchinterval(ms / 1e3)


def _run_http(args, engine, model_dir, mesh_shape, strategy, reason):
    import uvicorn

    from mixjax.serve.api import Server, build_app

    frozen = settle_gc(args.gc_freeze, engine.metrics)
    engine.start()

    name = args.served_model_name or model_dir.name
    app = build_app(Server(engine, name, {"mesh": mesh_shape, "strategy": strategy, "reason": reason}), engine)

    http, loop = http_and_loop(args.http, args.loop)
    set_gil_switch(args.gil_switch_ms)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", http=http, loop=loop,
                            timeout_graceful_shutdown=args.graceful_timeout)
    server = uvicorn.Server(config)

    def announce():
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            print(f"mixjax ready on http://{args.host}:{args.port} (HTTP parser {http}, event loop {loop}, "
                  f"GIL switch {args.gil_switch_ms:g} ms, {frozen} objects frozen for the GC)", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    # uvicorn handles SIGTERM (stop accepting, let in-flight requests finish) and then re-raises it to the
    # handler that was there before: make that one a no-op so that the process exits 0 after a clean shutdown
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    engine.stop(cancel=True, timeout=5.0)
    if not server.started:
        print(f"error: the HTTP server could not start on {args.host}:{args.port}", file=sys.stderr, flush=True)
        if engine.cluster is not None:
            engine.cluster.shutdown()
        sys.exit(1)


if __name__ == "__main__":
    main()
