"""Planner CLI: rank parallel strategies for a MoE model on a cluster with the cost model; calibrate it on the
current devices; validate its predictions against measured steps.

    python -m mixjax.plan --model deepseek-r1 --cluster h800-roce --nodes 2 --gpus-per-node 8 --workload decode
    python -m mixjax.plan --model qwen3-30b-a3b --cluster current        # this machine (calibration profile)
    python -m mixjax.plan calibrate [--mesh 2x4] [--out PATH] [--quick] [--plot PNG] [--grouped auto|on|off]
    python -m mixjax.plan validate [--model tiny] [--mesh 2x4,1x8] [--profile PATH] [--json OUT]
    python -m mixjax.plan repredict RESULTS.json --profile PATH [--json OUT] [--md OUT]   # offline, no devices
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from mixjax.planner.cost import WORKLOADS, Workload
from mixjax.planner.presets import CLUSTER_PRESETS, GiB, MODEL_PRESETS, model_preset
from mixjax.planner.search import OBJECTIVES, rank_plans

DEFAULT_OBJECTIVE = {"prefill": "ttft", "decode": "itl"}


def _load_model(spec: str, weight_bytes: float | None):
    if spec.lower() in MODEL_PRESETS:
        cfg, wb = model_preset(spec)
    elif Path(spec).is_dir():
        from mixjax.models import load_config  # noqa: PLC0415
        cfg, wb = load_config(spec), 2.0
    else:
        raise SystemExit(f"--model {spec!r} is neither a preset {sorted(MODEL_PRESETS)} nor a checkpoint directory")
    return cfg, (weight_bytes or wb)


def _expert_impl(args, cl):
    if args.impl != "mixjax":
        return None
    from mixjax.planner.cost import resolve_expert_impl  # noqa: PLC0415

    return resolve_expert_impl(args.expert_impl, cl)


def _fmt_ms(x):
    return "-" if x is None or x != x or x == float("inf") else f"{x * 1e3:.2f}"


def calibrate_main(argv) -> int:
    from mixjax.planner.calibrate import (calibrate, default_profile_path, plot_profile,  # noqa: PLC0415
                                          print_profile, save_profile)

    ap = argparse.ArgumentParser(prog="python -m mixjax.plan calibrate",
                                 description="Measure the current devices and save a calibration profile.")
    ap.add_argument("--mesh", help="NODExGPU mesh to measure on (default: 2x(n/2) for an even n >= 4, else 1xn)")
    ap.add_argument("--out", help="profile path (default: ~/.cache/mixjax/profile-<platform>-<kind>-<n>.json, "
                                  "which auto_plan and --cluster current read)")
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (seconds, noisier)")
    ap.add_argument("--dtype", help="collective buffer dtype (default float32 on CPU, bfloat16 elsewhere)")
    ap.add_argument("--plot", help="write a PNG of measured vs fitted collective times")
    ap.add_argument("--grouped", choices=["auto", "on", "off"], default="auto",
                    help="probe the grouped expert kernels' achieved rates (auto: on GPU only; on a CPU they run "
                         "interpreted, on a small shape)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    import jax  # noqa: PLC0415

    devs = jax.devices()
    print(f"calibrating {devs[0].platform} / {devs[0].device_kind} x {len(devs)}"
          f"{' (quick)' if args.quick else ''}...", flush=True)
    prof = calibrate(args.mesh, quick=args.quick, dtype=args.dtype, progress=not args.no_progress,
                     grouped={"auto": None, "on": True, "off": False}[args.grouped])
    out = Path(args.out) if args.out else default_profile_path(prof["platform"], prof["device_kind"],
                                                               prof["device_count"])
    prof["_path"] = str(out)
    print_profile(prof)
    save_profile({k: v for k, v in prof.items() if k != "_path"}, out)
    print(f"profile written to {out}")
    if args.plot:
        print(f"plot written to {plot_profile(prof, args.plot)}")
    return 0


def validate_main(argv) -> int:
    from mixjax.planner.validate import print_report, validate  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="python -m mixjax.plan validate",
                                 description="Predicted vs measured step time of every strategy on this machine.")
    ap.add_argument("--model", default=None, help="preset (cpu-small, tiny, qwen3-30b-a3b) or a config directory; "
                                                  "default cpu-small on CPU, qwen3-30b-a3b elsewhere")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--mesh", help="comma-separated NODExGPU meshes (default: 2x(n/2) and 1xn)")
    ap.add_argument("--strategies", help="comma-separated (default: all)")
    ap.add_argument("--batch", type=int, default=64, help="decode batch")
    ap.add_argument("--ctx", type=int, help="decode KV cache length (default 128 on CPU, 1024 elsewhere)")
    ap.add_argument("--prefill-batch", type=int, help="default 8 on CPU, 4 elsewhere")
    ap.add_argument("--prefill-len", type=int, help="default 32 on CPU, 512 elsewhere")
    ap.add_argument("--phases", default="decode,prefill")
    ap.add_argument("--dtype", help="default float32 on CPU, bfloat16 elsewhere")
    ap.add_argument("--chunks", type=int, default=2, help="fused path chunks (ShardedModel.fused_chunks)")
    ap.add_argument("--iters", type=int, help="timed steps per (mesh, strategy, phase) (default 48 on CPU, 12 "
                                              "elsewhere)")
    ap.add_argument("--rounds", type=int, help="interleaved timing rounds the steps are spread over (default 8 on "
                                               "CPU, 4 elsewhere)")
    ap.add_argument("--profile", help="calibration profile (default: this machine's; calibrated now if absent)")
    ap.add_argument("--recalibrate", action="store_true",
                    help="calibrate first (same load conditions as the timings) and write the profile")
    ap.add_argument("--stat", choices=["min", "median"], help="statistic of the timed steps (default: the "
                                                                  "profile's: min on CPU hosts, median elsewhere)")
    ap.add_argument("--expert-impl", default="auto", choices=["auto", "dense", "grouped", "grouped-interpret"],
                    help="expert implementation of the timed models and of the prediction (default auto: "
                         "ShardedModel's pick, grouped on GPU, dense elsewhere)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--md", help="write the results as markdown tables here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    import jax  # noqa: PLC0415

    cpu = jax.devices()[0].platform == "cpu"
    model = args.model or ("cpu-small" if cpu else "qwen3-30b-a3b")
    iters, rounds = args.iters or (48 if cpu else 12), args.rounds or (8 if cpu else 4)
    ctx = args.ctx or (128 if cpu else 1024)
    pb, pl = args.prefill_batch or (8 if cpu else 4), args.prefill_len or (32 if cpu else 512)
    res = validate(model=model, layers=args.layers, meshes=args.mesh.split(",") if args.mesh else None,
                   batch=args.batch, ctx=ctx, prefill_batch=pb, prefill_len=pl,
                   dtype=args.dtype, profile=args.profile, iters=iters, rounds=rounds,
                   recalibrate=args.recalibrate, stat=args.stat,
                   strategies=args.strategies.split(",") if args.strategies else None, chunks=args.chunks,
                   phases=tuple(args.phases.split(",")), expert_impl=args.expert_impl, progress=not args.no_progress)
    res["command"] = "python -m mixjax.plan validate " + " ".join(argv)
    print_report(res)
    _write_results(res, args.json, args.md)
    return 0


def _write_results(res: dict, json_path: str | None, md_path: str | None) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(res, indent=1, default=float) + "\n")
        print(f"results written to {json_path}")
    if md_path:
        from mixjax.planner.validate import to_markdown  # noqa: PLC0415

        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(to_markdown(res) + "\n")
        print(f"markdown written to {md_path}")


def repredict_main(argv) -> int:
    from mixjax.planner.calibrate import load_profile  # noqa: PLC0415
    from mixjax.planner.validate import print_report, repredict  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="python -m mixjax.plan repredict",
                                 description="Recompute a saved validation's predictions with the current cost model "
                                             "(its measured times and kernel counts kept); no devices needed.")
    ap.add_argument("results", help="JSON written by `validate --json`")
    ap.add_argument("--profile", required=True, help="the calibration profile the validation used")
    ap.add_argument("--expert-impl", choices=["dense", "grouped", "grouped-interpret"],
                    help="what the timed models ran (default: the results' record, else the profile platform's "
                         "default: grouped on GPU, dense elsewhere)")
    ap.add_argument("--json", help="write the re-predicted results here")
    ap.add_argument("--md", help="write them as markdown tables here")
    args = ap.parse_args(argv)
    res = repredict(json.loads(Path(args.results).read_text()), load_profile(args.profile), args.expert_impl)
    print_report(res)
    print("\nbefore -> now (this cost model):")
    for r in sorted(res["rows"], key=lambda r: (r["mesh"], r["phase"], r["measured_s"])):
        print(f"  {r['mesh']:<5} {r['phase']:<8} {r['strategy']:<13} measured {r['measured_s'] * 1e3:8.3f} ms  "
              f"predicted {r['predicted_before_s'] * 1e3:8.3f} ({r['rel_err_before']:+.0%}) -> "
              f"{r['predicted_s'] * 1e3:8.3f} ({r['rel_err']:+.0%})")
    _write_results(res, args.json, args.md)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["calibrate"]:
        return calibrate_main(argv[1:])
    if argv[:1] == ["validate"]:
        return validate_main(argv[1:])
    if argv[:1] == ["repredict"]:
        return repredict_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m mixjax.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help=f"preset {sorted(MODEL_PRESETS)} or HF checkpoint directory")
    ap.add_argument("--cluster", default="h800-roce",
                    help=f"preset {sorted(CLUSTER_PRESETS)}, 'current' (this machine: its calibration profile, "
                         "else a built-in estimate) or 'profile:PATH'")
    ap.add_argument("--impl", default="ideal", choices=["ideal", "mixjax"],
                    help="ideal: the algorithms as published (paper tables); mixjax: this implementation's "
                         "padded buffers and its expert implementation (--expert-impl)")
    ap.add_argument("--expert-impl", default="auto", choices=["auto", "dense", "grouped"],
                    help="with --impl mixjax: the expert path to model (auto: what mixjax runs on the cluster's "
                         "platform, grouped experts and flash-attention prefill on GPU, dense elsewhere)")
    ap.add_argument("--flat-collectives", action="store_true",
                    help="model collectives over node x gpu as a flat ring at network speed (first version)")
    ap.add_argument("--nodes", type=int)
    ap.add_argument("--gpus-per-node", type=int)
    ap.add_argument("--workload", default="decode", choices=sorted(WORKLOADS))
    ap.add_argument("--batch", type=int)
    ap.add_argument("--prompt", type=int)
    ap.add_argument("--output", type=int)
    ap.add_argument("--objective", choices=OBJECTIVES, help="default: ttft for prefill, itl for decode")
    ap.add_argument("--itl-slo-ms", type=float, help="with --objective slo: max ITL in ms")
    ap.add_argument("--weight-bytes", type=float, help="bytes per weight element (preset default: FP8 DeepSeek 1, "
                                                        "else 2)")
    ap.add_argument("--chunks", type=int, default=0, help="fused path chunks (0: model picks 1/2/4/8)")
    ap.add_argument("--sub-meshes", action="store_true", help="also try fewer nodes / GPUs per node")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    cfg, wbytes = _load_model(args.model, args.weight_bytes)
    from mixjax.planner.calibrate import resolve_cluster  # noqa: PLC0415

    try:
        cl = resolve_cluster(args.cluster, args.nodes, args.gpus_per_node)
    except KeyError as e:
        raise SystemExit(str(e)) from None
    calibrated = cl.source.startswith("calibrated")
    base = WORKLOADS[args.workload]
    wl = Workload(batch=args.batch or base.batch, prompt=args.prompt or base.prompt, output=args.output or base.output,
                  name=base.name)
    objective = args.objective or DEFAULT_OBJECTIVE[args.workload]
    slo = args.itl_slo_ms / 1e3 if args.itl_slo_ms else None
    kw = {"expert_impl": args.expert_impl} if args.impl == "mixjax" else {}
    plans = rank_plans(cfg, cl, wl, objective, itl_slo=slo, wbytes=wbytes, sub_meshes=args.sub_meshes,
                       chunks=args.chunks, impl=args.impl, hierarchical=not args.flat_collectives, **kw)
    chosen = next((p for p in plans if p.feasible), None)
    if args.json:
        out = {"model": args.model, "cluster": dataclasses.asdict(cl), "workload": dataclasses.asdict(wl),
               "objective": objective, "weight_bytes": wbytes, "calibrated": calibrated, "source": cl.source,
               "impl": args.impl, "expert_impl": _expert_impl(args, cl),
               "chosen": chosen.to_dict() if chosen else None, "plans": [p.to_dict() for p in plans]}
        json.dump(out, sys.stdout, indent=1, default=float)
        print()
        return 0 if chosen else 1
    print(f"model {args.model}  cluster {cl.name} {cl.nodes}x{cl.gpus_per_node}  workload {wl.name}: batch "
          f"{wl.batch} prompt {wl.prompt} output {wl.output}  objective {objective}  weights {wbytes:g} B/elem")
    print(f"hardware numbers: {cl.source}; {args.impl} mode"
          + (f", {_expert_impl(args, cl)} experts" if args.impl == "mixjax" else ""))
    if not calibrated:
        print("predictions of an UNCALIBRATED cost model, not measurements")
    print()
    hdr = f"{'#':>2} {'strategy':<13} {'mesh':<5} {'TTFT ms':>10} {'ITL ms':>8} {'tok/s':>9} {'GiB/dev':>8}  status"
    print(hdr)
    print("-" * len(hdr))
    for i, p in enumerate(plans, 1):
        status = "ok" if p.feasible else p.reason[:90]
        print(f"{i:>2} {p.strategy:<13} {p.mesh:<5} {_fmt_ms(p.ttft):>10} {_fmt_ms(p.itl):>8} "
              f"{p.throughput:>9.0f} {p.mem_per_device / GiB:>8.1f}  {status}")
    if chosen is None:
        print("\nno feasible plan")
        return 1
    print(f"\nchosen: {chosen.strategy} on {chosen.mesh}  (TTFT {_fmt_ms(chosen.ttft)} ms, ITL "
          f"{_fmt_ms(chosen.itl)} ms, {chosen.throughput:.0f} output tok/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
