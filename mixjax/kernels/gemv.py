"""One-row products for batch-1 decode: y_i = (RMSNorm(x) or x) @ W_i^T for one or several weights (a layer's q, k
and v) in one kernel (Pallas, Triton backend; `interpret=True` runs it anywhere).

At batch 1 every projection of a decode step reads its whole weight for one row of work. XLA turns a one-row
product into multiply + reduce (5x too slow); given two rows it makes a split-K GEMM, a reduction of the split
partial sums and a slice back to one row (layers.matmul), and the RMSNorm before it is two more kernels. On an H200
a Qwen3-30B-A3B decode layer spent ~30 us in those ~15 kernels for ~40 MB of weights (2026-12-01).

Here the weight is stored out-major, W [N, K] (Hugging Face's own layout), so each program streams whole rows:
program i computes y[i*bn:(i+1)*bn] from bn contiguous rows of K elements. The input row is small (K <= 8192), so
every program reads all of it and, with `norm`, computes the RMSNorm itself (statistics in float32, the weight
applied in x's dtype, as layers.RMSNorm) instead of a separate kernel writing the normed row. Several weights
that share the input take consecutive ranges of programs of one launch: a 2 MB k or v projection alone is mostly a
kernel's start-up and tail (3.4 us in a batch-1 step for 0.5 us of traffic), but beside q's it fills the same wave.

For the MoE half of a batch-1 layer (models.base.MoE.one_token) the router's product also takes the residual sum
(`add`: h = x + attention output, computed by every program as it reads the row) and writes out the normed row it
read as a 16-row tensor-core tile (`emit`) for the expert kernels: XLA's residual add, norm, pair layout and row
gather were four kernels between the attention and the experts.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mixjax.kernels import pow2_divisor, router, triton_params


# Whether a batch-1 MoE's router product also routes the row in its last program (gemv_many(route=)) instead of the
# router kernel after it; False restores that kernel, for comparisons.
ROUTE_IN_PRODUCT = True


def supported(n: int, k: int, gpu: bool = True) -> bool:
    """Triton tiles powers of two: every program reads the whole input row, so on a GPU K must be one (from 16);
    interpreted, any K with a factor of 16."""
    return n > 0 and k % 16 == 0 and (not gpu or k & (k - 1) == 0)


def tiles(n: int, k: int) -> tuple[int, int, int]:
    """(bn, bk, warps): rows per program, elements of a row per load, warps. A sweep on an H200 (2026-12-01,
    Qwen3-30B-A3B's q/k/o/router shapes, tools/probe_gemv.py --sweep) put 2-4 rows, 2048-element loads and 8
    warps first for every shape, within ~5% of 8 rows and 1024 elements: many programs, few wide loads."""
    return min(4, n & -n), min(2048, k & -k), 8


def _kernel(x_ref, *refs, starts: tuple[int, ...], bn: int, bk: int, eps: float | None, add: bool, emit: int,
            route: tuple[int, bool, bool] | None, interpret: bool):
    n_w = len(starts) - 1
    refs = list(refs)
    take = lambda n: [refs.pop(0) for _ in range(n)]
    # inputs: x, [add], the weights, [norm], [live], [counts]; outputs: the products, [emit], [ids, weights, counts]
    add_ref = take(1)[0] if add else None
    w_refs = take(n_w)
    norm_ref = take(1)[0] if eps is not None else None
    live_ref = take(1)[0] if route and route[2] else None
    take(1 if route else 0)  # the counts' input: the kernel adds to its aliased output
    o_refs = take(n_w)
    emit_ref = take(1)[0] if emit else None
    ids_ref, wt_ref, cnt_ref = take(3) if route else (None, None, None)
    k_dim = x_ref.shape[-1]
    dtype = x_ref.dtype
    pid = pl.program_id(0)

    def row(ks):
        """Elements ks of the input row: x, or the residual sum x + add rounded to x's dtype (as XLA adds them)."""
        if add_ref is None:
            return x_ref[0, ks]
        return (x_ref[0, ks].astype(jnp.float32) + add_ref[0, ks].astype(jnp.float32)).astype(dtype)

    inv = None
    if eps is not None:
        xf = row(pl.ds(0, k_dim)).astype(jnp.float32)
        inv = lax.rsqrt(jnp.sum(xf * xf) / k_dim + eps)

    def operand(ks):
        """Elements ks of the row the products read: the input row, RMS-normed when there is a norm."""
        xk = row(ks)
        if inv is not None:
            xk = norm_ref[ks] * (xk.astype(jnp.float32) * inv).astype(dtype)
        return xk

    def project(w_ref, o_ref, row0):
        acc = jnp.zeros((bn, bk), jnp.float32)  # per-lane partial sums: one cross-thread reduction, at the end
        for j in range(k_dim // bk):  # unrolled: the loads are independent and Triton issues them ahead
            xk = operand(pl.ds(j * bk, bk))
            acc += w_ref[pl.ds(row0, bn), pl.ds(j * bk, bk)].astype(jnp.float32) * xk.astype(jnp.float32)[None, :]
        o_ref[0, pl.ds(row0, bn)] = jnp.sum(acc, axis=1).astype(dtype)

    for i in range(n_w):  # weight i owns programs [starts[i], starts[i + 1])
        pl.when((pid >= starts[i]) & (pid < starts[i + 1]))(
            functools.partial(project, w_refs[i], o_refs[i], (pid - starts[i]) * bn))

    if emit:
        # Also written out: the row the products read, as the first of `emit` rows whose others are zeros (a
        # tensor-core tile for the kernels after it: a batch-1 MoE's experts). Every program writes a slice of
        # columns of it, so that no program's tail grows.
        cols = k_dim // pow2_divisor(k_dim, min(starts[-1], k_dim // 16))

        @pl.when(pid < k_dim // cols)
        def _():
            ks = pl.ds(pid * cols, cols)
            top = lax.broadcasted_iota(jnp.int32, (emit, cols), 0) == 0
            emit_ref[:, ks] = jnp.where(top, jnp.broadcast_to(operand(ks)[None, :], (emit, cols)),
                                        jnp.zeros((emit, cols), dtype))

    if route:
        _route_at_the_end(o_refs[0], live_ref, ids_ref, wt_ref, cnt_ref, pid, starts[-1], *route[:2], interpret)


def _route_at_the_end(logits_ref, live_ref, ids_ref, w_ref, cnt_ref, pid, programs: int, k: int, norm: bool,
                      interpret: bool):
    """The router kernel's work (router.select on the one row of logits), done by the last of the product's
    programs to store its logits: each counts itself in (an atomic add after a barrier, as a CUTLASS semaphore) and
    the one that counts last reads the whole row from L2 (a volatile load: past the SM's L1, which does not see other
    SMs' stores; jax 0.11.2's lowering refuses the `.cg` cache modifier)."""
    from jax.experimental.pallas import triton as plgpu

    if not interpret:
        plgpu.debug_barrier()  # every thread's logits stored before the program counts itself
    last = plgpu.atomic_add(cnt_ref, (pid * 0,), jnp.int32(1)) == programs - 1

    @pl.when(last)
    def _():
        row = logits_ref[0, :] if interpret else plgpu.load(logits_ref.at[0, :], volatile=True)
        ids, w = router.select(row.astype(jnp.float32), k, ids_ref.shape[1], norm, how=router.SELECT_IN_PRODUCT)
        if live_ref is not None:  # a row without a token: weight 0, no expert computes it
            w = jnp.where(live_ref[0] != 0, w, 0.0)
        ids_ref[0, :] = ids
        w_ref[0, :] = w.astype(w_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "interpret", "block", "emit", "route"))
def gemv_many(x, ws, *, norm=None, eps: float | None = None, add=None, emit: int = 0, interpret: bool = False,
              block: tuple[int, int, int] | None = None, route: tuple[int, bool] | None = None, live=None):
    """x [1, K], ws: weights [N_i, K] -> a tuple of [1, N_i] in x's dtype, (norm(x) if `norm` is given) @ w_i.T
    with products accumulated in float32, one kernel for all. `norm` is an RMSNorm weight [K] applied with `eps`;
    `add` [1, K], when given, is added to x first (in x's dtype: the residual sum h = x + add of a decoder layer);
    `emit` = R > 0 also returns the row the products read (norm(x + add)) on top of R - 1 zero rows, [R, K] in x's
    dtype, after the outputs (the 16-row tile that the one-token expert kernels read for every expert);
    `block` overrides `tiles` (bn, bk, warps).
    `route` = (k, norm), with one weight whose rows are a router's E experts (E a power of two from 16): the last of
    the kernel's programs also routes the row (router.route's work: top k of the softmax, renormalised with `norm`;
    `live` [1] bool zeroes the weights of a row without a token) and returns ids int32 [1, k_pad] and weights
    [1, k_pad] in x's dtype after the other outputs: the router kernel's launch saved."""
    ws = tuple(ws)
    rows, k_dim = x.shape
    if rows != 1 or not ws or any(w.ndim != 2 or w.shape[1] != k_dim or not supported(w.shape[0], k_dim,
                                                                                      gpu=not interpret) for w in ws):
        raise ValueError(f"gemv takes one row [1, K] and out-major weights [N, K] with K a power of two from 16 "
                         f"(interpreted: a multiple of 16); got x {x.shape}, w {[w.shape for w in ws]}")
    if (norm is None) != (eps is None):
        raise ValueError("gemv: pass the RMSNorm weight and its eps together")
    if add is not None and add.shape != x.shape:
        raise ValueError(f"gemv: the row to add must have x's shape {x.shape}; got {add.shape}")
    bn, bk, warps = block or tiles(math.gcd(*(w.shape[0] for w in ws)), k_dim)
    if any(w.shape[0] % bn for w in ws) or k_dim % bk:
        raise ValueError(f"gemv: block {(bn, bk)} does not divide the weights {[w.shape for w in ws]}")
    if route and not routable(tuple(w.shape[0] for w in ws)):
        raise ValueError(f"gemv: routing takes one weight of a power-of-two number of rows from 16 (a router's "
                         f"experts); got {[w.shape for w in ws]}")
    starts = tuple(itertools.accumulate((w.shape[0] // bn for w in ws), initial=0))
    args = ([x] + ([add.astype(x.dtype)] if add is not None else []) + list(ws)
            + ([norm.astype(x.dtype)] if norm is not None else []))
    outs = tuple(jax.ShapeDtypeStruct((1, w.shape[0]), x.dtype) for w in ws)
    outs += (jax.ShapeDtypeStruct((emit, k_dim), x.dtype),) if emit else ()
    aliases = {}
    if route:
        k_pad = max(16, 1 << (route[0] - 1).bit_length())
        if live is not None:
            args.append(live.reshape(1).astype(jnp.int32))
        aliases[len(args)] = len(outs) + 2  # the counts: zeros in, the programs add themselves
        args.append(jnp.zeros((1,), jnp.int32))
        outs += (jax.ShapeDtypeStruct((1, k_pad), jnp.int32), jax.ShapeDtypeStruct((1, k_pad), x.dtype),
                 jax.ShapeDtypeStruct((1,), jnp.int32))
    params = triton_params(warps, 1, interpret)
    res = tuple(pl.pallas_call(
        functools.partial(_kernel, starts=starts, bn=bn, bk=bk, eps=eps, add=add is not None, emit=emit,
                          route=route and (route[0], route[1], live is not None), interpret=interpret),
        out_shape=outs, grid=(starts[-1],), input_output_aliases=aliases, compiler_params=params,
        interpret=interpret, name="gemv",
    )(*args))
    return res[:-1] if route else res


def routable(rows: tuple[int, ...]) -> bool:
    """Whether gemv_many can route the product's row at its end: one weight of E rows, E a power of two from 16."""
    return len(rows) == 1 and rows[0] >= 16 and rows[0] & (rows[0] - 1) == 0


def gemv(x, w, *, norm=None, eps: float | None = None, interpret: bool = False,
         block: tuple[int, int, int] | None = None):
    """x [1, K], w [N, K] -> [1, N]: gemv_many with one weight."""
    return gemv_many(x, (w,), norm=norm, eps=eps, interpret=interpret, block=block)[0]
