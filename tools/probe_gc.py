"""How long Python's full garbage collection takes in a warmed-up serving process, before and after gc.freeze (what
`mixjax.serve` does after its warm-up: `settle_gc`). The bundled default model on one device, a small engine.
A development tool:
    JAX_PLATFORMS=cpu PYTHONPATH=. python tools/probe_gc.py"""
import gc
import time
from pathlib import Path

import mixjax
from mixjax.serve.engine import Engine
from mixjax.sharding.mesh import make_mesh
from mixjax.sharding.runner import load_sharded
from mixjax.sharding.strategies import STRATEGIES


def full_collection_ms() -> float:
    t0 = time.perf_counter()
    gc.collect()
    return 1e3 * (time.perf_counter() - t0)


sm = load_sharded(Path(mixjax.__file__).parent / "default_model", make_mesh("1x1"), STRATEGIES["tp"], progress=False)
eng = Engine(sm, None, max_batch=4, max_seq_len=128, decode_steps=4)
eng.warmup()
print(f"objects the collector tracks after the warm-up: {len(gc.get_objects())}")
print("full collection: " + ", ".join(f"{full_collection_ms():.1f}" for _ in range(3)) + " ms")
gc.freeze()
print(f"after gc.freeze ({gc.get_freeze_count()} objects frozen): full collection "
      + ", ".join(f"{full_collection_ms():.2f}" for _ in range(3)) + " ms")
