"""Planner CLI: rank parallel strategies for a MoE model on a cluster with an (uncalibrated) cost model.

    python -m mixjax.plan --model deepseek-r1 --cluster h800-roce --nodes 2 --gpus-per-node 8 --workload decode
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from mixjax.planner.cost import WORKLOADS, Workload
from mixjax.planner.presets import CLUSTER_PRESETS, GiB, MODEL_PRESETS, cluster_preset, model_preset
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


def _fmt_ms(x):
    return "-" if x is None or x != x or x == float("inf") else f"{x * 1e3:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mixjax.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help=f"preset {sorted(MODEL_PRESETS)} or HF checkpoint directory")
    ap.add_argument("--cluster", default="h800-roce", choices=sorted(CLUSTER_PRESETS))
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
    cl = cluster_preset(args.cluster, args.nodes, args.gpus_per_node)
    base = WORKLOADS[args.workload]
    wl = Workload(batch=args.batch or base.batch, prompt=args.prompt or base.prompt, output=args.output or base.output,
                  name=base.name)
    objective = args.objective or DEFAULT_OBJECTIVE[args.workload]
    slo = args.itl_slo_ms / 1e3 if args.itl_slo_ms else None
    plans = rank_plans(cfg, cl, wl, objective, itl_slo=slo, wbytes=wbytes, sub_meshes=args.sub_meshes,
                       chunks=args.chunks)
    chosen = next((p for p in plans if p.feasible), None)
    if args.json:
        out = {"model": args.model, "cluster": dataclasses.asdict(cl), "workload": dataclasses.asdict(wl),
               "objective": objective, "weight_bytes": wbytes, "calibrated": False,
               "chosen": chosen.to_dict() if chosen else None, "plans": [p.to_dict() for p in plans]}
        json.dump(out, sys.stdout, indent=1, default=float)
        print()
        return 0 if chosen else 1
    print(f"model {args.model}  cluster {cl.name} {cl.nodes}x{cl.gpus_per_node}  workload {wl.name}: batch "
          f"{wl.batch} prompt {wl.prompt} output {wl.output}  objective {objective}  weights {wbytes:g} B/elem")
    print("predictions of an UNCALIBRATED cost model with nameplate hardware numbers, not measurements\n")
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
