"""What a model's routers chose, for checking that a benchmark's random model routes like a trained one (tools and
tests; not used when serving)."""

from __future__ import annotations

import contextlib

import jax
import numpy as np

from mixjax.models.deepseek_v3 import DeepseekV3MoE
from mixjax.models.qwen3_moe import Qwen3MoE


@contextlib.contextmanager
def recorded_routing():
    """Within the block, every MoE layer's routing of a forward pass (Qwen3 and DeepSeek-V3) is appended to the
    yielded list: its expert ids [rows, k] as numpy, one entry per layer in the order the layers ran (one device).
    Call `jax.effects_barrier()` before reading it: the ids leave the device through a debug callback."""
    seen: list[np.ndarray] = []
    routes = {cls: cls.route for cls in (Qwen3MoE, DeepseekV3MoE)}

    def recording(route):
        def recording_route(self, x, pallas=None):
            ids, w = route(self, x, pallas)
            jax.debug.callback(lambda i: seen.append(np.asarray(i)), ids)
            return ids, w
        return recording_route

    for cls, route in routes.items():
        cls.route = recording(route)
    try:
        yield seen
    finally:
        for cls, route in routes.items():
            cls.route = route
