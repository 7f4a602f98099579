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


# ---------------------------------------------------------------- calibration, current devices, validation
import os  # noqa: E402

from mixjax.planner import calibrate as C  # noqa: E402
from mixjax.planner.cost import coll_time, impl_step_cost  # noqa: E402
from mixjax.planner.presets import ClusterSpec  # noqa: E402


@pytest.fixture(autouse=True)
def _private_profile_cache(tmp_path, monkeypatch):
    """Never read or write the user's ~/.cache/mixjax profiles from tests."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MIXJAX_PROFILE", raising=False)


def _cluster(**kw):
    base = dict(name="t", nodes=2, gpus_per_node=4, hbm_bytes=80e9, hbm_bw=1e12, peak_flops=1e15,
                intra_bw=100e9, intra_alpha=2e-6, inter_bw=10e9, inter_alpha=10e-6)
    return ClusterSpec(**{**base, **kw})


def test_coll_time_one_link_and_hierarchical_by_hand():
    cl = _cluster()
    sizes = {"node": 2, "gpu": 4}
    S = 8e6
    # one link: ring formulas with that link's numbers
    assert coll_time(cl, "all_reduce", S, ("gpu",), sizes) == pytest.approx(6 * 2e-6 + 1.5 * S / 100e9)
    assert coll_time(cl, "all_to_all", S, ("node",), sizes) == pytest.approx(1e-5 + 0.5 * S / 10e9)
    # both axes, two-level: RS_gpu(S) + AR_node(S/4) + AG_gpu(S)
    rs = 3 * 2e-6 + 0.75 * S / 100e9
    ar = 2 * 10e-6 + 1.0 * (S / 4) / 10e9
    assert coll_time(cl, "all_reduce", S, ("node", "gpu"), sizes) == pytest.approx(rs + ar + rs)
    # flat ring over 8 ranks at the network's numbers (first version of the model)
    assert coll_time(cl, "all_reduce", S, ("node", "gpu"), sizes, hierarchical=False) == pytest.approx(
        14 * 10e-6 + 2 * 7 / 8 * S / 10e9)
    # all-to-all over both: the slower of the intra part and the inter part
    intra = 3 * 2e-6 + 3 / 8 * S / 100e9
    inter = 4 * 10e-6 + 4 / 8 * S / 10e9
    assert coll_time(cl, "all_to_all", S, ("node", "gpu"), sizes) == pytest.approx(max(intra, inter))
    assert coll_time(cl, "all_reduce", S, ("node", "gpu"), {"node": 1, "gpu": 1}) == 0.0


def test_calibrated_fits_replace_link_numbers():
    fit = {"alpha": 1e-4, "bw": 1e9}
    fits = {link: {k: dict(fit) for k in C.COLLECTIVES} for link in ("intra", "inter", "world")}
    cl = _cluster(collectives=fits, calib_mesh=(2, 4))
    sizes = {"node": 2, "gpu": 4}
    assert coll_time(cl, "all_gather", 1e6, ("gpu",), sizes) == pytest.approx(3e-4 + 0.75 * 1e6 / 1e9)
    # world fit used on the calibrated mesh only; elsewhere the two-level composition of the link fits
    assert coll_time(cl, "all_gather", 1e6, ("node", "gpu"), sizes) == pytest.approx(7e-4 + 7 / 8 * 1e6 / 1e9)
    other = {"node": 4, "gpu": 2}
    assert coll_time(cl, "all_gather", 1e6, ("node", "gpu"), other) == pytest.approx(
        (3e-4 + 0.75 * 0.5e6 / 1e9) + (1e-4 + 0.5 * 1e6 / 1e9))


def test_matmul_width_rate_and_roofline_by_hand():
    from mixjax.planner.cost import _mm_rate

    assert _mm_rate(_cluster(), 8) == 1e15  # no calibrated width effect: peak
    cl = _cluster(mm_half_width=24.0)
    assert _mm_rate(cl, 8) == pytest.approx(1e15 * 8 / 32)
    # ideal-mode LM head roofline: last position of each sequence, TP over the attention group
    cfg, _ = model_preset("qwen3-30b-a3b")
    r = step_cost(cfg, _cluster(), STRATEGIES["hybrid"], 2, 4, tokens=64, seqs=64, ctx=128, phase="decode",
                  wbytes=2.0)
    head = cfg.vocab_size * cfg.hidden_size
    assert r["lm_head"] == pytest.approx(max(2 * head / 4 * 32 / 1e15, head / 4 * 2.0 / 1e12))


def test_fused_pipeline_c_chunks():
    # c chunks of intra t_i and inter t_x per chunk: max(c t_i, c t_x) + min(c t_i, c t_x) / c
    for c in (1, 2, 4, 8):
        assert fused_pipeline([1.0, 0.5], [2.0], c) == pytest.approx(max(1.5 * c, 2.0 * c) + min(1.5 * c, 2.0 * c) / c)


def test_mixjax_mode_padded_buffers_and_rejections():
    from mixjax.sharding.dispatch import dispatch_bytes

    cfg, _ = model_preset("qwen3-30b-a3b")
    cl = _cluster()
    kw = dict(cfg=cfg, cl=cl, nodes=2, gpus=4, batch=64, seq=1, cache_len=128, wbytes=2, abytes=2)
    r = impl_step_cost(strategy=STRATEGIES["dp_ep"], **kw)
    parts = r["moe_layer_parts"]["comm"]
    b = dispatch_bytes(64 // 8, cfg.hidden_size, cfg.num_experts, cfg.top_k, 8, 2)
    # the dispatch all-to-all moves dispatch_bytes' padded buffer (tokens part; the gates go separately)
    assert parts["dispatch_a2a"] == pytest.approx(coll_time(cl, "all_to_all", b["combine"], ("node", "gpu"),
                                                            {"node": 2, "gpu": 4}))
    assert r["overhead"] == 0.0 and impl_step_cost(strategy=STRATEGIES["tp"], kernels=100, **kw)["overhead"] == \
        pytest.approx(cl.step_overhead + 100 * cl.op_overhead)
    p = evaluate(cfg, cl, STRATEGIES["dp_ep"], 2, 4, Workload(batch=6, prompt=16, output=4), impl="mixjax")
    assert not p.feasible and p.reason.startswith("layout") and "data-parallel" in p.reason


def test_fit_recovers_alpha_beta():
    alpha, bw = 7e-6, 40e9
    for kind, p in (("all_reduce", 4), ("all_to_all", 8), ("all_gather", 2)):
        sizes = [2.0 ** i for i in range(10, 28, 2)]
        times = [C.predict(kind, p, s, alpha, bw) for s in sizes]
        f = C.fit_alpha_beta(kind, p, sizes, times)
        assert f["alpha"] == pytest.approx(alpha, rel=1e-6) and f["bw"] == pytest.approx(bw, rel=1e-6)
    samples = [(2.0 * 1024 * 256 * w, w, 2.0 * 1024 * 256 * w / (3e10 * w / (w + 20))) for w in (8, 32, 128, 512)]
    f = C.fit_matmul(samples)
    assert f["peak"] == pytest.approx(3e10, rel=1e-6) and f["half_width"] == pytest.approx(20, rel=1e-6)


def _synthetic_profile(platform="cpu", kind="cpu", n=8, mesh="2x4"):
    fits = {link: {"axes": [], "p": 4, **{k: {"alpha": 1e-5, "bw": 2e9, "rel_rms": 0.1, "samples": [[1, 1e-5]]}
                                          for k in C.COLLECTIVES}} for link in ("intra", "inter")}
    return {"schema": C.PROFILE_SCHEMA, "date": "2026-01-01T00:00:00+00:00", "platform": platform,
            "device_kind": kind, "device_count": n, "mesh": mesh, "quick": True, "hbm_bytes": 2e9,
            "compute": {"matmul_flops": {"float32": 3e10}, "matmul_half_width": {"float32": 16.0},
                        "mem_bw": 5e9, "relayout_bw": 2e9, "op_overhead_s": 5e-6, "step_overhead_s": 1e-4},
            "collectives": fits}


def test_profile_round_trip_and_cluster(tmp_path):
    prof = _synthetic_profile()
    path = C.save_profile(prof, tmp_path / "p.json")
    back = C.load_profile(path)
    assert {k: v for k, v in back.items() if k != "_path"} == prof
    cl = C.cluster_from_profile(back)
    assert (cl.nodes, cl.gpus_per_node, cl.calib_mesh) == (2, 4, (2, 4))
    assert cl.peak_flops == 3e10 and cl.mm_half_width == 16 and cl.hbm_bw == 5e9 and cl.relayout_bw == 2e9
    assert cl.coll_params("inter", "all_to_all") == (1e-5, 2e9)
    assert cl.source.startswith("calibrated profile") and str(path) in cl.source
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(prof, schema=999)))
    with pytest.raises(ValueError, match="schema"):
        C.load_profile(bad)
    # one GPU: no links measured -> the device kind's nameplate numbers, said in the source
    one = C.cluster_from_profile(dict(_synthetic_profile("gpu", "NVIDIA H100 80GB HBM3", 1, "1x1"),
                                      collectives={}, compute=dict(prof["compute"],
                                                                   matmul_flops={"bfloat16": 7e14})))
    assert one.inter_bw == cluster_preset("h100-ib").inter_bw and "nameplate h100-ib" in one.source


def test_count_kernels():
    hlo = """HloModule m

