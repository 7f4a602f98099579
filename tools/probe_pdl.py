"""Does programmatic dependent launch (PDL) hide a batch-1 kernel's fixed cost under jax 0.11.2's XLA? A probe for
issue 7 (docs/BENCHMARKS.md, twentieth and twenty-first sessions: a batch-1 layer is nine kernels with ~2-3 us of
start-up, first-load latency and tail each).

Chains of L one-row products, alternating [4096, 2048] and [2048, 4096] weights, each kernel reading the previous
one's output, timed from a profiler trace (per product: GPU time, a call's span, the gap between kernels):
- mixjax's Triton gemv; a Triton product on [64, K] buffers that may call `griddepcontrol.launch_dependents` first
  and `griddepcontrol.wait` after its weight loads (inline assembly: jax's Triton backend has no primitive for them);
- a Mosaic GPU product (`gemv_mgpu`: weight rows into shared memory by TMA, then with PDL the trigger and the wait
  before x is read; wgmma on x's row over 63 zero rows) and a mixed Triton / Mosaic chain (--bn);
- a Mosaic GPU kernel that only streams its weight rows (`stream_mgpu`, --stream), the floor of any product kernel,
  optionally with `uses_pdl` put in the custom call's backend config (--mark-pdl);
- --race: whether a Pallas Triton kernel waits at its entry for a predecessor that triggered early.
Found on an H200 (twenty-first session): XLA launches Pallas Triton kernels with PDL and a wait at their entry, and
Mosaic GPU kernels without PDL, so no kernel gets its weight loads ahead of its predecessor's end. A development
tool:
    python tools/probe_pdl.py [--chain 16] [--bn 32,16] [--stream 256,128] [--mark-pdl] [--race] [--check]
--check runs the Mosaic product in Mosaic GPU's interpreter on small shapes against numpy (any machine)."""
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


SBK = 256  # elements of K per TMA copy in stream_mgpu


def stream_mgpu(x, w, *, programs: int, pdl: bool, interpret: bool = False):
    """What PDL can buy a kernel that streams a weight, with no arithmetic in the way: program j copies its rows of w
    ([N / programs, K], all of K) into shared memory by TMA, then (with `pdl`) lets the next kernel start and waits
    for the previous one, then copies x[j] ([2, 8, SBK]: the previous kernel's output) and the first 8 rows x SBK of
    its weight tile to out[j]. So each kernel reads its predecessor's output only after the wait, and the weight
    copies, which depend on nothing, are in flight from the program's start."""
    n, k_dim = w.shape
    bn, steps = n // programs, k_dim // SBK
    assert x.shape == (programs, 2, 8, SBK) and n % programs == 0 and k_dim % SBK == 0 and bn >= 8, (x.shape, w.shape)

    def kernel(x_gmem, w_gmem, o_gmem, w_smem, x_smem, w_bars, x_bar):
        j = lax.axis_index("j")
        for t in range(steps):
            plgpu.copy_gmem_to_smem(w_gmem.at[pl.ds(j * bn, bn), pl.ds(t * SBK, SBK)], w_smem.at[t], w_bars.at[t])
        if pdl and not interpret:
            plgpu.griddepcontrol_launch_dependents()
            plgpu.griddepcontrol_wait()
        plgpu.copy_gmem_to_smem(x_gmem.at[j], x_smem.at[0], x_bar.at[0])
        plgpu.barrier_wait(x_bar.at[0])
        for t in range(steps):
            plgpu.barrier_wait(w_bars.at[t])
        plgpu.copy_smem_to_gmem(x_smem.at[0, 0], o_gmem.at[j, 0])
        plgpu.copy_smem_to_gmem(w_smem.at[steps - 1, pl.ds(0, 8)], o_gmem.at[j, 1])
        plgpu.wait_smem_to_gmem(0)

    f = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(programs,), grid_names=("j",),
        scratch_types=[plgpu.SMEM((steps, bn, SBK), w.dtype), plgpu.SMEM((1, 2, 8, SBK), x.dtype),
                       plgpu.Barrier(num_arrivals=1, num_barriers=steps), plgpu.Barrier(num_arrivals=1, num_barriers=1)],
        interpret=plgpu.InterpretGPUParams() if interpret else None)
    return f(x, w)


