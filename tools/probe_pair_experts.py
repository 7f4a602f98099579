"""One or two decode tokens' routed experts on a GPU: the pair layout with kernels A and B (mixjax.kernels.
grouped_experts, MIXJAX_PAIR_EXPERTS=0) against the pair kernel (mixjax.kernels.pair_experts) at a sweep of its
tiles. Qwen3-30B-A3B shapes (128 experts, D 2048, F 768, top 8, bf16); GPU kernel time per call from a profiler
trace (8 calls on distinct weights, so that none stays in L2), and each variant's largest difference from the
pair layout's output. A development tool:
    python tools/probe_pair_experts.py [ROWS] [--sweep]"""
import argparse, collections, itertools, os, tempfile
import jax, jax.numpy as jnp, numpy as np
from mixjax.kernels import grouped_experts as ge
from mixjax.kernels.pair_experts import PairTiles, pair_swiglu
from gpu_trace import gpu_kernels

ap = argparse.ArgumentParser(); ap.add_argument("rows", nargs="?", type=int, default=1)
ap.add_argument("--sweep", action="store_true"); a = ap.parse_args()
E_, D, F, K, N, CALLS = 128, 2048, 768, 8, a.rows, 8
rng = np.random.RandomState(0)
weights = [tuple(jax.random.normal(jax.random.key(10 * i + j), s, jnp.bfloat16) * 0.02
                 for j, s in enumerate(((E_, D, F), (E_, D, F), (E_, F, D)))) for i in range(CALLS)]
xs = [jnp.asarray(rng.randn(N, D), jnp.bfloat16) for _ in range(CALLS)]
ids = [jnp.asarray(np.stack([rng.choice(E_, K, replace=False) for _ in range(N)]), jnp.int32) for _ in range(CALLS)]
ws = [jnp.asarray(rng.rand(N, K) + 0.1, jnp.float32) for _ in range(CALLS)]
floor_us = N * K * 3 * D * F * 2 / 4.3e12 * 1e6  # distinct experts' bytes at ~4.3 TB/s (ROWS 2 may share a few)


def gpu_us(op):
    """(GPU kernel us of one call, kernels per call, first call's output)."""
    f = jax.jit(lambda: [op(i) for i in range(CALLS)])
    out = jax.block_until_ready(f())
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(3):
            jax.block_until_ready(f())
    ks = gpu_kernels(d)
    n = 3 * CALLS
    names = collections.Counter(e["name"][:24] for e in ks)
    return sum(e["dur"] for e in ks) / n, ", ".join(f"{k} x{v / n:g}" for k, v in names.items()), out[0]


def layout_path(i):
    gates = jnp.zeros((N, E_), jnp.float32).at[jnp.arange(N)[:, None], ids[i]].set(ws[i])
    return ge.grouped_swiglu(xs[i], gates, *weights[i], k=K, blk=ge.choose_blocks(N * K, E_, D, F),
                             routed=(ids[i], ws[i]))


os.environ[ge.PAIR_KERNEL_ENV] = "0"
t0, k0, ref = gpu_us(layout_path)
print(f"{N} row(s), {N * K} pairs; floor ~{floor_us:.1f} us at 4.3 TB/s")
print(f"pair layout + kernels A, B: {t0:7.1f} us ({floor_us / t0:.0%} of the floor)  [{k0}]")
tiles = [PairTiles()]
if a.sweep:
    tiles += [PairTiles(bf, bk, bd, w, s) for bf, bk, bd, w, s in itertools.product(
        (16, 32, 64), (64, 128, 256), (256,), (4, 8), (2, 3)) if PairTiles(bf, bk, bd, w, s) != tiles[0]]
best = None
for t in tiles:
    try:
        us, kn, out = gpu_us(lambda i, t=t: pair_swiglu(xs[i], ids[i], ws[i], *weights[i], tiles=t))
    except Exception as e:  # a tiling Triton refuses (registers, shared memory)
        print(f"{t}: failed: {str(e).splitlines()[0][:100]}")
        continue
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))) / jnp.max(jnp.abs(ref.astype(jnp.float32))))
    print(f"pair kernel {t}: {us:7.1f} us ({floor_us / us:.0%})  max diff {err:.2e}  [{kn}]", flush=True)
    if best is None or us < best[0]:
        best = (us, t)
if best:
    print(f"fastest: {best[1]} {best[0]:.1f} us, against {t0:.1f} us")
