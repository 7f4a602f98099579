"""Does programmatic dependent launch (PDL) hide a batch-1 kernel's fixed cost under jax 0.11.2's XLA? A probe for the
next step of issue 7 (docs/BENCHMARKS.md, twentieth session: a batch-1 layer is nine kernels with ~2-3 us of
start-up, first-load latency and tail each).

Only Mosaic GPU kernels can take PDL in jax 0.11.2 (a kernel that calls `plgpu.griddepcontrol_wait` is launched
with programmatic stream serialisation). So this is a one-row product (gemv) in Mosaic GPU: each program loads its
bn weight rows (all of K) into shared memory with TMA, then (with --pdl) lets the next kernel start
(`griddepcontrol_launch_dependents`) and waits for the previous one (`griddepcontrol_wait`) before it reads x, the
previous kernel's output; the weight copies are in flight meanwhile. x is the row on top of 63 zero rows (wgmma's
64-row tile), read step by step through a pipeline. A chain of L such products, alternating [4096, 2048] and
[2048, 4096] weights (each kernel reading the previous one's output), is timed from a profiler trace with and
without PDL, beside the same chain of mixjax's Triton gemv kernel, and a mixed chain: a Triton product that calls
`griddepcontrol.launch_dependents` first (inline assembly: jax's Triton backend has no primitive for it), then a
Mosaic one with PDL, as a batch-1 layer would have while only some of its kernels are Mosaic. Not yet run on a GPU
(written when the session's device time was spent). A development tool:
    python tools/probe_pdl.py [--chain 16] [--bn 32,16] [--check]
--check runs the kernel in Mosaic GPU's interpreter on small shapes against numpy (any machine)."""
import argparse, collections, functools, tempfile
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS = 64  # wgmma's tile rows: the row, then zeros
BK = 64  # elements of K per step: one 128-byte swizzled row of bf16
W_SMEM_BYTES = 128 * 1024  # shared memory for a program's weight rows (of ~228 KB)


