"""Cost-model planner: picks a parallel strategy and mesh from model shapes and cluster numbers (nameplate presets
or a calibration profile of the current devices), and validates its predictions against measured steps."""

from mixjax.planner.cost import WORKLOADS, Plan, Workload, evaluate, impl_step_cost, step_cost
from mixjax.planner.presets import CLUSTER_PRESETS, MODEL_PRESETS, ClusterSpec, cluster_preset, model_preset
from mixjax.planner.search import auto_plan, rank_plans

__all__ = ["CLUSTER_PRESETS", "MODEL_PRESETS", "WORKLOADS", "ClusterSpec", "Plan", "Workload", "auto_plan",
           "cluster_preset", "evaluate", "impl_step_cost", "model_preset", "rank_plans", "step_cost"]
