"""Can one persistent kernel beat a chain of kernels at batch 1? A probe for issue 7 (docs/BENCHMARKS.md,
twenty-first session). A chain of one-row products, each reading the previous one's output, as one Pallas Triton
kernel: G programs (at most one per SM, all resident at once), each computing its rows of every product in turn,
with a grid-wide barrier between products (an atomic counter per product, spun on). Before it waits at a barrier a
program loads the first chunk of its rows of the next weight, which depends on nothing: so the next product's first
bytes are in flight while the slowest programs finish the current one, which a chain of kernels cannot do here
(Pallas Triton kernels wait for their predecessor at entry; Mosaic GPU kernels are not launched with PDL in jax
0.11.2: tools/probe_pdl.py). Timed from a profiler trace against the same chain of mixjax's Triton gemv kernels,
and checked against it. Found on an H200 (twenty-first session): 7.3 us a 16.8 MB product at best (32 warps, K in
chunks of 1024) against 6.0 for the chain of kernels; 5.7 without the barriers (a wrong result, timed to price
them). A development tool, for a GPU (programs must all be resident: more than one a SM may hang):
    python tools/probe_persistent.py [--chain 16] [--programs 128] [--kc 512] [--warps 8] [--no-barrier]"""
import argparse, functools
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

NMAX = 4096


def _kernel(x_ref, *refs, shapes, programs: int, kc: int, prefetch: bool, barrier: bool = True):
    """kc: elements of K per weight load (0: all of K, the whole tile of a product in one load). barrier=False
    leaves the barriers out: a wrong result (products read outputs not yet written), timed to price the barriers."""
    n_layers = len(shapes)
    w_refs, count_in, y_ref, count_ref = refs[:n_layers], refs[n_layers], refs[n_layers + 1], refs[n_layers + 2]
    del count_in  # the same buffer as count_ref (aliased): zeros at the start
    p = pl.program_id(0)

    def chunk(i):
        return kc or shapes[i][1]

    def weight_chunk(i, c):
        n, _ = shapes[i]
        r, kc = n // programs, chunk(i)
        return w_refs[i][pl.ds(p * r, r), pl.ds(c * kc, kc)].astype(jnp.float32)

    def x_chunk(i, c):
        kc = chunk(i)
        if i == 0:
            return x_ref[pl.ds(c * kc, kc)].astype(jnp.float32)
        # written by other programs of this kernel: past L1 (not coherent between SMs)
        return pltriton.load(y_ref.at[i - 1, pl.ds(c * kc, kc)], volatile=True)  # (".cg" fails in jax 0.11.2: a KeyError)

    first = None
    for i, (n, k) in enumerate(shapes):
        r = n // programs
        if i > 0 and barrier:  # the grid-wide barrier on product i - 1, the first weight chunk of product i already loading
            first = weight_chunk(i, 0) if prefetch else None
            pltriton.debug_barrier()  # every thread's stores of product i - 1 before the release
            arrived = pltriton.atomic_add(count_ref, i - 1, 1) + 1
            lax.while_loop(lambda v: v < programs, lambda v, i=i: pltriton.atomic_add(count_ref, i - 1, 0), arrived)
            pltriton.debug_barrier()
        acc = jnp.zeros((r,), jnp.float32)
        for c in range(k // chunk(i)):
            w = first if (c == 0 and first is not None) else weight_chunk(i, c)
            acc += jnp.sum(w * x_chunk(i, c)[None, :], axis=1)
        y_ref[i, pl.ds(p * r, r)] = acc.astype(jnp.bfloat16).astype(jnp.float32)  # rounded as the gemv's output


def persistent_chain(x, *ws, programs: int, kc: int, prefetch: bool, warps: int = 8, barrier: bool = True):
    """x [K0] bf16, ws [N_i, K_i] (K_{i+1} = N_i) -> the last product's output [N_last] in bf16, each product's
    output rounded to bf16 as a chain of gemv kernels would."""
    shapes = tuple(w.shape for w in ws)
    assert all(n % programs == 0 and k % (kc or k) == 0 for n, k in shapes)
    counts = jnp.zeros((len(ws),), jnp.int32)
    y, _ = pl.pallas_call(
        functools.partial(_kernel, shapes=shapes, programs=programs, kc=kc, prefetch=prefetch, barrier=barrier),
        out_shape=(jax.ShapeDtypeStruct((len(ws), NMAX), jnp.float32), jax.ShapeDtypeStruct(counts.shape, jnp.int32)),
        grid=(programs,), input_output_aliases={len(ws) + 1: 1},
        compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=1), name="persistent_chain")(x, *ws, counts)
    return y[-1, :shapes[-1][0]].astype(jnp.bfloat16)