%command_buffer (q: f32[4]) -> f32[4] {
  %q = f32[4]{0} parameter(0)
  %f1 = f32[4]{0} fusion(%q), kind=kLoop, calls=%c1
  ROOT %f2 = f32[4]{0} fusion(%f1), kind=kLoop, calls=%c2
}

ENTRY %main (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %f = f32[4]{0} fusion(%p), kind=kLoop, calls=%c
  %ar = f32[4]{0} all-reduce(%f), replica_groups={}, to_apply=%add
  %t = (f32[4]{0}, f32[4]{0}) all-to-all(%f, %ar), dimensions={0}
  %g = f32[4]{0} get-tuple-element(%t), index=0
  %cb = f32[4]{0} call(%g), to_apply=%command_buffer
  ROOT %d = f32[4]{0} dot(%cb, %cb), lhs_contracting_dims={0}, rhs_contracting_dims={0}
}
"""
    assert C.count_kernels(hlo) == {"kernels": 4, "collectives": 2}


def test_auto_plan_on_cpu_uses_current_devices(tmp_path, monkeypatch):
    import jax

    from mixjax.sharding.mesh import make_mesh

    cfg, _ = model_preset("qwen3-30b-a3b")
    name, reason = auto_plan(cfg, make_mesh("2x4"))
    assert "built-in CPU estimate" in reason and "no calibration profile" in reason and name in STRATEGIES
    n = len(jax.devices())
    path = C.default_profile_path("cpu", jax.devices()[0].device_kind, n)
    assert str(path).startswith(os.environ["XDG_CACHE_HOME"])
    C.save_profile(_synthetic_profile(n=n), path)
    name, reason = auto_plan(cfg, make_mesh("2x4"))
    assert "calibrated profile" in reason and str(path) in reason


def test_rankings_compare():
    from mixjax.planner.validate import compare_rankings, spearman

    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    rk = compare_rankings(["a", "b", "c"], [1.0, 2.0, 3.0], [1.0, 1.01, 2.0])
    assert rk["exact"] and rk["best_match"] and rk["pairs_distinguishable"] == 2  # a vs b within noise
    rk = compare_rankings(["a", "b"], [2.0, 1.0], [1.0, 2.0])
    assert not rk["exact"] and rk["pairs_disagree"] == ["a vs b"]


def test_calibrate_quick_cli(tmp_path):
    out = tmp_path / "prof.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "mixjax.plan", "calibrate", "--quick", "--out", str(out),
                        "--no-progress"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    prof = C.load_profile(out)
    assert prof["device_count"] == 8 and prof["mesh"] == "2x4" and set(prof["collectives"]) == {"intra", "inter",
                                                                                              "world"}
    for fits in prof["collectives"].values():
        for k in C.COLLECTIVES:
            assert fits[k]["alpha"] >= 0 and fits[k]["bw"] > 0 and fits[k]["samples"]
    c = prof["compute"]
    assert c["mem_bw"] > 0 and c["matmul_flops"]["float32"] > 0 and c["op_overhead_s"] >= 0
    # the second matmul sweep, narrow in rows (weights passed as arguments), on CPU
    assert [w for _, w, _ in c["matmul_rows_samples"]["float32"]] == [8, 32, 128, 256]
    assert "grouped_experts" not in c and prof["load_average"]["start"] is not None
    assert "all_reduce" in r.stdout and "profile written" in r.stdout
    cl = C.cluster_from_profile(prof)
    assert cl.source.startswith("calibrated") and math.isfinite(cl.peak_flops)


def test_validate_smoke():
    """One strategy, one phase, one mesh, a one-layer tiny model, a synthetic profile: the report's shape."""
    import tempfile

    from mixjax.planner.validate import validate

    with tempfile.TemporaryDirectory() as d:
        p = C.save_profile(_synthetic_profile(), os.path.join(d, "p.json"))
        res = validate(model="tiny", layers=1, meshes=["2x4"], batch=8, ctx=16, phases=("decode",),
                       strategies=["hybrid", "tp"], iters=2, rounds=1, profile=str(p), progress=False)
    assert len(res["rows"]) == 2 and res["rankings"][0]["mesh"] == "2x4"
    row = res["rows"][0]
    assert row["measured_s"] > 0 and row["predicted_s"] > 0 and row["kernels"] > 0
    assert math.isfinite(row["rel_err"])


