"""Validation: the planner's predicted step time against mixjax's measured step time, for every strategy.

    python -m mixjax.plan validate [--model cpu-small] [--layers 2] [--mesh 2x4,1x8] [--batch 64 --ctx 128]
                                   [--prefill-batch 8 --prefill-len 32] [--profile PATH] [--json OUT]

For each mesh and each strategy the mesh admits, it builds a model of the given shapes with random weights,
times a decode step (batch x 1 new token, KV cache of --ctx slots) and a prefill step (prefill-batch x
prefill-len tokens) on the current devices (`mixjax.bench.layers.time_step`: median of --iters after warm-up),
and computes the planner's prediction for the same shapes in "mixjax" mode (padded dispatch buffers, the expert
implementation the models were built with: --expert-impl, default "auto" = grouped on GPU, dense elsewhere) with
the calibrated profile. The one input the prediction takes from the compiled program is its kernel count (from
the HLO), charged at the profile's measured per-kernel cost; the rest is the cost model. It reports predicted vs
measured, relative error, and whether the ranking of strategies matches. The timed step is
`ShardedModel.forward` (logits for every position), and the prediction charges the same.

`repredict` recomputes the predictions of a saved validation (its measured times and kernel counts) with the
current cost model, offline: `python -m mixjax.plan repredict RESULTS.json --profile PROFILE.json`.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import statistics
import sys
import time
from pathlib import Path


def _ranks(xs):
    """Average ranks (1 = smallest), ties shared."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a, b) -> float:
    if len(a) < 2:
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


def compare_rankings(names, predicted, measured, spread=None, tol: float = 0.03) -> dict:
    """Exact order, Spearman, and agreement on the pairs whose measured times differ by more than the noise:
    relative gap > max(tol, 2 * sqrt(spread_i^2 + spread_j^2)), spread = each measurement's relative uncertainty
    (median: ~standard error from the interquartile range; minimum: its distance to the lower quartile)."""
    spread = spread or [0.0] * len(names)
    pred_order = [names[i] for i in sorted(range(len(names)), key=lambda i: predicted[i])]
    meas_order = [names[i] for i in sorted(range(len(names)), key=lambda i: measured[i])]
    agree = total = 0
    disagree = []

    def apart(i, j):  # the measured times of i and j differ by more than the noise
        gap = abs(measured[i] - measured[j]) / min(measured[i], measured[j])
        return gap > max(tol, 2 * math.hypot(spread[i], spread[j]))

    fastest = min(range(len(names)), key=lambda i: measured[i])
    pred_fastest = min(range(len(names)), key=lambda i: predicted[i])
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if not apart(i, j):
                continue
            total += 1
            if (predicted[i] < predicted[j]) == (measured[i] < measured[j]):
                agree += 1
            else:
                disagree.append(f"{names[i]} vs {names[j]}")
    return {"predicted_order": pred_order, "measured_order": meas_order, "exact": pred_order == meas_order,
            "spearman": spearman(predicted, measured), "best_match": pred_order[0] == meas_order[0],
            # the predicted fastest is the measured fastest or indistinguishable from it
            "best_within_noise": pred_fastest == fastest or not apart(pred_fastest, fastest),
            "pairs_agree": agree, "pairs_distinguishable": total, "pairs_disagree": disagree}


# Validation-only shapes (next to mixjax.bench.layers.PRESETS): "cpu-small" is the CPU default, large enough
# that the matmuls and memory passes the cost model prices outweigh the fixed costs (kernel dispatch, thread
# rendezvous) and the timing noise of 8 simulated devices on a few cores, small enough for a few minutes' run.
VALIDATE_PRESETS = {
    "cpu-small": dict(vocab_size=1024, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                      num_attention_heads=8, num_key_value_heads=8, head_dim=64, num_experts=16,
                      num_experts_per_tok=2),
}