def timed(f, args, reps=10, names=("persistent_chain", "gemv")):
    """GPU time of one call (median over reps; the first named kernel's start to the last one's end), from a
    profiler trace; the output; the named kernels a call."""
    from gpu_trace import span_us, traced_calls
    out, runs = traced_calls(f, args, reps, keep=lambda name: name.startswith(names))
    return float(np.median([span_us(run) for run in runs])) * 1e-6, out, len(runs[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chain", type=int, default=16)
    ap.add_argument("--programs", default="128")
    ap.add_argument("--kc", default="512", help="elements of K per weight load; 0: all of K")
    ap.add_argument("--warps", default="8")
    ap.add_argument("--no-barrier", action="store_true", help="also time each variant without its barriers")
    a = ap.parse_args()
    from mixjax.kernels.gemv import gemv
    key = jax.random.key(0)
    shapes = [(4096, 2048), (2048, 4096)]
    ws = [jax.random.normal(jax.random.fold_in(key, i), shapes[i % 2], jnp.bfloat16) * 0.02 for i in range(a.chain)]
    x = jax.random.normal(jax.random.fold_in(key, 99), (2048,), jnp.bfloat16)
    mb = sum(w.size * 2 for w in ws) / len(ws) / 1e6

    def chain(x, *ws):
        y = x[None]
        for w in ws:
            y = gemv(y, w).reshape(1, -1)
        return y[0]

    t, ref, per = timed(chain, (x, *ws))
    ref = np.asarray(ref, np.float32)
    print(f"{jax.devices()[0].device_kind}: {a.chain} one-row products of {mb:.1f} MB of weight each, time per product "
          f"(one call's first kernel start to last end / products, median of 10 calls)")
    print(f"  chain of Triton gemv kernels ({per} kernels): {t / a.chain * 1e6:.2f} us, {mb / (t / a.chain) / 1e6:.2f} TB/s")
    for programs in map(int, a.programs.split(",")):
        for kc, warps in [(int(k), int(w)) for k in a.kc.split(",") for w in a.warps.split(",")]:
            for prefetch, barrier in [(False, True), (True, True)] + [(False, False)] * a.no_barrier:
                try:
                    t, out, per = timed(functools.partial(persistent_chain, programs=programs, kc=kc, prefetch=prefetch,
                                                          warps=warps, barrier=barrier), (x, *ws))
                    err = np.max(np.abs(np.asarray(out, np.float32) - ref)) / np.max(np.abs(ref))
                    print(f"  persistent, {programs} programs, {warps} warps, chunks of {kc or 'K'}, prefetch={prefetch}"
                          f"{'' if barrier else ', NO BARRIERS (a wrong result)'}: {t / a.chain * 1e6:.2f} us, {mb / (t / a.chain) / 1e6:.2f} TB/s; "
                          f"max |out - gemv chain| / max |gemv chain| {err:.1e}")
                except Exception as e:  # noqa: BLE001 - a variant the compiler refuses is a result too
                    print(f"  persistent, {programs} programs, {warps} warps, chunks of {kc or 'K'}, prefetch={prefetch}: failed: "
                          f"{type(e).__name__}: {str(e)[:300]}")


if __name__ == "__main__":
    main()