# ---------------------------------------------------------------- grouped experts and flash attention (mixjax mode)
def test_grouped_expert_cost_by_hand():
    from mixjax.planner.cost import expected_blocks, grouped_expert_cost

    # k = E: every token picks every expert, 40 rows each. choose_blocks(40 * 4 pairs, 4 experts): 40 rows per
    # expert -> BM 32, ceil(40 / 32) = 2 blocks per expert: 8 blocks, 256 padded rows
    g = grouped_expert_cost(d=64, f_l=32, e_l=4, num_experts=4, top_k=4, rows=40, tokens=40, wbytes=2, abytes=2)
    assert (g["bm"], g["blocks"], g["padded_rows"], g["touched"]) == (32, 8, 256, 4)
    assert g["flops"] == 2 * 3 * 64 * 32 * 256  # gate, up, down on every padded row
    assert g["weight_bytes"] == 8 * 3 * 64 * 32 * 2  # each expert's weights once per row block
    # 34 tokens, top-1 of 4 experts (sorted layout): c ~ Binomial(34, 1/4) per expert, BM 16;
    # E[ceil(c / 16)] = P(c > 0) + P(c > 16) + P(c > 32)
    g = grouped_expert_cost(d=64, f_l=32, e_l=4, num_experts=4, top_k=1, rows=34, tokens=34, wbytes=2, abytes=2)
    pmf = [math.comb(34, c) * 0.25 ** c * 0.75 ** (34 - c) for c in range(35)]
    per_expert = 1 - pmf[0] + sum(pmf[17:]) + sum(pmf[33:])
    assert g["bm"] == 16 and g["blocks"] == pytest.approx(4 * per_expert) and g["padded_rows"] == pytest.approx(
        64 * per_expert)
    # 20 tokens, top-1 of 2 experts (expert layout: rows fit a 32-row block): a block per touched expert
    g = grouped_expert_cost(d=64, f_l=32, e_l=2, num_experts=2, top_k=1, rows=20, tokens=20, wbytes=2, abytes=2)
    assert g["bm"] == 32 and g["blocks"] == pytest.approx(2 * (1 - 0.5 ** 20)) == pytest.approx(g["touched"])
    # 2 tokens, top-1 of 2 experts: 2 pairs, a block each (pair layout, no sort), whether or not they share an expert
    g = grouped_expert_cost(d=64, f_l=32, e_l=2, num_experts=2, top_k=1, rows=2, tokens=2, wbytes=2, abytes=2)
    assert g["bm"] == 16 and g["blocks"] == pytest.approx(2) and g["padded_rows"] == pytest.approx(32)
    assert g["touched"] == pytest.approx(1.5)  # 2 (1 - (1/2)^2)
    # E[ceil(c / 2)], c ~ Binomial(3, 1/2): P(1) 3/8 * 1 + P(2) 3/8 * 1 + P(3) 1/8 * 2
    assert expected_blocks(3, 0.5, 2) == pytest.approx(3 / 8 + 3 / 8 + 2 / 8)
    # an FFN slice too narrow for the kernels' tiles: mixjax falls back to the dense path
    assert grouped_expert_cost(d=64, f_l=24, e_l=2, num_experts=2, top_k=1, rows=2, tokens=2, wbytes=2,
                               abytes=2) is None