def _triton_kernel(x_ref, w_ref, o_ref, *, bn: int, trigger: bool, wait: bool = False):
    """Program i: columns [i * bn, (i + 1) * bn) of x[0] @ w.T into row 0 of o, zeros into rows 1-63 of them.
    `trigger`: griddepcontrol.launch_dependents first (the next kernel may start); `wait`: griddepcontrol.wait after
    the weight loads are issued and before x (the previous kernel's output) is read. jax's Triton backend has no
    primitive for either, so both are inline assembly; the wait's result (a zero) indexes x's row, so that x's load
    cannot move above it, and its input is the weight tile's first column, so that it cannot move above their loads."""
    from jax.experimental.pallas import triton as pltriton

    row0 = pl.program_id(0) * bn
    acc = jnp.zeros((bn,), jnp.float32)
    if trigger:
        acc = pltriton.elementwise_inline_asm("griddepcontrol.launch_dependents;\n\tmov.b32 $0, $1;", args=[acc],
                                              constraints="=r,r", pack=1,
                                              result_shape_dtypes=[jax.ShapeDtypeStruct((bn,), jnp.float32)])[0]
    w = w_ref[pl.ds(row0, bn), :].astype(jnp.float32)
    row = 0
    if wait:
        first = lax.bitcast_convert_type(w_ref[pl.ds(row0, bn), 0].astype(jnp.float32), jnp.int32)
        zero = pltriton.elementwise_inline_asm("griddepcontrol.wait;\n\tand.b32 $0, $1, 0;", args=[first],
                                               constraints="=r,r", pack=1,
                                               result_shape_dtypes=[jax.ShapeDtypeStruct((bn,), jnp.int32)])[0]
        row = jnp.max(zero)
    acc += jnp.sum(w * x_ref[row, :].astype(jnp.float32)[None, :], axis=1)
    top = lax.broadcasted_iota(jnp.int32, (ROWS, bn), 0) == 0
    o_ref[:, pl.ds(row0, bn)] = jnp.where(top, acc[None, :], 0.0).astype(o_ref.dtype)


def gemv_triton(x, w, *, trigger: bool, wait: bool = False, bn: int = 4):
    """The probe's Triton one-row product on [64, K] buffers (row 0 read, rows 1-63 of the output zero), so that it
    chains with gemv_mgpu without a copy between; `trigger` and `wait` as in _triton_kernel."""
    from jax.experimental.pallas import triton as pltriton

    n = w.shape[0]
    return pl.pallas_call(functools.partial(_triton_kernel, bn=bn, trigger=trigger, wait=wait),
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
    x = rng.randn(8, 2, 8, SBK).astype(np.float32)
    w = rng.randn(128, 2 * SBK).astype(np.float32)
    got = np.asarray(stream_mgpu(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), programs=8, pdl=True,
                                 interpret=True), np.float32)
    xb, wb = (np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32) for a in (x, w))
    print(f"interpreted weight stream: out[j] = (x[j][0], its last weight tile's first 8 rows): "
          f"{np.array_equal(got[:, 0], xb[:, 0]) and all(np.array_equal(got[j, 1], wb[j * 16:j * 16 + 8, SBK:]) for j in range(8))}")
    S = jax.ShapeDtypeStruct
    for (n, k_dim), bn in (((4096, 2048), 32), ((2048, 4096), 32)):
        for pdl in (False, True):
            text = jax.jit(functools.partial(gemv_mgpu, bn=bn, pdl=pdl)).trace(
                S((ROWS, k_dim), jnp.bfloat16), S((n, k_dim), jnp.bfloat16)).lower(
                lowering_platforms=("cuda",)).as_text()
            print(f"lowered for CUDA: w [{n}, {k_dim}], bn {bn}, pdl={pdl}: mosaic_gpu call "
                  f"{'mosaic_gpu' in text}, griddepcontrol {'griddepcontrol' in text}")