def _config(model: str, layers: int):
    from mixjax.bench.layers import PRESETS as BENCH  # noqa: PLC0415

    PRESETS = {**BENCH, **VALIDATE_PRESETS}
    if model in PRESETS:
        from mixjax.models.qwen3_moe import Qwen3MoeConfig  # noqa: PLC0415

        return Qwen3MoeConfig(num_hidden_layers=layers, norm_topk_prob=True, decoder_sparse_step=1,
                              mlp_only_layers=(), rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling=None,
                              max_position_embeddings=32768, tie_word_embeddings=True, **PRESETS[model])
    if Path(model).is_dir():
        from mixjax.models import load_config  # noqa: PLC0415

        cfg = load_config(model)
        return dataclasses.replace(cfg, num_hidden_layers=layers) if layers else cfg
    raise SystemExit(f"--model {model!r}: neither a preset ({sorted(PRESETS)}) nor a config directory")


def _build(cfg, mesh, strategy: str, dtype, chunks: int, expert_impl: str = "auto"):
    from flax import nnx  # noqa: PLC0415

    from mixjax.models import model_class  # noqa: PLC0415
    from mixjax.sharding.runner import ShardedModel  # noqa: PLC0415
    from mixjax.sharding.strategies import STRATEGIES  # noqa: PLC0415

    model = ShardedModel(cfg, mesh, STRATEGIES[strategy], dtype=dtype, fused_chunks=chunks, expert_impl=expert_impl)
    real = model_class(cfg)(cfg, tp=model.par.attn_tp_size, vocab_padded=model.vocab_padded, dtype=dtype,
                            rngs=nnx.Rngs(0))
    return model.set_state(nnx.state(real))


class _Run:
    """One (mesh, strategy, phase): a built model, its inputs and cache, and the timed samples."""

    def __init__(self, mesh, nodes, gpus, strategy, phase, model, batch, seq, ctx, kernels):
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415
        import numpy as np  # noqa: PLC0415
        from jax.sharding import NamedSharding  # noqa: PLC0415

        self.mesh, self.nodes, self.gpus, self.strategy, self.phase = mesh, nodes, gpus, strategy, phase
        self.model, self.batch, self.seq, self.ctx, self.kernels = model, batch, seq, ctx, kernels
        # inputs placed as the compiled step takes them: otherwise every call first runs a resharding program for
        # tokens and positions (a host-side cost of ~0.6 ms per step on the 8 CPU devices, not part of the step)
        on_mesh = NamedSharding(model.mesh, model.token_spec)
        self.tokens = jax.device_put(
            jnp.asarray(np.random.RandomState(0).randint(0, model.vocab_size, (batch, seq)), jnp.int32), on_mesh)
        self.pos = jax.device_put(
            jnp.asarray(np.broadcast_to(np.arange(ctx - seq, ctx, dtype=np.int32), (batch, seq))), on_mesh)
        self.cache = model.init_cache(batch, ctx)
        self.fresh = seq == ctx and seq > 1  # a whole prompt from position 0: the cost model's cuDNN case on GPU
        self.samples: list[float] = []
        for _ in range(2):  # compile and warm up (as mixjax.bench.layers.time_step)
            self._step()

    def _step(self):
        logits, self.cache = self.model.forward(self.tokens, self.pos, self.cache, fresh=self.fresh)
        logits.block_until_ready()

    def time(self, iters: int):
        for _ in range(iters):
            t0 = time.perf_counter()
            self._step()
            self.samples.append(time.perf_counter() - t0)


def _loadavg() -> list[float] | None:
    """The host's 1, 5 and 15 minute load averages (other processes competing for the cores), if known."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _reference_ratio(prof: dict, devices, stat: str) -> float | None:
    """The calibration's widest matmul probe timed again now, over its time in the profile: how much slower (> 1)
    or faster the machine runs than when it was calibrated (other processes' load; reported, not used by the
    predictions). None when the profile's mesh does not fit these devices."""
    from mixjax.planner import calibrate as C  # noqa: PLC0415
    from mixjax.sharding.mesh import make_mesh  # noqa: PLC0415

    c = prof["compute"]
    d = "float32" if "float32" in c.get("matmul_samples", {}) else next(iter(c.get("matmul_samples", {})), None)
    if d is None or prof.get("device_count") != len(devices):
        return None
    flops, _, t_prof = max(c["matmul_samples"][d], key=lambda x: x[0])
    m, k = c["matmul_shape"]
    old, C.TIME_STAT = C.TIME_STAT, stat
    try:
        t = C.measure_matmul(make_mesh(prof["mesh"], devices), m, k, int(round(flops / (2 * m * k))), d, 6, 9)
    finally:
        C.TIME_STAT = old
    return round(t / t_prof, 3) if t_prof > 0 else None