def test_flash_attention_keys_by_hand():
    from mixjax.planner.cost import flash_attention_work

    # 128 queries from position 0 over a 128-slot cache, tiles 64 x 64: tile 0 reads 64 keys, tile 1 128
    fa = flash_attention_work(seq=128, cache_len=128, start=0, head_dim=128, fresh=False)
    assert (fa["bq"], fa["bk"], fa["key_rows"], fa["keys_read"]) == (64, 64, 64 * (64 + 128), 128)
    # a 64-token chunk starting at position 64: its one tile sees all 128 slots
    assert flash_attention_work(64, 128, 64, 128, fresh=False)["key_rows"] == 64 * 128
    assert flash_attention_work(64, 120, 56, 128, fresh=False) is None  # cache not a multiple of 16: XLA


def test_gpu_prefill_cost_has_no_dense_expert_flops():
    cfg, _ = model_preset("qwen3-30b-a3b")
    gpu = cluster_preset("h200-ib", 1, 1)
    kw = dict(cfg=cfg, strategy=STRATEGIES["tp"], nodes=1, gpus=1, batch=4, seq=512, cache_len=512, wbytes=2,
              abytes=2)
    n, d, F, E = 4 * 512, cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    dense_expert_time = 2 * 3 * d * F * E * n / gpu.peak_flops  # every expert on every row, at peak
    pre = impl_step_cost(cl=gpu, **kw)
    parts = pre["moe_layer_parts"]
    assert pre["expert_impl"] == "grouped" and "experts" not in parts["compute"] and "grouped_experts" in parts["compute"]
    assert parts["attention_path"] == "cudnn"  # a whole prompt from position 0, bf16, head_dim 128
    assert pre["per_moe_layer"] < dense_expert_time / 2
    # padded rows: 2048 tokens x top-8 over 128 experts = 128 rows per expert (sd ~11) in blocks of 128: one block,
    # or two for the ~half of experts over 128 rows
    assert parts["grouped"]["bm"] == 128 and 128 * 128 < parts["grouped"]["padded_rows"] < 2 * 128 * 128
    dense = impl_step_cost(cl=gpu, expert_impl="dense", **kw)
    assert dense["moe_layer_parts"]["compute"]["experts"] >= dense_expert_time
    # the same through evaluate: GPU cluster -> grouped, CPU cluster -> dense; ideal mode untouched
    wl = Workload(batch=4, prompt=512, output=16)
    assert evaluate(cfg, gpu, STRATEGIES["tp"], 1, 1, wl, impl="mixjax").breakdown["prefill"]["expert_impl"] == \
        "grouped"
    cpu = _cluster(nodes=1, gpus_per_node=1, platform="cpu")
    assert evaluate(cfg, cpu, STRATEGIES["tp"], 1, 1, wl, impl="mixjax").breakdown["prefill"]["expert_impl"] == \
        "dense"
    assert evaluate(cfg, gpu, STRATEGIES["tp"], 1, 1, wl, expert_impl="dense").ttft == \
        evaluate(cfg, gpu, STRATEGIES["tp"], 1, 1, wl).ttft


