"""Read the compiled, scheduled HLO of a strategy and report which collectives are in flight together.

    python -m mixjax.bench.schedule --mesh 2x4 --strategy hybrid_fused [--mock-gpu 1x2x4] [--out DIR]

On a machine with one GPU, `--mock-gpu SLICESxHOSTSxGPUS` asks JAX's GPU client to pretend to be that many
hosts and GPUs (mock NCCL), so the program is compiled and scheduled by XLA:GPU for the full multi-GPU target
without the GPUs being present. The scheduled entry computation lists every asynchronous collective as a
start/done pair; two collectives are "in flight together" when one starts before the other is done. The report
classifies each collective by the mesh axis it runs over (node = inter-node, gpu = intra-node).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

START = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?\b(all-to-all|reduce-scatter|all-gather|all-reduce|"
                   r"collective-permute|async)-start\((.*)$")
DONE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?-done\(\S*?%?([\w.\-]+)\)")
OP_IN_ASYNC = re.compile(r"(all-to-all|reduce-scatter|all-gather|all-reduce)")


def classify_axis(line: str, gpus: int) -> str:
    m = re.search(r"\{'(node|gpu)'\}", line)
    if m:
        return m.group(1)
    m = re.search(r"replica_groups=\{\{([\d,]+)\}", line)
    if m:
        group = [int(x) for x in m.group(1).split(",")]
        if len(group) == gpus and group == list(range(group[0], group[0] + gpus)):
            return "gpu"
        return "node"
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](T\(([\d,]+)\))?", line)
    if m:  # iota form: [groups, size] <= [dims] T(perm)
        size, transposed = int(m.group(2)), bool(m.group(4))
        return "gpu" if size == gpus and not transposed else "node"
    return "?"


def async_intervals(hlo: str, gpus: int, computations: dict[str, str] | None = None):
    """[(kind, axis, start_index, done_index, name)] for the async collectives of the entry computation."""
    entry = hlo[hlo.find("ENTRY"):]
    lines = entry.splitlines()
    open_ops, out = {}, []
    for i, line in enumerate(lines):
        m = START.match(line)
        if m:
            name, kind, rest = m.groups()
            if kind == "async":
                called = re.search(r"calls=%?([\w.\-]+)", line)
                body = (computations or {}).get(called.group(1), "") if called else ""
                op = OP_IN_ASYNC.search(body or rest)
                kind = op.group(1) if op else "async"
                line = body or line
            open_ops[name] = (kind, classify_axis(line, gpus), i)
            continue
        m = DONE.match(line)
        if m and m.group(2) in open_ops:
            kind, axis, s = open_ops.pop(m.group(2))
            out.append((kind, axis, s, i, m.group(2)))
    return out


def computations_of(hlo: str) -> dict[str, str]:
    comps, name, buf = {}, None, []
    for line in hlo.splitlines():
        m = re.match(r"^%?([\w.\-]+) .*\{\s*$", line)
        if m and not line.startswith(" "):
            name, buf = m.group(1), []
            continue
        if line.startswith("}") and name:
            comps[name] = "\n".join(buf)
            name = None
            continue
        if name:
            buf.append(line)
    return comps


def overlaps(intervals):
    """Pairs (inter-node op, intra-node op) whose start..done intervals intersect."""
    inter = [iv for iv in intervals if iv[1] == "node"]
    intra = [iv for iv in intervals if iv[1] == "gpu"]
    return [(a, b) for a in inter for b in intra if a[2] < b[3] and b[2] < a[3]]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mesh", default="2x4")
    ap.add_argument("--strategy", default="hybrid_fused")
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--mock-gpu", default=None, help="SLICESxHOSTSxGPUS for JAX's mock GPU client")
    ap.add_argument("--out", default=None, help="folder for the scheduled HLO and a JSON summary")
    args = ap.parse_args(argv)

    import jax  # noqa: PLC0415 (the mock flag must be set before the backend starts)

    if args.mock_gpu:
        jax.config.update("jax_mock_gpu_topology", args.mock_gpu)
    import jax.numpy as jnp  # noqa: PLC0415

    from mixjax.bench.layers import PRESETS  # noqa: PLC0415
    from mixjax.models.qwen3_moe import Qwen3MoeConfig  # noqa: PLC0415
    from mixjax.sharding.mesh import make_mesh, parse_mesh_shape  # noqa: PLC0415
    from mixjax.sharding.runner import ShardedModel  # noqa: PLC0415
    from mixjax.sharding.strategies import STRATEGIES  # noqa: PLC0415

    nodes, gpus = parse_mesh_shape(args.mesh)
    cfg = Qwen3MoeConfig(num_hidden_layers=args.layers, norm_topk_prob=True, decoder_sparse_step=1,
                         mlp_only_layers=(), rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling=None,
                         max_position_embeddings=32768, tie_word_embeddings=True, **PRESETS[args.preset])
    devices = jax.devices()
    if args.mock_gpu:  # mock devices of all "hosts" are visible; lay out node = host
        import numpy as np  # noqa: PLC0415
        from jax.sharding import AxisType, Mesh  # noqa: PLC0415
        grid = np.array(sorted(devices, key=lambda d: (d.process_index, d.id))[: nodes * gpus]).reshape(nodes, gpus)
        mesh = Mesh(grid, ("node", "gpu"), axis_types=(AxisType.Auto,) * 2)
    else:
        mesh = make_mesh(args.mesh)
    print(f"devices: {len(devices)} x {devices[0].device_kind}; mesh {dict(mesh.shape)}")
    model = ShardedModel(cfg, mesh, STRATEGIES[args.strategy], dtype=jnp.bfloat16, fused_chunks=args.chunks)
    compiled = model.lower_forward(args.batch, args.seq, args.ctx).compile()
    hlo = compiled.as_text()
    ivs = async_intervals(hlo, gpus, computations_of(hlo))
    pairs = overlaps(ivs)
    summary = {
        "strategy": args.strategy, "mesh": args.mesh, "preset": args.preset, "layers": args.layers,
        "batch": args.batch, "chunks": args.chunks, "device": devices[0].device_kind,
        "async_collectives": [dict(kind=k, axis=a, start=s, done=d, name=n) for k, a, s, d, n in ivs],
        "overlapping_inter_intra_pairs": [[a[4], a[0], b[4], b[0]] for a, b in pairs],
    }
    print(f"{len(ivs)} async collectives; {len(pairs)} (inter-node, intra-node) pairs in flight together")
    for a, b in pairs[:12]:
        print(f"  {a[0]} over node [{a[2]}..{a[3]}]  ||  {b[0]} over gpu [{b[2]}..{b[3]}]")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"schedule_{args.strategy}_{args.mesh}.hlo.txt").write_text(hlo)
        (out / f"schedule_{args.strategy}_{args.mesh}.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