def default_meshes(n_devices: int) -> list[str]:
    out = [f"1x{n_devices}"]
    if n_devices >= 4 and n_devices % 2 == 0:
        out.insert(0, f"2x{n_devices // 2}")
    return out


def validate(model: str = "tiny", layers: int = 2, meshes=None, batch: int = 64, ctx: int = 128,
             prefill_batch: int = 8, prefill_len: int = 32, dtype: str | None = None, profile: str | None = None,
             iters: int = 12, rounds: int = 4, strategies=None, chunks: int = 2, phases=("decode", "prefill"),
             recalibrate: bool = False, stat: str | None = None, expert_impl: str = "auto", progress: bool = True,
             log=print) -> dict:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    from mixjax.planner.calibrate import (calibrate, cluster_from_profile, count_kernels,  # noqa: PLC0415
                                          default_profile_path, load_profile, save_profile)
    from mixjax.planner.cost import impl_step_cost  # noqa: PLC0415
    from mixjax.sharding.mesh import LayoutError, check_layout, make_mesh, parse_mesh_shape  # noqa: PLC0415
    from mixjax.sharding.strategies import STRATEGIES  # noqa: PLC0415

    devices = jax.devices()
    dev = devices[0]
    dtype = dtype or ("float32" if dev.platform == "cpu" else "bfloat16")
    jdtype = jnp.dtype(dtype)
    path = Path(profile) if profile else default_profile_path(dev.platform, dev.device_kind, len(devices))
    if path.is_file() and not recalibrate:
        prof = load_profile(path)
    elif profile and not recalibrate:
        raise SystemExit(f"--profile {profile} does not exist")
    else:
        log(f"calibrating now ({'--recalibrate' if recalibrate else f'no calibration profile at {path}'}); "
            f"the profile goes to {path}")
        prof = calibrate(progress=progress)
        save_profile(prof, path)
        prof["_path"] = str(path)
    mm_dtype = dtype if dtype in prof["compute"]["matmul_flops"] else None
    stat = stat or prof.get("statistic", "median")  # the calibration's statistic, for like-for-like
    cfg = _config(model, layers)
    meshes = meshes or default_meshes(len(devices))
    names = list(strategies or STRATEGIES)
    shapes = {"decode": (batch, 1, ctx), "prefill": (prefill_batch, prefill_len, prefill_len)}
    jobs = []
    skipped = []
    for m in meshes:
        nodes, gpus = parse_mesh_shape(m)
        mesh = make_mesh(m, devices)
        for s in names:
            try:
                check_layout(cfg, mesh, STRATEGIES[s])
            except LayoutError as e:
                skipped.append({"mesh": m, "strategy": s, "reason": str(e)})
                continue
            dp = math.prod(dict(node=nodes, gpu=gpus)[a] for a in STRATEGIES[s].attn_dp) or 1
            if any(shapes[ph][0] % dp for ph in phases):
                skipped.append({"mesh": m, "strategy": s, "reason": f"batch not a multiple of DP degree {dp}"})
                continue
            jobs.append((m, nodes, gpus, mesh, s))
    from mixjax.sharding.runner import resolve_expert_impl  # noqa: PLC0415

    # the models and the cost model use the same expert implementation ("auto": ShardedModel's per-platform pick,
    # $MIXJAX_EXPERTS included)
    impl = resolve_expert_impl(expert_impl, make_mesh(meshes[0], devices))
    t_start = time.perf_counter()
    load_start = _loadavg()
    ref_start = _reference_ratio(prof, devices, stat)
    # build and compile everything first, then time in interleaved rounds, so that a change in the machine's
    # load (other processes) shifts every strategy alike instead of whichever ran at the time
    runs = []
    bar = tqdm(jobs, desc="build + compile", disable=not progress, leave=False)
    for m, nodes, gpus, mesh, s in bar:
        bar.set_postfix_str(f"{m} {s}")
        sm = _build(cfg, mesh, s, jdtype, chunks, impl)
        for ph in phases:
            b, q, c = shapes[ph]
            k = count_kernels(sm.lower_forward(b, q, c, fresh=q == c and q > 1).compile().as_text())
            runs.append(_Run(m, nodes, gpus, s, ph, sm, b, q, c, k))
    bar.close()
    rounds = max(1, rounds)
    per_round = max(1, -(-iters // rounds))
    for _ in tqdm(range(rounds), desc="timing rounds", disable=not progress, leave=False):
        for r in runs:
            r.time(per_round)
    rows = []
    for r in runs:
        cl = cluster_from_profile(prof, r.nodes, r.gpus, mm_dtype)
        med = statistics.median(r.samples)
        qs = statistics.quantiles(r.samples, n=4) if len(r.samples) >= 4 else [med, med, med]
        lo = min(r.samples)
        meas = lo if stat == "min" else med
        pred = impl_step_cost(cfg, cl, STRATEGIES[r.strategy], r.nodes, r.gpus, r.batch, r.seq, r.ctx,
                              wbytes=jdtype.itemsize, abytes=jdtype.itemsize, chunks=chunks,
                              kernels=r.kernels["kernels"], expert_impl=impl, logits="all")
        rows.append({
            "mesh": r.mesh, "strategy": r.strategy, "phase": r.phase, "batch": r.batch, "seq": r.seq,
            "ctx": r.ctx, "measured_s": meas, "measured_median_s": med, "measured_min_s": lo,
            "measured_rel_iqr": (qs[2] - qs[0]) / med, "measured_rel_spread": (qs[0] - lo) / lo if stat == "min"
            else 0.93 * (qs[2] - qs[0]) / med / math.sqrt(len(r.samples)),
            "measured_n": len(r.samples), "predicted_s": pred["total"], "rel_err": pred["total"] / meas - 1,
            "predicted_compute_s": pred["compute"], "predicted_comm_s": pred["comm"],
            "predicted_overhead_s": pred["overhead"], "kernels": r.kernels["kernels"],
            "collectives": r.kernels["collectives"],
        })
    runs.clear()
    ref_end = _reference_ratio(prof, devices, stat)
    out = _summarise(rows, meshes, phases)
    out = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m mixjax.plan validate " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["validate"]
        else None,
        "device": f"{dev.device_kind} x{len(devices)} ({dev.platform})", "jax_version": jax.__version__,
        "profile": prof.get("_path"), "profile_date": prof["date"], "profile_mesh": prof["mesh"],
        "model": {"name": model, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                  "experts": cfg.num_experts, "top_k": cfg.num_experts_per_tok, "dtype": dtype},
        "expert_impl": impl, "timed": "ShardedModel.forward (logits for every position)",
        "shapes": {ph: dict(zip(("batch", "seq", "ctx"), shapes[ph])) for ph in phases},
        "chunks": chunks, "iters": iters, "rounds": rounds, "statistic": stat,
        "seconds": round(time.perf_counter() - t_start, 1), "load_average": {"start": load_start, "end": _loadavg()},
        "reference_slowdown": {"start": ref_start, "end": ref_end},
        "skipped": skipped, **out,
    }
    return out


def _summarise(rows, meshes, phases) -> dict:
    """The rows, the rankings per (mesh, phase) (and over all meshes when there are several), the error summary."""
    rankings = []
    groups = [(m, ph) for m in meshes for ph in phases] + [("all", ph) for ph in phases] if len(meshes) > 1 else \
        [(m, ph) for m in meshes for ph in phases]
    for m, ph in groups:
        sel = [r for r in rows if r["phase"] == ph and (m == "all" or r["mesh"] == m)]
        if len(sel) < 2:
            continue
        label = [r["strategy"] if m != "all" else f"{r['strategy']}@{r['mesh']}" for r in sel]
        rk = compare_rankings(label, [r["predicted_s"] for r in sel], [r["measured_s"] for r in sel],
                              [r["measured_rel_spread"] for r in sel])
        rankings.append(dict(mesh=m, phase=ph, **rk))
    errs = [abs(r["rel_err"]) for r in rows]
    cells = [r for r in rankings if r["mesh"] != "all"]  # the per-(mesh, phase) rankings the criterion is about
    return {"rows": rows, "rankings": rankings,
            "summary": {"median_abs_rel_err": statistics.median(errs) if errs else None,
                        "max_abs_rel_err": max(errs) if errs else None,
                        "median_rel_err": statistics.median(r["rel_err"] for r in rows) if rows else None,
                        "rankings_exact": sum(r["exact"] for r in rankings), "rankings": len(rankings),
                        "best_match": sum(r["best_match"] for r in rankings),
                        # per (mesh, phase): pairs outside the noise ordered right, and the cells in which every
                        # such pair is (the order is right up to pairs the measurement cannot tell apart)
                        "cell_pairs_agree": sum(r["pairs_agree"] for r in cells),
                        "cell_pairs_distinguishable": sum(r["pairs_distinguishable"] for r in cells),
                        "cells_consistent": sum(r["pairs_agree"] == r["pairs_distinguishable"] for r in cells),
                        "cells_best_within_noise": sum(r.get("best_within_noise", r["best_match"]) for r in cells),
                        "cells": len(cells)}}


def repredict(res: dict, prof: dict, expert_impl: str | None = None) -> dict:
    """A saved validation `res` with its predictions recomputed by the current cost model (same measured times,
    kernel counts, shapes and profile `prof`), offline. expert_impl: what the timed models ran (default: the
    result's own record, else the profile platform's default: grouped on GPU). Each row keeps its old prediction
    as `predicted_before_s` / `rel_err_before`."""
    import copy  # noqa: PLC0415

    import jax.numpy as jnp  # noqa: PLC0415

    from mixjax.planner.calibrate import cluster_from_profile  # noqa: PLC0415
    from mixjax.planner.cost import impl_step_cost, resolve_expert_impl  # noqa: PLC0415
    from mixjax.sharding.mesh import parse_mesh_shape  # noqa: PLC0415
    from mixjax.sharding.strategies import STRATEGIES  # noqa: PLC0415

    out = copy.deepcopy(res)
    m = res["model"]
    cfg = _config(m["name"], m["layers"])
    dt = jnp.dtype(m["dtype"])
    mm_dtype = m["dtype"] if m["dtype"] in prof["compute"]["matmul_flops"] else None
    impl = expert_impl or res.get("expert_impl")
    for r in out["rows"]:
        nodes, gpus = parse_mesh_shape(r["mesh"])
        cl = cluster_from_profile(prof, nodes, gpus, mm_dtype)
        impl_r = resolve_expert_impl(impl, cl)
        pred = impl_step_cost(cfg, cl, STRATEGIES[r["strategy"]], nodes, gpus, r["batch"], r["seq"], r["ctx"],
                              wbytes=dt.itemsize, abytes=dt.itemsize, chunks=res.get("chunks", 2),
                              kernels=r["kernels"], expert_impl=impl_r, logits="all")
        r["predicted_before_s"], r["rel_err_before"] = r["predicted_s"], r["rel_err"]
        r.update(predicted_s=pred["total"], rel_err=pred["total"] / r["measured_s"] - 1,
                 predicted_compute_s=pred["compute"], predicted_comm_s=pred["comm"],
                 predicted_overhead_s=pred["overhead"])
        out["expert_impl"] = impl_r
    meshes = list(dict.fromkeys(r["mesh"] for r in out["rows"]))
    phases = list(dict.fromkeys(r["phase"] for r in out["rows"]))
    out.update(_summarise(out["rows"], meshes, phases))
    out["repredicted"] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          "profile_date": prof["date"], "expert_impl": out.get("expert_impl")}
    return out


