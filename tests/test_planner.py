"""Planner cost model: hand-computed cases, feasibility, auto_plan, CLI smoke. Pure arithmetic, no compiles."""

import json
import math
import subprocess
import sys

import pytest

from mixjax.planner import auto_plan, cluster_preset, evaluate, model_preset, rank_plans
from mixjax.planner.cost import (WORKLOADS, Workload, all_gather, all_reduce, all_to_all, fused_pipeline,
                                 imbalance, link, reduce_scatter, step_cost, touched_experts)
from mixjax.sharding.strategies import STRATEGIES


def test_collective_formulas_by_hand():
    S, alpha, beta = 8e6, 1e-5, 1e9
    assert all_reduce(S, 4, alpha, beta) == pytest.approx(6 * 1e-5 + 1.5 * 8e6 / 1e9)
    assert reduce_scatter(S, 4, alpha, beta) == pytest.approx(3e-5 + 0.75 * 8e-3)
    assert all_gather(S, 8, alpha, beta) == pytest.approx(7e-5 + 7 / 8 * 8e-3)
    assert all_to_all(S, 2, alpha, beta) == pytest.approx(1e-5 + 0.5 * 8e-3)
    assert all_reduce(S, 1, alpha, beta) == 0.0


def test_links():
    cl = cluster_preset("h800-roce", 2, 8)
    sizes = {"node": 2, "gpu": 8}
    assert link(("gpu",), cl, sizes) == (cl.intra_alpha, cl.intra_bw)
    assert link(("node", "gpu"), cl, sizes) == (cl.inter_alpha, cl.inter_bw)  # spans nodes: network-limited
    assert link(("node", "gpu"), cl, {"node": 1, "gpu": 8}) == (cl.intra_alpha, cl.intra_bw)


def test_fused_pipeline():
    # 2 chunks, intra 1+1 per chunk, inter 3 per chunk: max(4, 6) + min(4, 6)/2
    assert fused_pipeline([1.0, 1.0], [3.0], 2) == pytest.approx(8.0)
    assert fused_pipeline([1.0], [2.0], 1) == pytest.approx(3.0)  # one chunk: no overlap


def test_touched_experts():
    assert touched_experts(256, 8, 1) == pytest.approx(8)
    assert touched_experts(128, 8, 10_000) == pytest.approx(128)
    assert touched_experts(128, 8, 4) < 32


def test_imbalance():
    assert imbalance(1000, 1) == 1.0
    assert imbalance(100, 16) > imbalance(100_000, 16) > 1.0


def test_memory_rejection_mentions_memory():
    cfg, _ = model_preset("deepseek-r1")
    cl = cluster_preset("h800-roce", 1, 8)
    p = evaluate(cfg, cl, STRATEGIES["tp"], 1, 8, WORKLOADS["decode"], wbytes=2.0)  # 1.34 TB bf16 on 8x80 GB
    assert not p.feasible and "memory" in p.reason


def test_layout_rejection():
    cfg, _ = model_preset("qwen3-235b-a22b")
    cl = cluster_preset("h800-roce", 3, 8)  # 128 experts do not split over 3 nodes
    p = evaluate(cfg, cl, STRATEGIES["hybrid"], 3, 8, WORKLOADS["decode"])
    assert not p.feasible and p.reason.startswith("layout")


@pytest.mark.parametrize("model", ["deepseek-r1", "qwen3-235b-a22b"])
@pytest.mark.parametrize("nodes", [2, 4])
@pytest.mark.parametrize("phase,tokens", [("prefill", 16 * 4096), ("decode", 64), ("decode", 1)])
def test_fused_inter_bytes_never_exceed_hybrid(model, nodes, phase, tokens):
    cfg, wb = model_preset(model)
    cl = cluster_preset("h800-roce", nodes, 8)
    seqs = 16 if phase == "prefill" else tokens
    kw = dict(cfg=cfg, cl=cl, nodes=nodes, gpus=8, tokens=tokens, seqs=seqs, ctx=1024, phase=phase, wbytes=wb)
    f = step_cost(strategy=STRATEGIES["hybrid_fused"], **kw)
    h = step_cost(strategy=STRATEGIES["hybrid"], **kw)
    assert f["inter_bytes_per_gpu_per_layer"] <= h["inter_bytes_per_gpu_per_layer"]
    assert f["inter_bytes_per_gpu_per_layer"] == pytest.approx(h["inter_bytes_per_gpu_per_layer"] / 8)


def test_rank_plans_sorted_and_complete():
    cfg, wb = model_preset("qwen3-30b-a3b")
    plans = rank_plans(cfg, cluster_preset("h100-ib", 2, 8), Workload(8, 512, 64), "itl", wbytes=wb)
    assert {p.strategy for p in plans} == set(STRATEGIES)
    itls = [p.itl for p in plans if p.feasible]
    assert itls == sorted(itls)
    slo = rank_plans(cfg, cluster_preset("h100-ib", 2, 8), Workload(8, 512, 64), "slo", itl_slo=1e-9, wbytes=wb)
    assert slo[0].feasible  # nothing meets an impossible SLO: falls back to lowest ITL


class _Mesh:
    def __init__(self, n, g):
        self.shape = {"node": n, "gpu": g}


@pytest.mark.parametrize("shape", [(1, 1), (1, 8), (2, 4), (2, 8), (4, 8)])
def test_auto_plan_passes_check_layout(shape):
    from mixjax.sharding.mesh import check_layout

    cfg, _ = model_preset("qwen3-235b-a22b")
    name, reason = auto_plan(cfg, _Mesh(*shape))
    check_layout(cfg, _Mesh(*shape), STRATEGIES[name])
    assert name in STRATEGIES and "\n" not in reason and reason


def test_auto_plan_real_mesh_and_llm_hook():
    from mixjax.llm import choose_strategy
    from mixjax.sharding.mesh import check_layout, make_mesh

    mesh = make_mesh("2x4")
    cfg, _ = model_preset("qwen3-30b-a3b")
    name, reason = choose_strategy(cfg, mesh)
    check_layout(cfg, mesh, STRATEGIES[name])
    assert reason.startswith("planner")


def test_cli_json():
    out = subprocess.run([sys.executable, "-m", "mixjax.plan", "--model", "deepseek-r1", "--cluster", "h800-roce",
                          "--nodes", "2", "--gpus-per-node", "8", "--workload", "decode", "--json"],
                         capture_output=True, text=True, check=True)
    d = json.loads(out.stdout)
    assert d["calibrated"] is False and d["chosen"]["feasible"]
    assert len(d["plans"]) == 5 and all(math.isfinite(p["mem_per_device"]) for p in d["plans"])


def test_cli_table():
    out = subprocess.run([sys.executable, "-m", "mixjax.plan", "--model", "qwen3-235b-a22b", "--nodes", "4",
                          "--workload", "prefill", "--objective", "throughput"], capture_output=True, text=True,
                         check=True)
    assert "chosen:" in out.stdout and "UNCALIBRATED" in out.stdout