def _swizzled(cols: int, dtype):
    swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def gemv_mgpu(x, w, *, bn: int, pdl: bool, stages: int = 4, interpret: bool = False):
    """x [64, K] (the row on top of zeros), w [N, K] out-major -> [64, N] = x @ w.T in x's dtype, float32
    accumulation; program j computes columns [j * bn, (j + 1) * bn) (bn lowered until its rows fit in
    W_SMEM_BYTES)."""
    rows, k_dim = x.shape
    n = w.shape[0]
    bn = min(bn, W_SMEM_BYTES // (k_dim * w.dtype.itemsize))  # the weight tile must fit in shared memory
    steps = k_dim // BK
    assert rows == ROWS and k_dim % BK == 0 and n % bn == 0, (x.shape, w.shape, bn)

    per = -(-steps // 32)  # copies per barrier (32 barriers at most); each barrier is waited for once
    assert steps % per == 0, (steps, per)

    def kernel(x_gmem, w_gmem, o_gmem, w_smem, w_bars, out_smem):
        j = lax.axis_index("j")
        for t in range(steps):  # the whole weight tile: it depends on nothing computed before
            plgpu.copy_gmem_to_smem(w_gmem.at[pl.ds(j * bn, bn), pl.ds(t * BK, BK)], w_smem.at[t],
                                    w_bars.at[t // per])
        if pdl and not interpret:  # (the interpreter runs one kernel at a time: nothing to wait for)
            plgpu.griddepcontrol_launch_dependents()
            plgpu.griddepcontrol_wait()  # x is the previous kernel's output

        def product(acc_ref):
            def step(idx, x_tile):
                t = idx[0]

                @pl.when(t % per == 0)
                def _():
                    plgpu.barrier_wait(w_bars.at[t // per])

                plgpu.wgmma(acc_ref, x_tile, w_smem.at[t].transpose((1, 0)))
                plgpu.wgmma_wait(0)

            plgpu.emit_pipeline(
                step, grid=(steps,), max_concurrent_steps=stages,
                in_specs=[plgpu.BlockSpec((ROWS, BK), lambda t: (0, t), transforms=_swizzled(BK, x.dtype))],
            )(x_gmem)
            return acc_ref[...]

        y = pl.run_scoped(product, plgpu.ACC((ROWS, bn), jnp.float32))
        out_smem[...] = y.astype(out_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, o_gmem.at[:, pl.ds(j * bn, bn)])
        plgpu.wait_smem_to_gmem(0)

    f = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((ROWS, n), x.dtype), grid=(n // bn,), grid_names=("j",),
        scratch_types=[plgpu.SMEM((steps, bn, BK), w.dtype, transforms=_swizzled(BK, w.dtype)),
                        plgpu.Barrier(num_arrivals=per, num_barriers=steps // per),
                        plgpu.SMEM((ROWS, bn), x.dtype, transforms=_swizzled(bn, x.dtype))],
        interpret=plgpu.InterpretGPUParams() if interpret else None)
    return f(x, w)


def _triton_kernel(x_ref, w_ref, o_ref, *, bn: int, trigger: bool):
    """Program i: columns [i * bn, (i + 1) * bn) of x[0] @ w.T into row 0 of o, zeros into rows 1-63 of them."""
    from jax.experimental.pallas import triton as pltriton

    row0 = pl.program_id(0) * bn
    acc = jnp.zeros((bn,), jnp.float32)
    if trigger:  # lets a PDL kernel after this one start (its griddepcontrol.wait still waits for all of this one)
        acc = pltriton.elementwise_inline_asm("griddepcontrol.launch_dependents;\n\tmov.b32 $0, $1;", args=[acc],
                                              constraints="=r,r", pack=1,
                                              result_shape_dtypes=[jax.ShapeDtypeStruct((bn,), jnp.float32)])[0]
    w = w_ref[pl.ds(row0, bn), :].astype(jnp.float32)
    acc += jnp.sum(w * x_ref[0, :].astype(jnp.float32)[None, :], axis=1)
    top = lax.broadcasted_iota(jnp.int32, (ROWS, bn), 0) == 0
    o_ref[:, pl.ds(row0, bn)] = jnp.where(top, acc[None, :], 0.0).astype(o_ref.dtype)


def gemv_triton(x, w, *, trigger: bool, bn: int = 4):
    """The probe's Triton one-row product on [64, K] buffers (row 0 read, rows 1-63 of the output zero), so that it
    chains with gemv_mgpu without a copy between; `trigger` calls griddepcontrol.launch_dependents first."""
    from jax.experimental.pallas import triton as pltriton

    n = w.shape[0]
    return pl.pallas_call(functools.partial(_triton_kernel, bn=bn, trigger=trigger),
                          out_shape=jax.ShapeDtypeStruct((ROWS, n), x.dtype), grid=(n // bn,),
                          compiler_params=pltriton.CompilerParams(num_warps=8, num_stages=1), name="gemv_triton")(x, w)


def check():
    """The kernel in the interpreter against numpy, with and without PDL."""
    rng = np.random.RandomState(0)
    for k_dim, n, pdl in ((256, 64, False), (256, 64, True), (4096, 32, True)):  # 4096: two copies a barrier
        x = np.zeros((ROWS, k_dim), np.float32)
        x[0] = rng.randn(k_dim)
        w = rng.randn(n, k_dim).astype(np.float32)
        want = (x.astype(jnp.bfloat16).astype(np.float32) @ w.astype(jnp.bfloat16).astype(np.float32).T)[0]
        got = gemv_mgpu(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), bn=32, pdl=pdl, interpret=True)
        err = float(np.max(np.abs(np.asarray(got, np.float32)[0] - want)) / np.max(np.abs(want)))
        print(f"interpreted, K {k_dim}, N {n}, pdl={pdl}: max |err| / max |y| = {err:.2e}; zero rows stay zero: "
              f"{bool(np.all(np.asarray(got, np.float32)[1:] == 0))}")
    S = jax.ShapeDtypeStruct
    for (n, k_dim), bn in (((4096, 2048), 32), ((2048, 4096), 32)):
        for pdl in (False, True):
            text = jax.jit(functools.partial(gemv_mgpu, bn=bn, pdl=pdl)).trace(
                S((ROWS, k_dim), jnp.bfloat16), S((n, k_dim), jnp.bfloat16)).lower(
                lowering_platforms=("cuda",)).as_text()
            print(f"lowered for CUDA: w [{n}, {k_dim}], bn {bn}, pdl={pdl}: mosaic_gpu call "
                  f"{'mosaic_gpu' in text}, griddepcontrol {'griddepcontrol' in text}")


def chain_seconds(step, x, ws, reps=5):
    """GPU seconds per product of a chain over ws (each reading the previous output; step(y, w, i) makes product
    i), from a profiler trace."""
    def f(x, ws):
        for i, w in enumerate(ws):
            x = step(x, w, i)
        return x

    f = jax.jit(f)
    jax.block_until_ready(f(x, ws))
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(reps):
            jax.block_until_ready(f(x, ws))
    from gpu_trace import gpu_kernels
    ks = gpu_kernels(d)
    lo, hi = min(e["ts"] for e in ks), max(e["ts"] + e["dur"] for e in ks)
    names = collections.Counter(e["name"][:24] for e in ks)
    calls = reps * len(ws)
    return sum(e["dur"] for e in ks) / calls * 1e-6, (hi - lo) / calls * 1e-6, dict(names)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chain", type=int, default=16)
    ap.add_argument("--bn", default="32,16")
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    if a.check:
        check()
        return
    from mixjax.kernels.gemv import gemv
    key = jax.random.key(0)
    shapes = [(4096, 2048), (2048, 4096)]
    ws = [jax.random.normal(jax.random.fold_in(key, i), shapes[i % 2], jnp.bfloat16) * 0.02 for i in range(a.chain)]
    mb = sum(w.size * 2 for w in ws) / len(ws) / 1e6
    x64 = jnp.zeros((ROWS, 2048), jnp.bfloat16).at[0].set(1.0)
    print(f"{jax.devices()[0].device_kind}: a chain of {a.chain} one-row products, {mb:.1f} MB of weight each; GPU "
          f"time per product (sum of kernel times / products) and span (first start to last end / products)")
    t, span, names = chain_seconds(lambda y, w, i: gemv(y[:1], w).reshape(1, -1), x64[:1], ws)
    print(f"  Triton gemv (mixjax.kernels.gemv): {t * 1e6:.2f} us, span {span * 1e6:.2f} us  {names}")
    variants = [(f"Triton gemv on [64, K] buffers, trigger={trig}",
                 lambda y, w, i, trig=trig: gemv_triton(y, w, trigger=trig)) for trig in (False, True)]
    for bn in map(int, a.bn.split(",")):
        for pdl in (False, True):
            variants.append((f"Mosaic gemv bn={bn} (at most {W_SMEM_BYTES // 8192} for K 4096) pdl={pdl}",
                             lambda y, w, i, bn=bn, pdl=pdl: gemv_mgpu(y, w, bn=bn, pdl=pdl)))
        for pdl in (False, True):  # the mixed chain: a Triton kernel (triggering early), then a Mosaic one
            variants.append((f"Triton then Mosaic (bn={bn}), trigger and pdl={pdl}",
                             lambda y, w, i, bn=bn, pdl=pdl: gemv_triton(y, w, trigger=pdl) if i % 2 == 0
                             else gemv_mgpu(y, w, bn=bn, pdl=pdl)))
    for name, step in variants:
        try:
            t, span, names = chain_seconds(step, x64, ws)
            print(f"  {name}: {t * 1e6:.2f} us, span {span * 1e6:.2f} us  {names}")
        except Exception as e:  # noqa: BLE001 - a variant the compiler refuses is a result too
            print(f"  {name}: failed: {type(e).__name__}: {str(e)[:300]}")


if __name__ == "__main__":
    main()
