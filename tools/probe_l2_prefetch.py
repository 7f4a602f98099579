"""Can a batch-1 projection read its weight from L2 instead of HBM? A probe for the idle HBM of a batch-1 decode
layer (its attention, router and top-k kernels are latency-bound): a kernel that only loads a weight (with an L2
eviction hint) runs first, then the gemv kernel; optionally a 75 MB stream between them (the experts of one token)
with an evict-first hint, to see whether the prefetched weight survives it. GPU time of each kernel from a profiler
trace, medians over the repetitions; L2 is flushed by reading 1 GB before each sequence. A development tool:
    python tools/probe_l2_prefetch.py [--reps N]"""
import argparse, collections, functools, statistics, tempfile
import jax, jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from mixjax.kernels import triton_params
from mixjax.kernels.gemv import gemv
from gpu_trace import gpu_kernels

ap = argparse.ArgumentParser(); ap.add_argument("--reps", type=int, default=10); a = ap.parse_args()


def _tiles(w, programs: int) -> tuple[int, int]:
    """(rows, columns per load) of each of `programs` programs loading all of w [R, C] (R divisible by programs)."""
    rb = w.shape[0] // programs
    return rb, min(w.shape[1], 8192 // rb * 2)


def _load_rows(w_ref, o_ref, p, out, *, rb: int, cb: int, policy: str | None):
    """Rows [p * rb, (p + 1) * rb) of w loaded with the eviction hint, their sum stored at o_ref[out] (used, so
    that the loads stay)."""
    acc = jnp.zeros((rb, cb), jnp.float32)
    for j in range(w_ref.shape[1] // cb):
        acc += pltriton.load(w_ref.at[pl.ds(p * rb, rb), pl.ds(j * cb, cb)],
                             eviction_policy=policy).astype(jnp.float32)
    o_ref[pl.ds(out, 1)] = jnp.sum(acc).reshape(1)


def _load_kernel(w_ref, o_ref, *, rb: int, cb: int, policy: str | None):
    pid = pl.program_id(0)
    _load_rows(w_ref, o_ref, pid, pid, rb=rb, cb=cb, policy=policy)


@functools.partial(jax.jit, static_argnames=("policy", "programs", "name"))
def load_all(w, *, policy, programs, name):
    """Every element of w [R, C] loaded once by `programs` programs (R divisible by it), with the eviction hint."""
    rb, cb = _tiles(w, programs)
    return pl.pallas_call(functools.partial(_load_kernel, rb=rb, cb=cb, policy=policy),
                          out_shape=jax.ShapeDtypeStruct((programs,), jnp.float32), grid=(programs,),
                          compiler_params=triton_params(8, 1), name=name)(w)


def _chain_kernel(w_ref, o_ref, *, rb: int, cb: int, iters: int, pf: bool):
    """Program 0: a serial chain of dependent operations (a latency-bound kernel: the router's top-k, say); the
    others, with `pf`, load rows of w with evict_last (the prefetch it would host)."""
    pid = pl.program_id(0)

    @pl.when(pid == 0)
    def _():
        v = lax.fori_loop(0, iters, lambda i, v: jnp.exp(-v) * 0.5 + 0.1, jnp.zeros((16,), jnp.float32))
        o_ref[pl.ds(0, 1)] = jnp.sum(v).reshape(1)

    if pf:
        pl.when(pid > 0)(lambda: _load_rows(w_ref, o_ref, pid - 1, pid, rb=rb, cb=cb, policy="evict_last"))


@functools.partial(jax.jit, static_argnames=("iters", "programs", "pf"))
def chain(w, *, iters, programs, pf):
    rb, cb = _tiles(w, programs)
    return pl.pallas_call(functools.partial(_chain_kernel, rb=rb, cb=cb, iters=iters, pf=pf),
                          out_shape=jax.ShapeDtypeStruct((programs + 1,), jnp.float32), grid=(programs + 1,),
                          compiler_params=triton_params(8, 1), name="chain_pf" if pf else "chain")(w)


flush = jax.jit(lambda b: jnp.sum(b, dtype=jnp.float32))
gemv_j = jax.jit(gemv)
key = jax.random.key(0)
big = jnp.ones((512 * 1024 * 1024,), jnp.bfloat16)  # 1 GB
w_o = jax.random.normal(key, (2048, 4096), jnp.bfloat16)
w_qkv = jax.random.normal(key, (5120, 2048), jnp.bfloat16)
experts = jax.random.normal(key, (18432, 2048), jnp.bfloat16)  # 75.5 MB: one token's 8 experts
x_o = jnp.ones((1, 4096), jnp.bfloat16); x_qkv = jnp.ones((1, 2048), jnp.bfloat16)


def pf(w, policy, programs=256, tag=""):
    return lambda: load_all(w, policy=policy, programs=programs, name=f"load_{policy or 'normal'}{tag}")


SEQS = {
    "o cold": [lambda: gemv_j(x_o, w_o)],
    "o after load (evict_last, 256 progs)": [pf(w_o, "evict_last"), lambda: gemv_j(x_o, w_o)],
    "o after load (normal, 256 progs)": [pf(w_o, None), lambda: gemv_j(x_o, w_o)],
    "o after load (evict_last, 64 progs)": [pf(w_o, "evict_last", 64), lambda: gemv_j(x_o, w_o)],
    "qkv cold": [lambda: gemv_j(x_qkv, w_qkv)],
    "qkv after load": [pf(w_qkv, "evict_last", 320), lambda: gemv_j(x_qkv, w_qkv)],
    "qkv after load, 75 MB evict_first stream": [pf(w_qkv, "evict_last", 320), pf(experts, "evict_first", 1152, "_s"),
                                                 lambda: gemv_j(x_qkv, w_qkv)],
    "qkv after load, 75 MB normal stream": [pf(w_qkv, "evict_last", 320), pf(experts, None, 1152, "_s"),
                                            lambda: gemv_j(x_qkv, w_qkv)],
    "qkv after normal load, 75 MB normal stream": [pf(w_qkv, None, 320), pf(experts, None, 1152, "_s"),
                                                   lambda: gemv_j(x_qkv, w_qkv)],
    "o+qkv after load, 75 MB evict_first stream": [pf(w_o, "evict_last"), pf(w_qkv, "evict_last", 320),
                                                   pf(experts, "evict_first", 1152, "_s"),
                                                   lambda: gemv_j(x_o, w_o), lambda: gemv_j(x_qkv, w_qkv)],
    "o after a chain of 400 (no prefetch)": [lambda: chain(w_o, iters=400, programs=256, pf=False),
                                             lambda: gemv_j(x_o, w_o)],
    "o after a chain of 400 hosting its prefetch": [lambda: chain(w_o, iters=400, programs=256, pf=True),
                                                    lambda: gemv_j(x_o, w_o)],
    "o after a chain of 1000 hosting its prefetch": [lambda: chain(w_o, iters=1000, programs=256, pf=True),
                                                     lambda: gemv_j(x_o, w_o)],
    "chain of 1000 alone": [lambda: chain(w_o, iters=1000, programs=256, pf=False)],
}

print(f"device: {jax.devices()[0].device_kind}; weights o {w_o.nbytes / 1e6:.1f} MB, qkv {w_qkv.nbytes / 1e6:.1f} MB, "
      f"stream {experts.nbytes / 1e6:.1f} MB")
for name, seq in SEQS.items():
    def run():
        jax.block_until_ready(flush(big))
        out = [f() for f in seq]
        jax.block_until_ready(out)
    run(); run()
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(a.reps):
            run()
    per = collections.defaultdict(list)
    for e in gpu_kernels(d):
        if "reduce" in e["name"] or "Memcpy" in e["name"] or "memcpy" in e["name"]:
            continue
        per[e["name"][:32]].append(e["dur"])
    cells = []
    for k, v in per.items():
        n = len(v) // a.reps
        for i in range(n):  # a kernel that runs twice per sequence: each call on its own
            cells.append(f"{k}{'#' + str(i) if n > 1 else ''} {statistics.median(v[i::n]):.2f} us")
    print(f"{name:48s} " + " | ".join(cells))
