"""How `--strategy auto` picks the parallel layout. One function, so that the planner can replace it."""

from __future__ import annotations

import jax

from mixjax.sharding.mesh import make_mesh, parse_mesh_shape


def choose_plan(cfg, mesh_shape: str | None = None, strategy: str = "auto", devices=None):
    """-> (mesh_shape "NxG", strategy name, reason).

    Mesh: the one asked for, else 1x1 on CPU and 1 x (all local devices) on accelerators; on several processes
    (hosts), one node per process: (processes) x (devices per process).
    Strategy "auto": for now the default strategy (mixjax.sharding.strategies.DEFAULT_STRATEGY) if the mesh
    admits it, else the next one that does (mixjax.llm.choose_strategy; it defers to mixjax.planner when that
    exists)."""
    from mixjax.llm import choose_strategy  # noqa: PLC0415

    devices = list(devices if devices is not None else jax.devices())
    if mesh_shape is None and jax.process_count() > 1:
        mesh_shape = f"{jax.process_count()}x{jax.local_device_count()}"
        mesh_why = f"default mesh ({jax.process_count()} processes x {jax.local_device_count()} local devices)"
    elif mesh_shape is None:
        on_cpu = devices[0].platform == "cpu"
        mesh_shape = "1x1" if on_cpu else f"1x{len(devices)}"
        mesh_why = "default mesh (" + ("CPU" if on_cpu else f"{len(devices)} local devices") + ")"
    else:
        mesh_why = "mesh given on the command line"
    nodes, gpus = parse_mesh_shape(mesh_shape)
    mesh_shape = f"{nodes}x{gpus}"
    if strategy != "auto":
        return mesh_shape, strategy, f"{mesh_why}; strategy given on the command line"
    name, why = choose_strategy(cfg, make_mesh(mesh_shape, devices))
    return mesh_shape, name, f"{mesh_why}; auto strategy: {why}"
