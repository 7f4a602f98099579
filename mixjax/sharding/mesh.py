"""The (node, gpu) device mesh, and the checks that a model can be laid out on it by a strategy."""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from mixjax.sharding.strategies import AXES, Strategy


class LayoutError(ValueError):
    """The mesh shape and strategy cannot hold this model (raised before anything compiles)."""


def parse_mesh_shape(shape) -> tuple[int, int]:
    if isinstance(shape, str):
        m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", shape)
        if not m:
            raise LayoutError(f"mesh {shape!r} is not of the form NODExGPU, e.g. '2x4'")
        shape = (int(m.group(1)), int(m.group(2)))
    nodes, gpus = (int(v) for v in shape)
    if nodes < 1 or gpus < 1:
        raise LayoutError(f"mesh {nodes}x{gpus} must have at least one node and one GPU")
    return nodes, gpus


def make_mesh(shape="1x1", devices=None) -> Mesh:
    """A mesh with axes ("node", "gpu"). On several processes each node is one host (process), so that the `gpu`
    axis stays inside a host and `node` crosses the network."""
    nodes, gpus = parse_mesh_shape(shape)
    devices = list(devices if devices is not None else jax.devices())
    want = nodes * gpus
    if jax.process_count() > 1:
        per_host: dict[int, list] = {}
        for d in devices:
            per_host.setdefault(d.process_index, []).append(d)
        if nodes != len(per_host) or any(len(v) < gpus for v in per_host.values()):
            fit = min(len(v) for v in per_host.values())
            raise LayoutError(f"mesh {nodes}x{gpus} does not fit {len(per_host)} processes with "
                              f"{sorted(len(v) for v in per_host.values())} devices each: on several processes the "
                              f"mesh has one node per process (e.g. {len(per_host)}x{fit})")
        grid = [sorted(per_host[p], key=lambda d: d.id)[:gpus] for p in sorted(per_host)]
    else:
        if want > len(devices) or len(devices) % want:
            raise LayoutError(f"mesh {nodes}x{gpus} needs {want} devices, which must divide the "
                              f"{len(devices)} devices available")
        grid = np.array(devices[:want]).reshape(nodes, gpus)
    return Mesh(np.array(grid), AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def mesh_sizes(mesh: Mesh) -> tuple[tuple[str, int], ...]:
    return tuple((a, mesh.shape[a]) for a in AXES)


def check_layout(cfg, mesh: Mesh, strategy: Strategy) -> None:
    """Raise LayoutError naming every dimension the strategy cannot split evenly on this mesh."""
    sizes = dict(mesh_sizes(mesh))

    def size(axes):
        return int(np.prod([sizes[a] for a in axes])) if axes else 1

    tp, ep, mtp = size(strategy.attn_tp), size(strategy.moe_ep), size(strategy.moe_tp)
    where = f"strategy {strategy.name!r} on mesh {sizes['node']}x{sizes['gpu']}"
    problems = []
    if cfg.attention_heads % tp:
        problems.append(f"{cfg.attention_heads} attention heads do not split over attention TP degree {tp}")
    kv = cfg.num_key_value_heads
    if kv > 1 and (kv % tp if tp <= kv else tp % kv):
        problems.append(f"{kv} KV heads do not fit attention TP degree {tp} (divide it or be divided by it)")
    dense = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)]
    if dense and cfg.intermediate_size % tp:
        problems.append(f"dense MLP width {cfg.intermediate_size} does not split over TP degree {tp}")
    if cfg.num_shared_experts and (cfg.moe_intermediate_size * cfg.num_shared_experts) % tp:
        problems.append(f"shared-expert width {cfg.moe_intermediate_size * cfg.num_shared_experts} does not split "
                        f"over TP degree {tp}")
    if len(dense) < cfg.num_hidden_layers:
        if cfg.num_experts % ep:
            problems.append(f"{cfg.num_experts} experts do not split over EP degree {ep}")
        if cfg.moe_intermediate_size % mtp:
            problems.append(f"expert FFN width {cfg.moe_intermediate_size} does not split over expert TP degree {mtp}")
    if problems:
        raise LayoutError(f"{where} cannot hold this model: " + "; ".join(problems))