def chain_seconds(step, x, ws, reps=10):
    """A chain over ws (each product reading the previous output; step(y, w, i) makes product i) from a profiler
    trace: GPU seconds per product (kernel times summed), the span per product (one call's first start to its last
    end, median over the calls), the median gap from a kernel's end to the next one's start, the fraction of those
    gaps below zero (the next kernel started before this one ended: PDL at work), the kernels' names, the output."""
    from gpu_trace import span_us, traced_calls

    def f(x, ws):
        for i, w in enumerate(ws):
            x = step(x, w, i)
        return x

    out, runs = traced_calls(f, (x, ws), reps)
    names = collections.Counter(e["name"][:24] for run in runs for e in run)
    assert all(len(run) == len(ws) for run in runs), dict(names)  # one kernel a product, nothing else on the GPU
    gaps = [b["ts"] - (a["ts"] + a["dur"]) for run in runs for a, b in zip(run, run[1:])]  # < 0: they overlap
    return (sum(e["dur"] for run in runs for e in run) / (reps * len(ws)) * 1e-6,
            float(np.median([span_us(run) for run in runs])) / len(ws) * 1e-6, float(np.median(gaps)) * 1e-6,
            sum(g < 0 for g in gaps) / len(gaps), dict(names), out)


def race_test(calls: int = 20, spin: int = 200_000):
    """Does XLA make a Pallas Triton kernel wait for its predecessor when that predecessor lets it start early? The
    producer calls griddepcontrol.launch_dependents first, spins, then writes x + 1; the consumer (no wait of its
    own) copies that. Each call has a new x: a consumer that read early would copy the previous call's value."""
    from jax.experimental.pallas import triton as pltriton

    def producer(x_ref, o_ref):
        t = pltriton.elementwise_inline_asm("griddepcontrol.launch_dependents;\n\tmov.b32 $0, $1;",
                                            args=[x_ref[...]], constraints="=r,r", pack=1,
                                            result_shape_dtypes=[jax.ShapeDtypeStruct((128,), jnp.float32)])[0]
        t = lax.fori_loop(0, spin, lambda i, v: v * 1.0000001 + 1e-9, t * 0.0 + 1.0)  # ~spin FMAs of delay
        o_ref[...] = x_ref[...] + jnp.minimum(t, 1.0)  # x + 1 (t >= 1)

    def consumer(y_ref, o_ref):
        o_ref[...] = y_ref[...]

    shape = jax.ShapeDtypeStruct((128,), jnp.float32)

    @jax.jit
    def f(x):
        y = pl.pallas_call(producer, out_shape=shape, name="producer")(x)
        return pl.pallas_call(consumer, out_shape=shape, name="consumer")(y)

    bad = 0
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d):
        for c in range(calls):
            out = np.asarray(f(jnp.full((128,), float(c), jnp.float32)))
            bad += int(not np.all(out == c + 1))
    from gpu_trace import gpu_kernels
    ks = [e for e in gpu_kernels(d) if e["name"].startswith(("producer", "consumer"))]
    pairs = [(a, b) for a, b in zip(ks, ks[1:]) if a["name"].startswith("producer") and b["name"].startswith("consumer")]
    early = [a["ts"] + a["dur"] - b["ts"] for a, b in pairs]  # > 0: the consumer started before the producer ended
    print(f"race test: {bad} of {calls} calls read a stale value; producer {np.median([a['dur'] for a, _ in pairs]):.1f}"
          f" us, consumer {np.median([b['dur'] for _, b in pairs]):.1f} us, consumer started "
          f"{np.median(early):.1f} us before the producer ended (median of {len(pairs)})")


_MARK_PDL = [False]  # set while a PDL variant is traced and lowered, with --mark-pdl


