"""XLA flags that let collectives on different mesh axes run at the same time on GPU (the fused AR-A2A relies on
them). They must be in XLA_FLAGS before the GPU backend starts; `apply()` adds them unless already set."""

from __future__ import annotations

import os

GPU_OVERLAP_FLAGS = (
    "--xla_gpu_experimental_parallel_collective_overlap_limit=2",
    "--xla_gpu_experimental_enable_collective_multi_streaming=true",
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    # XLA's combiners otherwise merge the chunks' reduce-scatters and all-gathers into one collective each,
    # which serialises the fused pipeline (seen in the scheduled HLO on an H100, 2026-11-24; docs/FUSED_SCHEDULE.md)
    "--xla_gpu_all_gather_combine_threshold_bytes=0",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=0",
)


def gpu_plugin_installed() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("jax_cuda13_plugin", "jax_cuda12_plugin"))


def apply() -> None:
    """Called on `import mixjax`, before JAX starts a backend. Only on machines with JAX's CUDA plugin: other
    XLA builds reject flags they do not know."""
    if not gpu_plugin_installed():
        return
    flags = os.environ.get("XLA_FLAGS", "")
    for f in GPU_OVERLAP_FLAGS:
        if f.split("=")[0] not in flags:
            flags = f"{flags} {f}".strip()
    os.environ["XLA_FLAGS"] = flags