def test_mla_prompt_cost_follows_the_attention_path():
    """DeepSeek-V3 prompts: a whole prompt on GPU takes cuDNN, a chunk mid-cache the MLA flash kernel, XLA (dense
    experts, no Pallas) the score matrix; the kernels count causal pairs only and no [B, H, T, S] scores."""
    cfg, _ = model_preset("deepseek-v3")
    gpu = cluster_preset("h200-ib", 1, 8)
    kw = dict(cfg=cfg, strategy=STRATEGIES["tp"], nodes=1, gpus=8, batch=1, seq=2048, wbytes=2, abytes=2)
    whole = impl_step_cost(cl=gpu, cache_len=2048, start=0, **kw)["moe_layer_parts"]
    chunk = impl_step_cost(cl=gpu, cache_len=4096, start=2048, **kw)["moe_layer_parts"]
    xla = impl_step_cost(cl=gpu, cache_len=2048, start=0, expert_impl="dense", **kw)["moe_layer_parts"]
    assert (whole["attention_path"], chunk["attention_path"], xla["attention_path"]) == ("cudnn", "flash", "xla")
    assert whole["compute"]["attention"] < xla["compute"]["attention"]  # XLA: scores in float32, whole t x t
    # the chunk sees twice the keys of the whole prompt's causal half: more time
    assert chunk["compute"]["attention"] > whole["compute"]["attention"]