def mark_mosaic_calls_pdl():
    """jax 0.11.2 marks a PDL kernel's module (`mosaic_gpu.uses_pdl`) but puts nothing in the custom call's backend
    config, where XLA looks for `uses_pdl` before launching a custom call with PDL. This adds it (a probe's patch of
    jax's lowering, for the variants traced while _MARK_PDL[0] is set)."""
    from jax._src.interpreters import mlir as jax_mlir
    from jaxlib.mlir import ir
    plain = jax_mlir.custom_call

    def custom_call(call_target_name, *args, backend_config=None, **kw):
        if call_target_name == "mosaic_gpu_v2" and _MARK_PDL[0] and isinstance(backend_config, dict):
            backend_config = dict(backend_config, uses_pdl=ir.BoolAttr.get(True))
        return plain(call_target_name, *args, backend_config=backend_config, **kw)
    jax_mlir.custom_call = custom_call


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chain", type=int, default=16)
    ap.add_argument("--bn", default="32,16")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--race", action="store_true")
    ap.add_argument("--mark-pdl", action="store_true", help="put uses_pdl in the Mosaic calls' backend config")
    ap.add_argument("--stream", default="", help="programs for stream_mgpu chains, e.g. 256,128 (then only those)")
    a = ap.parse_args()
    if a.race:
        race_test()
        return
    if a.mark_pdl:
        mark_mosaic_calls_pdl()
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
          f"time per product (kernel times summed / products), span (a call's first start to last end / products, "
          f"median of the calls), median gap between kernels")
    ref = None
    if a.stream:
        for programs in map(int, a.stream.split(",")):
            xs = jnp.zeros((programs, 2, 8, SBK), jnp.bfloat16)
            kb = max(w.size * 2 // programs for w in ws[:2]) // 1024
            for pdl in (False, True):
                _MARK_PDL[0] = pdl
                t, span, gap, overlapped, names, out = chain_seconds(
                    lambda y, w, i, p=programs, d=pdl: stream_mgpu(y, w, programs=p, pdl=d), xs, ws)
                print(f"  Mosaic weight stream, {programs} programs ({kb} KB of weight each), pdl={pdl}: "
                      f"{t * 1e6:.2f} us, span {span * 1e6:.2f} us, gap {gap * 1e6:+.2f} us "
                      f"(overlapping {overlapped:.0%}); {mb / span / 1e6:.2f} TB/s by the span  {names}")
        return

    def show(name, r):  # the chain's output against the first Triton [64, K] chain's (no PDL): a race would differ
        nonlocal ref
        t, span, gap, overlapped, names, out = r
        out = np.asarray(out[0], np.float32)
        if ref is None and name.startswith("Triton gemv on"):
            ref = out
        err = "" if ref is None else f", max |out - ref| / max |ref| {np.max(np.abs(out - ref)) / np.max(np.abs(ref)):.1e}"
        print(f"  {name}: {t * 1e6:.2f} us, span {span * 1e6:.2f} us, gap {gap * 1e6:+.2f} us "
              f"(overlapping {overlapped:.0%}){err}  {names}")
    show("Triton gemv (mixjax.kernels.gemv)", chain_seconds(lambda y, w, i: gemv(y[:1], w).reshape(1, -1), x64[:1], ws))
    variants = [(f"Triton gemv on [64, K] buffers, trigger={trig}, wait={wt}",
                 lambda y, w, i, trig=trig, wt=wt: gemv_triton(y, w, trigger=trig, wait=wt))
                for trig, wt in ((False, False), (True, False), (False, True), (True, True))]
    for bn in [int(b) for b in a.bn.split(",") if b]:  # --bn "": the Triton chains only
        for pdl in (False, True):
            variants.append((f"Mosaic gemv bn={bn} (at most {W_SMEM_BYTES // 8192} for K 4096) pdl={pdl}",
                             lambda y, w, i, bn=bn, pdl=pdl: gemv_mgpu(y, w, bn=bn, pdl=pdl)))
        for pdl in (False, True):  # the mixed chain: a Triton kernel (triggering early), then a Mosaic one
            variants.append((f"Triton then Mosaic (bn={bn}), trigger and pdl={pdl}",
                             lambda y, w, i, bn=bn, pdl=pdl: gemv_triton(y, w, trigger=pdl) if i % 2 == 0
                             else gemv_mgpu(y, w, bn=bn, pdl=pdl)))
    for name, step in variants:
        try:
            show(name, chain_seconds(step, x64, ws))
        except Exception as e:  # noqa: BLE001 - a variant the compiler refuses is a result too
            print(f"  {name}: failed: {type(e).__name__}: {str(e)[:300]}")


if __name__ == "__main__":
    main()