def print_report(res: dict, log=print) -> None:
    log(f"\n{res['device']}, {res['date']}; profile {res['profile']} (mesh {res['profile_mesh']}); model "
        f"{res['model']['name']} {res['model']['layers']} layers, {res['model']['dtype']}; "
        + "; ".join(f"{ph} batch {v['batch']} x {v['seq']} tokens, cache {v['ctx']}"
                    for ph, v in res["shapes"].items()))
    log(f"measured = {res['statistic']} of {res['iters']} steps per row (interleaved rounds); iqr = relative "
        "interquartile range of the steps")
    log(f"{'mesh':<5} {'phase':<8} {'strategy':<13} {'measured ms':>11} {'iqr':>6} {'predicted ms':>12} "
        f"{'error':>7} {'comp/comm/ovh ms':>20} {'kern':>5}")
    for r in sorted(res["rows"], key=lambda r: (r["mesh"], r["phase"], r["measured_s"])):
        parts = f"{r['predicted_compute_s'] * 1e3:.2f}/{r['predicted_comm_s'] * 1e3:.2f}/" \
                f"{r['predicted_overhead_s'] * 1e3:.2f}"
        log(f"{r['mesh']:<5} {r['phase']:<8} {r['strategy']:<13} {r['measured_s'] * 1e3:11.3f} "
            f"{r['measured_rel_iqr']:6.1%} {r['predicted_s'] * 1e3:12.3f} {r['rel_err']:+7.1%} {parts:>20} "
            f"{r['kernels']:5d}")
    for s in res["skipped"]:
        log(f"skipped {s['strategy']} on {s['mesh']}: {s['reason']}")
    log("\nrankings (fastest first):")
    for rk in res["rankings"]:
        log(f"  {rk['mesh']:<5} {rk['phase']:<8} measured  {' < '.join(rk['measured_order'])}")
        log(f"  {'':<5} {'':<8} predicted {' < '.join(rk['predicted_order'])}")
        log(f"  {'':<5} {'':<8} exact {'yes' if rk['exact'] else 'no'}, best {'yes' if rk['best_match'] else 'no'}"
            f", Spearman {rk['spearman']:.2f}, distinguishable pairs agreeing {rk['pairs_agree']}/"
            f"{rk['pairs_distinguishable']}" + (f" (wrong: {', '.join(rk['pairs_disagree'])})"
                                                 if rk["pairs_disagree"] else ""))
    sm = res["summary"]
    log(f"\n|relative error|: median {sm['median_abs_rel_err']:.1%}, max {sm['max_abs_rel_err']:.1%}; exact "
        f"ranking {sm['rankings_exact']}/{sm['rankings']}, best strategy {sm['best_match']}/{sm['rankings']}; "
        f"{res['seconds']:.0f} s")
    if "cells" in sm:
        log(_pairs_line(sm))
    if res.get("load_average"):
        log(f"load average (1, 5, 15 min) at start {res['load_average']['start']}, at end {res['load_average']['end']}")
    if (res.get("reference_slowdown") or {}).get("start"):
        rs = res["reference_slowdown"]
        log(f"the calibration's matmul probe ran {rs['start']}x (start) and {rs['end']}x (end) its calibrated time")