def test_repredict_keeps_measurements():
    from mixjax.planner.validate import repredict

    prof = _synthetic_profile("gpu", "NVIDIA H200", 1, "1x1")
    prof["compute"]["matmul_flops"] = {"bfloat16": 1e15}
    row = dict(mesh="1x1", strategy="tp", phase="prefill", batch=2, seq=32, ctx=32, measured_s=1e-3,
               measured_rel_spread=0.01, predicted_s=5e-3, rel_err=4.0, kernels=50)
    res = {"model": {"name": "tiny", "layers": 1, "dtype": "bfloat16"}, "chunks": 2, "rows": [row, dict(row, strategy="ep")]}
    out = repredict(res, prof)
    r = out["rows"][0]
    assert out["expert_impl"] == "grouped" and r["measured_s"] == 1e-3 and r["predicted_before_s"] == 5e-3
    assert r["rel_err"] == pytest.approx(r["predicted_s"] / 1e-3 - 1) and r["predicted_s"] != 5e-3
    assert out["summary"]["rankings"] == 1


# ---------------------------------------------------------------- grouped-kernel probe (GPU calibration)
def test_grouped_probe_interpreted_round_trip_and_cost(tmp_path):
    """The probe runs the real grouped kernels (interpreted here, on a small shape); its per-BM rates survive
    the profile file, reach the ClusterSpec, and the grouped cost charges the kernels at them."""
    import jax.numpy as jnp

    from mixjax.planner.cost import grouped_expert_cost, grouped_rate

    ge = C.measure_grouped_experts(**C.GROUPED_PROBE_INTERPRET, dtype=jnp.float32, reps=2, interpret=True)
    assert ge["interpret"] and [s["tokens"] for s in ge["samples"]] == [8, 16, 64]  # the three layouts
    assert ge["samples"][1]["blocks"] == 8  # 16 tokens, top-2 of 8 experts: every expert touched, a block each
    for s in ge["samples"]:
        assert s["t_full_s"] > 0 and s["blocks"] > 0 and s["flops"] == 2 * 3 * 64 * 32 * s["padded_rows"]
        assert s["padded_rows"] == s["blocks"] * s["bm"]
    # synthetic rates for the cost check (interpreted timings say nothing about a GPU)
    prof = _synthetic_profile("gpu", "NVIDIA H200", 1, "1x1")
    prof["compute"] = dict(prof["compute"], matmul_flops={"bfloat16": 1e15}, matmul_half_width={"bfloat16": 200.0},
                           grouped_experts=dict(ge, rates={"16": {"flops": 1e14, "bw": 2e12},
                                                           "64": {"flops": 4e14, "bw": 3e12}}))
    back = C.load_profile(C.save_profile(prof, tmp_path / "p.json"))
    cl = C.cluster_from_profile(back)
    assert cl.grouped_rates == {16: (1e14, 2e12), 64: (4e14, 3e12)}
    assert grouped_rate(cl, 16) == (1e14, 2e12) and grouped_rate(cl, 32) == (1e14, 2e12)  # nearest, ties low
    assert grouped_rate(cl, 128) == (4e14, 3e12) and grouped_rate(cluster_preset("h200-ib", 1, 1), 16) is None
    cfg, _ = model_preset("qwen3-30b-a3b")
    kw = dict(cfg=cfg, strategy=STRATEGIES["tp"], nodes=1, gpus=1, batch=64, seq=1, cache_len=1024, wbytes=2,
              abytes=2, expert_impl="grouped")
    r = impl_step_cost(cl=cl, **kw)["moe_layer_parts"]
    g = grouped_expert_cost(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts,
                            cfg.num_experts_per_tok, 64, 64, 2, 2)
    assert g["bm"] == 16 and r["grouped_rate"]["bm"] == 16
    assert r["compute"]["grouped_experts"] == pytest.approx(max(g["flops"] / 1e14, g["kernel_bytes"] / 2e12))
    # without the probe (an older profile): the matmul width curve and the streaming bandwidth, as before
    old = C.cluster_from_profile(dict(prof, compute={k: v for k, v in prof["compute"].items()
                                                      if k != "grouped_experts"}))
    assert old.grouped_rates is None
    r_old = impl_step_cost(cl=old, **kw)["moe_layer_parts"]
    rate = 1e15 * 16 / (16 + 200.0)
    assert "grouped_rate" not in r_old and r_old["compute"]["grouped_experts"] == pytest.approx(
        max(g["flops"] / rate, g["kernel_bytes"] / old.hbm_bw))


