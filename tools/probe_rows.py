"""The grouped experts' copy of x on a GPU: XLA's gather of x's padded, expert-sorted rows (grouped_experts.
gather_rows_xla) against the Pallas row kernel (gather_rows) at several tiles, and XLA's combine of the expert outputs
(grouped_experts.combine), for Qwen3-30B-A3B expert shapes. A Pallas combine kernel, measured with this tool on
2026-12-01, was slower than XLA's at every tiling and was removed (docs/evidence/probe-rows-h200-2026-12-01.txt).
Device time per op from a profiler trace of REPS calls of a jit of the one op, which returns its whole output (a
chain of ops in one jit let XLA slice an op down to the rows the chain used, and merge identical calls).
A development tool:
    python tools/probe_rows.py 2048,8192"""
import itertools, sys, tempfile
import jax, jax.numpy as jnp, numpy as np
from mixjax.kernels import grouped_experts as ge
from mixjax.bench.experts import random_gates
from gpu_trace import gpu_kernels

E, K, D, F, REPS = 128, 8, 2048, 768, 4


def kernel_us(op, *args):
    """GPU kernel microseconds of one op(*args): the trace of REPS calls of its jit, over REPS."""
    f = jax.jit(op)
    jax.block_until_ready(f(*args))
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(REPS):
            jax.block_until_ready(f(*args))
    return sum(e["dur"] for e in gpu_kernels(d)) / REPS


key = jax.random.PRNGKey(0)
rng = np.random.RandomState(0)
for n in map(int, sys.argv[1].split(",")):
    g = jnp.asarray(random_gates(rng, n, E, K)); x = jax.random.normal(key, (n, D), jnp.bfloat16)
    blk = ge.choose_blocks(n * K, E, D, F)
    lay = ge.group_layout(g, K, blk.bm); m = lay.src_row.shape[0]
    used = np.repeat(np.asarray(lay.block_expert) >= 0, blk.bm)
    ref = np.asarray(ge.gather_rows_xla(x, lay).astype(jnp.float32))
    print(f"n={n} bm={blk.bm}: padded rows {m}, {used.sum()} in used blocks; "
          f"XLA gather {kernel_us(ge.gather_rows_xla, x, lay):.1f} us", flush=True)
    for r, c, w in itertools.product((16, 32), (256, 512, 1024), (4, 8)):
        t = ge.RowTiles(r, c, w)
        op = lambda x, lay, t=t: ge.gather_rows(x, lay, blk.bm, tiles=t)
        ok = np.array_equal(np.asarray(op(x, lay).astype(jnp.float32))[used], ref[used])
        print(f"   gather_rows {t}: {kernel_us(op, x, lay):7.1f} us  equal={ok}", flush=True)
    y = jax.random.normal(key, (m, D), jnp.bfloat16)
    print(f"   XLA combine {kernel_us(lambda y, lay: ge.combine(y, lay, y.dtype), y, lay):.1f} us", flush=True)