def _pairs_line(sm: dict) -> str:
    return (f"Per mesh and phase: {sm['cell_pairs_agree']}/{sm['cell_pairs_distinguishable']} pairs whose measured "
            f"difference is outside the noise ordered right; {sm['cells_consistent']}/{sm['cells']} cells with every "
            f"such pair right; predicted fastest measured fastest or within the noise of it in "
            f"{sm.get('cells_best_within_noise', '?')}/{sm['cells']}.")


def to_markdown(res: dict) -> str:
    """The validation as markdown tables (for docs/PLANNER.md)."""
    out = [f"Device: {res['device']}, jax {res['jax_version']}, {res['date']}. Profile: `{res['profile']}` (mesh "
           f"{res['profile_mesh']}, {res['profile_date']}). Model: {res['model']['name']} shapes, "
           f"{res['model']['layers']} layers, {res['model']['dtype']}, random weights; "
           + "; ".join(f"{ph}: batch {v['batch']} x {v['seq']} new tokens, KV cache {v['ctx']}"
                       for ph, v in res["shapes"].items())
           + f". Measured: {res['statistic']} of {res['iters']} steps in {res['rounds']} interleaved rounds.",
           f"Command: `{res['command']}`"]
    rep = res.get("repredicted")
    if rep:
        out.append(f"Predictions recomputed offline ({rep['date']}, `python -m mixjax.plan repredict`, expert "
                   f"implementation {rep['expert_impl']}) from the run's measured times and kernel counts; "
                   "\"before\" is the run's own prediction.")
    elif res.get("expert_impl"):
        out.append(f"Expert implementation (timed and predicted): {res['expert_impl']}.")
    before = " before ms | error before |" if rep else ""
    out += ["", "| mesh | phase | strategy | measured ms | IQR |" + before + " predicted ms | error | predicted "
            "compute / comm / kernels ms | kernels |", "|---|---|---|---:|---:|" + ("---:|---:|" if rep else "")
            + "---:|---:|---|---:|"]
    for r in sorted(res["rows"], key=lambda r: (r["mesh"], r["phase"], r["measured_s"])):
        b = f" {r['predicted_before_s'] * 1e3:.2f} | {r['rel_err_before']:+.0%} |" if rep else ""
        out.append(f"| {r['mesh']} | {r['phase']} | {r['strategy']} | {r['measured_s'] * 1e3:.2f} | "
                   f"{r['measured_rel_iqr']:.0%} |{b} {r['predicted_s'] * 1e3:.2f} | {r['rel_err']:+.0%} | "
                   f"{r['predicted_compute_s'] * 1e3:.2f} / {r['predicted_comm_s'] * 1e3:.2f} / "
                   f"{r['predicted_overhead_s'] * 1e3:.2f} | {r['kernels']} |")
    out += ["", "| mesh | phase | measured order (fastest first) | predicted order | exact | best | Spearman | "
            "distinguishable pairs agreeing |", "|---|---|---|---|---|---|---:|---|"]
    for rk in res["rankings"]:
        out.append(f"| {rk['mesh']} | {rk['phase']} | {' < '.join(rk['measured_order'])} | "
                   f"{' < '.join(rk['predicted_order'])} | {'yes' if rk['exact'] else 'no'} | "
                   f"{'yes' if rk['best_match'] else 'no'} | {rk['spearman']:.2f} | {rk['pairs_agree']}/"
                   f"{rk['pairs_distinguishable']}" + (f" (not: {', '.join(rk['pairs_disagree'])})"
                                                       if rk["pairs_disagree"] else "") + " |")
    sm = res["summary"]
    out += ["", f"|relative error|: median {sm['median_abs_rel_err']:.0%}, max {sm['max_abs_rel_err']:.0%}. "
                f"Exact order {sm['rankings_exact']}/{sm['rankings']}, fastest strategy {sm['best_match']}/"
                f"{sm['rankings']}." + (" " + _pairs_line(sm) if "cells" in sm else "")]
    if res.get("load_average"):
        out.append(f"Load average (1, 5, 15 min): {res['load_average']['start']} at the start, "
                   f"{res['load_average']['end']} at the end.")
    if (res.get("reference_slowdown") or {}).get("start"):
        rs = res["reference_slowdown"]
        out.append(f"The calibration's widest matmul probe, timed again, ran at {rs['start']}x (start) and "
                   f"{rs['end']}x (end) its calibrated time (not used by the predictions).")
    return "\n".join(out)
