"""What a model's routers chose, for checking that a benchmark's random model routes like a trained one (tools and
tests; not used when serving)."""

from __future__ import annotations

import contextlib

import jax
import numpy as np

from mixjax.models import qwen3_moe


@contextlib.contextmanager
def recorded_routing():
    """Within the block, every Qwen3 MoE layer's routing of a forward pass is appended to the yielded list: its expert
    ids [rows, k] as numpy, one entry per layer in the order the layers ran (one device). Call
    `jax.effects_barrier()` before reading it: the ids leave the device through a debug callback."""
    seen: list[np.ndarray] = []
    route = qwen3_moe.Qwen3MoE.route

    def recording_route(self, x, pallas=None):
        ids, w = route(self, x, pallas)
        jax.debug.callback(lambda i: seen.append(np.asarray(i)), ids)
        return ids, w

    qwen3_moe.Qwen3MoE.route = recording_route
    try:
        yield seen
    finally:
        qwen3_moe.Qwen3MoE.route = route
