"""The grouped expert layer (`grouped_experts.grouped_swiglu`) at decode batch sizes on a GPU, with the sorted
layout against the expert layout (a block per touched expert holding every row, `expert_layout`): kernels per call,
their summed GPU time and the call's span (first kernel start to last end), and the largest difference between the
two outputs. Qwen3-30B-A3B expert shapes, bf16, uniform random routing. Each variant's blocks are choose_blocks'
(above 16 rows the expert layout's are the next power of two rows; 32 rows is the kept limit,
`grouped_experts.EXPERT_LAYOUT_ROWS`, which the probe raises: --rows 64,128 asks what more would give).
A development tool: python tools/probe_expert_layout.py [--rows 4,8,16,32]"""
import argparse, statistics
import jax, jax.numpy as jnp, numpy as np
from mixjax.kernels import grouped_experts as ge
from gpu_trace import traced_calls, span_us

ap = argparse.ArgumentParser(); ap.add_argument("--rows", default="4,8,16,32")
ap.add_argument("--shape", default="128,8,2048,768", help="experts,k,d_model,d_ff")
a = ap.parse_args()
e, k, d, f = map(int, a.shape.split(","))
rng = np.random.RandomState(0)
wg, wu = (jnp.asarray(rng.randn(e, d, f) * 0.02, jnp.bfloat16) for _ in range(2))
wd = jnp.asarray(rng.randn(e, f, d) * 0.02, jnp.bfloat16)
print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; experts {e}, top-{k}, d_model {d}, d_ff {f}")
for n in map(int, a.rows.split(",")):
    x = jnp.asarray(rng.randn(n, d), jnp.bfloat16)
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(n)])
    gates = np.zeros((n, e), np.float32)
    np.put_along_axis(gates, ids, rng.rand(n, k) + 0.1, axis=1)
    gates = jnp.asarray(gates)
    touched = len(set(ids.ravel().tolist()))
    outs, line = {}, f"rows {n} ({n * k} pairs, {touched} experts touched, {touched * 3 * d * f * 2 / 1e6:.0f} MB)"
    for name, expert in (("sorted", False), ("expert", True)):
        ge.EXPERT_LAYOUT = expert  # read by choose_blocks and when the layer is traced: each variant is a fresh jit
        ge.EXPERT_LAYOUT_ROWS = max(ge.EXPERT_LAYOUT_ROWS, n)  # the probe may ask beyond the kept limit
        b = ge.choose_blocks(n * k, e, d, f, rows=n)
        kind = ge.layout_kind(n, k, b.bm)
        layer = lambda x, g, b=b: ge.grouped_swiglu.__wrapped__(x, g, wg, wu, wd, k=k, blk=b)
        try:
            out, runs = traced_calls(layer, (x, gates), reps=20)
        except Exception as err:  # noqa: BLE001 - a tiling Triton refuses (registers, shared memory) is a result
            line += f"; {name} ({kind}, bm {b.bm}): failed ({type(err).__name__}: {str(err)[:80]})"
            continue
        outs[name] = np.asarray(out, np.float32)
        busy = statistics.median(sum(ev["dur"] for ev in r) for r in runs)
        span = statistics.median(span_us(r) for r in runs)
        line += f"; {name} ({kind}, bm {b.bm}): {len(runs[0])} kernels, {busy:.1f} us busy, {span:.1f} us span"
    if len(outs) == 2:
        diff = np.max(np.abs(outs["sorted"] - outs["expert"])) / np.max(np.abs(outs["sorted"]))
        line += f"; max difference {diff:.1e} of the largest output"
    print(line, flush=True)
