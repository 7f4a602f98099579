"""`python -m mixjax.serve`: an OpenAI-compatible server for a Hugging Face MoE checkpoint."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import mixjax

DTYPES = ("float32", "bfloat16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m mixjax.serve", description=__doc__)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled mixjax/default_model)")
    p.add_argument("--mesh", default=None, help="NODExGPU, e.g. 1x8 (default: 1x1 on CPU, 1xN on N accelerators)")
    p.add_argument("--strategy", default="auto", help="tp, ep, dp_ep, hybrid, hybrid_fused or auto")
    p.add_argument("--max-batch", type=int, default=8, help="decode slots (requests generating at once)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context limit: prompt + completion tokens")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    p.add_argument("--prefill-buckets", default=None,
                   help="comma-separated prefill lengths (default: 32,128,512 below --max-seq-len)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: directory name)")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds to let in-flight requests finish after SIGTERM")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import jax.numpy as jnp
    import uvicorn

    from mixjax.models import load_config
    from mixjax.serve.api import Server, build_app
    from mixjax.serve.engine import Engine
    from mixjax.serve.plan_choice import choose_plan
    from mixjax.sharding.mesh import make_mesh
    from mixjax.sharding.runner import ShardedModel
    from mixjax.sharding.strategies import get_strategy
    from mixjax.tokenizer import Tokenizer

    model_dir = Path(args.model) if args.model else Path(mixjax.__file__).parent / "default_model"
    if not (model_dir / "config.json").is_file():
        sys.exit(f"error: {model_dir} is not a checkpoint directory (no config.json)")
    cfg = load_config(model_dir)
    mesh_shape, strategy, reason = choose_plan(cfg, args.mesh, args.strategy)
    print(f"mixjax plan: mesh {mesh_shape}, strategy {strategy} ({reason})", flush=True)
    t0 = time.monotonic()
    sm = ShardedModel(cfg, make_mesh(mesh_shape), get_strategy(strategy),
                      dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype])
    sm.load(model_dir, progress=False)
    tok = Tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    buckets = [int(b) for b in args.prefill_buckets.split(",")] if args.prefill_buckets else None
    engine = Engine(sm, tok, max_batch=args.max_batch, max_seq_len=args.max_seq_len, prefill_buckets=buckets,
                    max_queue=args.max_queue)
    print(f"mixjax loaded {model_dir} in {time.monotonic() - t0:.1f}s; {engine.slots} slots x "
          f"{engine.max_seq_len} positions, prefill buckets {engine.buckets}; compiling...", flush=True)
    print(f"mixjax warm-up (all compiles) took {engine.warmup():.1f}s", flush=True)
    engine.start()

    name = args.served_model_name or model_dir.name
    app = build_app(Server(engine, name, {"mesh": mesh_shape, "strategy": strategy, "reason": reason}), engine)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.graceful_timeout)
    server = uvicorn.Server(config)

    def announce():
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            print(f"mixjax ready on http://{args.host}:{args.port}", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    # uvicorn handles SIGTERM (stop accepting, let in-flight requests finish) and then re-raises it to the
    # handler that was there before: make that one a no-op so that the process exits 0 after a clean shutdown
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    engine.stop(cancel=True, timeout=5.0)
    print("mixjax stopped", flush=True)


if __name__ == "__main__":
    main()
