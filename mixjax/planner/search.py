"""Enumerate (mesh shape, strategy) plans, score them with the cost model, rank by an objective."""

from __future__ import annotations

import math

from mixjax.planner.cost import WORKLOADS, Plan, Workload, evaluate
from mixjax.planner.presets import ClusterSpec, cluster_preset
from mixjax.sharding.strategies import STRATEGIES

OBJECTIVES = ("ttft", "itl", "throughput", "slo")


def mesh_shapes(cl: ClusterSpec, sub_meshes: bool = False) -> list[tuple[int, int]]:
    """The cluster's own (nodes, gpus_per_node); with sub_meshes also fewer nodes and divisors of the GPUs."""
    if not sub_meshes:
        return [(cl.nodes, cl.gpus_per_node)]
    gs = [g for g in range(1, cl.gpus_per_node + 1) if cl.gpus_per_node % g == 0]
    return [(n, g) for n in range(cl.nodes, 0, -1) for g in sorted(gs, reverse=True)]


def _key(objective: str, itl_slo: float | None):
    def key(p: Plan):
        if not p.feasible:
            return (1, 0.0)
        if objective == "ttft":
            return (0, p.ttft)
        if objective == "itl":
            return (0, p.itl)
        if objective == "throughput":
            return (0, -p.throughput)
        if objective == "slo":
            meets = itl_slo is None or p.itl <= itl_slo
            return (0 if meets else 0.5, -p.throughput if meets else p.itl)
        raise ValueError(f"objective must be one of {OBJECTIVES}")
    return key


def rank_plans(cfg, cl: ClusterSpec, wl: Workload, objective: str = "throughput", *, itl_slo: float | None = None,
               wbytes: float = 2.0, strategies=None, sub_meshes: bool = False, chunks: int = 0) -> list[Plan]:
    plans = []
    for nodes, gpus in mesh_shapes(cl, sub_meshes):
        for name in strategies or STRATEGIES:
            plans.append(evaluate(cfg, cl, STRATEGIES[name], nodes, gpus, wl, wbytes=wbytes, chunks=chunks))
    return sorted(plans, key=_key(objective, itl_slo))


def auto_plan(cfg, mesh, cluster: str = "h800-roce", workload: str = "decode",
              objective: str = "throughput") -> tuple[str, str]:
    """Strategy for mixjax.LLM(strategy="auto") on a given jax Mesh: the best plan (uncalibrated cost model,
    nameplate numbers of `cluster` with the mesh's own shape) among those check_layout admits."""
    nodes, gpus = int(mesh.shape["node"]), int(mesh.shape["gpu"])
    cl = cluster_preset(cluster, nodes, gpus)
    wl = WORKLOADS[workload]
    plans = [p for p in rank_plans(cfg, cl, wl, objective) if not p.reason.startswith("layout")]
    if not plans:
        from mixjax.sharding.mesh import LayoutError  # noqa: PLC0415
        raise LayoutError(f"no strategy can lay this model out on mesh {nodes}x{gpus}")
    best = plans[0]
    note = "" if best.feasible else f"; warning: {best.reason}"
    other = next((p for p in plans[1:] if p.feasible and math.isfinite(p.itl)), None)
    vs = ""
    if other is not None and best.throughput > 0:
        vs = f", {best.throughput / other.throughput:.2f}x the throughput of {other.strategy}"
    return best.strategy, (f"planner ({objective}, uncalibrated {cluster} numbers, {wl.name} workload "
                           f"batch {wl.batch} prompt {wl.prompt} output {wl.output}): predicted ITL "
                           f"{best.itl * 1e3:.2f} ms{vs}{note}")
