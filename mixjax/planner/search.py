"""Enumerate (mesh shape, strategy) plans, score them with the cost model, rank by an objective."""

from __future__ import annotations

import math

from mixjax.planner.cost import WORKLOADS, Plan, Workload, evaluate
from mixjax.planner.presets import ClusterSpec
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
               wbytes: float = 2.0, strategies=None, sub_meshes: bool = False, chunks: int = 0,
               impl: str = "ideal", abytes: float = 2.0, **model_kw) -> list[Plan]:
    plans = []
    for nodes, gpus in mesh_shapes(cl, sub_meshes):
        for name in strategies or STRATEGIES:
            plans.append(evaluate(cfg, cl, STRATEGIES[name], nodes, gpus, wl, wbytes=wbytes, abytes=abytes,
                                  chunks=chunks, impl=impl, **model_kw))
    return sorted(plans, key=_key(objective, itl_slo))


def auto_plan(cfg, mesh, cluster: str | ClusterSpec | None = None, workload: str | Workload = "decode",
              objective: str = "throughput", impl: str = "mixjax", wbytes: float = 2.0,
              expert_impl: str = "auto") -> tuple[str, str]:
    """Strategy for mixjax.LLM(strategy="auto") on a given jax Mesh: the best plan among those check_layout
    admits, scored in `impl` mode ("mixjax": this implementation's buffers and expert path).

    cluster: None -> the current devices (their calibration profile if one exists, else a built-in estimate,
    see mixjax.planner.calibrate.current_cluster), a preset name, 'profile:PATH', or a ClusterSpec. The reason
    says which numbers were used. expert_impl: "auto" -> what ShardedModel picks on the mesh's devices (on a
    mesh without devices, the cluster platform's default)."""
    from mixjax.planner.calibrate import current_cluster, resolve_cluster  # noqa: PLC0415

    nodes, gpus = int(mesh.shape["node"]), int(mesh.shape["gpu"])
    if cluster is None:
        cl = current_cluster(nodes, gpus)
    elif isinstance(cluster, ClusterSpec):
        cl = cluster.with_shape(nodes, gpus)
    else:
        cl = resolve_cluster(cluster, nodes, gpus)
    wl = WORKLOADS[workload] if isinstance(workload, str) else workload
    if expert_impl == "auto" and getattr(mesh, "devices", None) is not None:
        from mixjax.sharding.runner import resolve_expert_impl  # noqa: PLC0415

        expert_impl = resolve_expert_impl("auto", mesh)
    kw = {"expert_impl": expert_impl} if impl == "mixjax" else {}
    plans = [p for p in rank_plans(cfg, cl, wl, objective, wbytes=wbytes, impl=impl, abytes=wbytes, **kw)
             if not p.reason.startswith("layout")]
    if not plans:
        from mixjax.sharding.mesh import LayoutError  # noqa: PLC0415
        raise LayoutError(f"no strategy can lay this model out on mesh {nodes}x{gpus}")
    best = plans[0]
    note = "" if best.feasible else f"; warning: {best.reason}"
    if nodes * gpus == 1:
        vs = "; one device: no collectives, the strategies differ only in dispatch bookkeeping"
    else:
        other = next((p for p in plans[1:] if p.feasible and math.isfinite(p.itl)), None)
        vs = ""
        if other is not None and best.throughput > 0:
            vs = f", {best.throughput / other.throughput:.2f}x the throughput of {other.strategy}"
    return best.strategy, (f"planner ({objective}, {impl} mode, {wl.name} workload batch {wl.batch} prompt "
                           f"{wl.prompt} output {wl.output}; hardware: {cl.source}): predicted ITL "
                           f"{best.itl * 1e3:.3g} ms{vs}{note}")