def test_cpu_dense_experts_weight_copy_and_separate_rooflines():
    """Dense experts on a CPU cluster: the gate/up weight copy XLA:CPU makes (once per layer, also for the fused
    path's chunks), and the products and the combine priced as kernels that run one after the other."""
    cfg, _ = model_preset("qwen3-30b-a3b")
    cpu = _cluster(platform="cpu", relayout_bw=2e11)
    gpu = _cluster(platform="gpu", relayout_bw=2e11)
    kw = dict(cfg=cfg, nodes=2, gpus=4, batch=64, seq=1, cache_len=128, wbytes=2, abytes=2, expert_impl="dense")
    e_l, f_l, d = cfg.num_experts / 8, cfg.moe_intermediate_size, cfg.hidden_size
    r = impl_step_cost(cl=cpu, strategy=STRATEGIES["dp_ep"], **kw)["moe_layer_parts"]["compute"]
    assert r["expert_weight_relayout"] == pytest.approx(2 * 2 * e_l * d * f_l * 2 / 2e11)
    assert r["experts_combine"] > 0 and r["experts"] > 0
    assert impl_step_cost(cl=gpu, strategy=STRATEGIES["dp_ep"], **kw)["moe_layer_parts"]["compute"][
        "expert_weight_relayout"] == 0.0
    fused = impl_step_cost(cl=cpu, strategy=STRATEGIES["hybrid_fused"], chunks=2, **kw)["moe_layer_parts"]["compute"]
    assert fused["expert_weight_relayout"] == pytest.approx(2 * 2 * (cfg.num_experts / 2) * d * (f_l / 4) * 2 / 2e11)


def test_calibrate_skips_grouped_probe_on_cpu_by_default(monkeypatch):
    """calibrate() runs the grouped probe only on GPU unless asked (the CLI's --grouped on)."""
    called = []
    monkeypatch.setattr(C, "measure_grouped_experts", lambda **kw: called.append(kw) or {"rates": {}})
    monkeypatch.setattr(C, "measure_launch", lambda *a: {"op_overhead_s": 1e-6, "step_overhead_s": 1e-5})
    monkeypatch.setattr(C, "measure_matmul", lambda mesh, m, k, n, *a: 2.0 * m * k * n / 1e10)
    monkeypatch.setattr(C, "measure_memory_bw", lambda *a, **kw: 1e10)
    monkeypatch.setattr(C, "measure_collective", lambda mesh, kind, axes, nbytes, *a, **kw: (1e-5 + nbytes / 1e9,
                                                                                           nbytes))
    prof = C.calibrate("2x4", quick=True, progress=False)
    assert not called and "grouped_experts" not in prof["compute"] and prof["load_average"]["start"] is not None
    prof = C.calibrate("2x4", quick=True, progress=False, grouped=True)
    assert called and called[0]["interpret"] and called[0]["d_model"] == C.GROUPED_PROBE_INTERPRET["d_model"]
    assert prof["compute"]["grouped_experts"] == {"rates": {}}


def test_rankings_best_within_noise_and_cell_summary():
    from mixjax.planner.validate import _summarise, compare_rankings

    # b measured fastest by 2 %, inside a 5 % noise: predicting a fastest is not a miss within the noise
    rk = compare_rankings(["a", "b", "c"], [1.0, 1.1, 2.0], [1.02, 1.0, 2.0], [0.05, 0.05, 0.05])
    assert not rk["best_match"] and rk["best_within_noise"] and rk["pairs_distinguishable"] == 2
    rk = compare_rankings(["a", "b"], [1.0, 2.0], [2.0, 1.0], [0.01, 0.01])
    assert not rk["best_within_noise"] and rk["pairs_disagree"] == ["a vs b"]
    rows = [dict(mesh=m, phase="decode", strategy=s, measured_s=t, predicted_s=p, rel_err=p / t - 1,
                 measured_rel_spread=0.01) for m, s, t, p in (("1x8", "tp", 1.0, 1.0), ("1x8", "ep", 2.0, 0.5),
                                                              ("2x4", "tp", 1.0, 1.0), ("2x4", "ep", 2.0, 3.0))]
    sm = _summarise(rows, ["1x8", "2x4"], ["decode"])["summary"]
    assert (sm["cells"], sm["cell_pairs_distinguishable"], sm["cell_pairs_agree"], sm["cells_consistent"],
            sm["cells_best_within_noise"]) == (2, 2, 1, 1, 1)
