"""Parallel strategies: where weights and tokens live on a (node, gpu) mesh.

Every strategy computes the same function. A strategy names, for attention and for the MoE experts, which mesh
axes split the work (tensor parallelism over heads / FFN width, expert parallelism over experts, data parallelism
over the batch). The model code runs inside one `shard_map` and calls the collectives in `ParallelContext`,
which are no-ops for axes the strategy does not use.

| strategy       | attention              | experts                     | collectives per MoE layer               |
|----------------|------------------------|-----------------------------|-----------------------------------------|
| `tp`           | TP over node x gpu     | TP over node x gpu          | all-reduce (attn), all-reduce (MoE)     |
| `ep`           | TP over gpu, DP node   | EP over node x gpu          | all-reduce gpu, all-to-all node x gpu   |
| `dp_ep`        | DP over node x gpu     | EP over node x gpu          | all-to-all node x gpu                   |
| `hybrid`       | TP over gpu, DP node   | TP over gpu, EP over node   | all-reduce gpu, all-to-all node         |
| `hybrid_fused` | as `hybrid`            | as `hybrid`                 | chunked RS gpu -> A2A node -> AG gpu    |
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax import lax

NODE, GPU = "node", "gpu"
AXES = (NODE, GPU)


@dataclasses.dataclass(frozen=True)
class Strategy:
    name: str
    attn_tp: tuple[str, ...]  # axes that split attention heads, the vocabulary and dense MLPs
    attn_dp: tuple[str, ...]  # axes that split the batch for attention
    moe_tp: tuple[str, ...]  # axes that split each expert's FFN width
    moe_ep: tuple[str, ...]  # axes that split the set of experts
    fused: bool = False  # fused AR-A2A (hybrid only)
    description: str = ""


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in [
        Strategy("tp", (NODE, GPU), (), (NODE, GPU), (), description="pure tensor parallelism over all devices"),
        Strategy("ep", (GPU,), (NODE,), (), (NODE, GPU),
                 description="attention TP inside a node; experts spread over all devices (all-to-all)"),
        Strategy("dp_ep", (), (NODE, GPU), (), (NODE, GPU),
                 description="data-parallel attention; experts spread over all devices (DeepSeek/SGLang layout)"),
        Strategy("hybrid", (GPU,), (NODE,), (GPU,), (NODE,),
                 description="MixServe: TP inside a node, EP across nodes; all-reduce then all-to-all"),
        Strategy("hybrid_fused", (GPU,), (NODE,), (GPU,), (NODE,), fused=True,
                 description="MixServe with the fused, chunked reduce-scatter / all-to-all / all-gather"),
    ]
}

DEFAULT_STRATEGY = "hybrid_fused"


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)} or 'auto'")
    return STRATEGIES[name]


# Logical axes of weights, caches and activations -> the strategy's mesh axes.
def logical_to_mesh(strategy: Strategy) -> dict[str, tuple[str, ...] | None]:
    return {
        "vocab": strategy.attn_tp,
        "heads": strategy.attn_tp,
        "kv_heads": strategy.attn_tp,
        "mlp": strategy.attn_tp,
        "experts": strategy.moe_ep,
        "expert_mlp": strategy.moe_tp,
        "batch": strategy.attn_dp,
    }


def spec_for(axes: tuple[str | None, ...], strategy: Strategy):
    """PartitionSpec for an array whose dimensions carry the given logical axis names."""
    rules = logical_to_mesh(strategy)
    parts = []
    for a in axes:
        mesh_axes = rules.get(a) if a is not None else None
        parts.append(tuple(mesh_axes) if mesh_axes else None)
    return jax.sharding.PartitionSpec(*parts)


@dataclasses.dataclass(frozen=True)
class ParallelContext:
    """What the per-device (local-view) model code needs to know inside `shard_map`."""

    strategy: Strategy
    axis_sizes: tuple[tuple[str, int], ...]  # (("node", n), ("gpu", g))
    fused_chunks: int = 2
    capacity_factor: float | None = None  # None: exact, no token can be dropped
    expert_impl: str = "dense"  # "dense" | "grouped" | "grouped-interpret" (see layers.Experts)
    # Every row of the call starts at position 0 (a whole prompt, or its first chunk), known when compiling: prefill
    # attention then runs over the chunk's own keys (cuDNN on GPU) without a run-time test of the positions.
    fresh_prompt: bool = False

    @property
    def pallas(self) -> str | None:
        """Whether the Pallas kernels run: None (XLA only), "gpu" or "interpret". They come with the grouped
        expert implementation: grouped experts and flash attention for prefill (mixjax.kernels)."""
        return {"grouped": "gpu", "grouped-interpret": "interpret"}.get(self.expert_impl)

    def size(self, axes: tuple[str, ...]) -> int:
        sizes = dict(self.axis_sizes)
        return math.prod(sizes[a] for a in axes)

    @property
    def attn_tp_size(self) -> int:
        return self.size(self.strategy.attn_tp)

    @property
    def moe_ep_size(self) -> int:
        return self.size(self.strategy.moe_ep)

    # Collectives over the tensor-parallel group of attention / dense MLPs.
    def psum_attn_tp(self, x):
        return lax.psum(x, self.strategy.attn_tp) if self.strategy.attn_tp else x

    def attn_tp_index(self):
        return _linear_index(self.strategy.attn_tp, dict(self.axis_sizes))


def _linear_index(axes: tuple[str, ...], sizes: dict[str, int]):
    """This device's index in the flattened group `axes` (row-major, as PartitionSpec orders it)."""
    idx = 0
    for a in axes:
        idx = idx * sizes[a] + lax.axis_index(a)
    return idx
