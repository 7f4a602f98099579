"""The routed experts of one or two tokens in one kernel: each (row, expert) pair's SwiGLU, slice by slice of F
(Pallas, Triton backend; `interpret=True` runs it anywhere).

A decode step of one token reads 8 experts' weights for one row of work. `grouped_experts` runs it as the sorted
path does with a block of 16 rows per pair (the tensor cores' smallest tile, 15 of them zero): XLA gathers the
row into that padded buffer, kernel A computes h, kernel B y, and XLA's combine sums the pairs. On an H200, per
Qwen3-30B-A3B layer (2026-12-03), A and B took 15.0 and 8.5 us for 75 MB (floor 17.6 us), the gather and the
combine ~2 us each: a third over the floor, in four launches.

Here program (p, j) of pair p = row * k + slot and slice j of F computes, with vector products on the CUDA cores
(one row: nothing for the tensor cores to do),

    h_j = silu(x[row] W_gate[e][:, j]) * (x[row] W_up[e][:, j])        (float32 sums; h_j rounded to x's dtype,
    part[p, j] = h_j W_down[e][j, :]                                     as kernel A stores h)

and the combine sums part over j and the row's pairs, weighted (float32). Every weight byte is read once, by one
program; the parts are F / bf rows of D float32 per pair (1.5 MB at batch 1), read once by the combine.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mixjax.kernels import pow2_divisor, triton_params


@dataclasses.dataclass(frozen=True)
class PairTiles:
    """bf: the F slice of a program; bk: the D elements of x and of a weight slice's rows per load (gate / up);
    bd: the D elements of the down projection's output per step; warps; stages (Triton's software pipelining of
    the loops' loads)."""

    bf: int = 32
    bk: int = 128
    bd: int = 256
    warps: int = 4
    stages: int = 3

    def fit(self, d: int, f: int) -> "PairTiles | None":
        """These tiles cut to powers of two that divide D and F, or None where they do not tile (below 16)."""
        t = dataclasses.replace(self, bf=pow2_divisor(f, self.bf), bk=pow2_divisor(d, self.bk),
                                bd=pow2_divisor(d, self.bd))
        return t if min(t.bf, t.bk, t.bd) >= 16 else None


def _kernel(expert_ref, x_ref, wg_ref, wu_ref, wd_ref, part_ref, *, t: PairTiles, k: int, d: int):
    p, j = pl.program_id(0), pl.program_id(1)
    e = expert_ref[p]

    @pl.when(e >= 0)  # pairs of no expert (a row with fewer pairs, NO_TOKEN rows) are skipped: weight 0
    def _():
        row = p // k
        cols = pl.ds(j * t.bf, t.bf)

        def gate_up(i, acc):  # per-lane partial sums [bk, bf]: one cross-thread reduction, after the loop
            ag, au = acc
            ks = pl.ds(i * t.bk, t.bk)
            xk = x_ref[row, ks].astype(jnp.float32)[:, None]
            return (ag + xk * wg_ref[e, ks, cols].astype(jnp.float32),
                    au + xk * wu_ref[e, ks, cols].astype(jnp.float32))

        zero = jnp.zeros((t.bk, t.bf), jnp.float32)
        ag, au = lax.fori_loop(0, d // t.bk, gate_up, (zero, zero))
        g, u = jnp.sum(ag, axis=0), jnp.sum(au, axis=0)
        h = (g * jax.nn.sigmoid(g) * u).astype(x_ref.dtype).astype(jnp.float32)[:, None]  # [bf, 1]

        def down(i, carry):
            ds = pl.ds(i * t.bd, t.bd)
            part_ref[p, j, ds] = jnp.sum(h * wd_ref[e, cols, ds].astype(jnp.float32), axis=0)
            return carry

        lax.fori_loop(0, d // t.bd, down, 0)


def pair_swiglu(x, ids, weights, w_gate, w_up, w_down, *, tiles: PairTiles, interpret: bool = False):
    """sum_j weights[r, j] * down_e(silu(gate_e(x[r])) * up_e(x[r])), e = ids[r, j], for x [n, D], ids / weights
    [n, k] (weight 0: no pair; its id is not read), weights [E, D, F], [E, D, F], [E, F, D]. Returns [n, D] in x's
    dtype; the sums are float32. `tiles` must fit D and F (`PairTiles.fit`)."""
    n, d = x.shape
    k = ids.shape[1]
    f = w_gate.shape[2]
    valid = weights != 0
    expert = jnp.where(valid, ids, -1).reshape(n * k).astype(jnp.int32)
    nj = f // tiles.bf
    part = pl.pallas_call(
        functools.partial(_kernel, t=tiles, k=k, d=d),
        out_shape=jax.ShapeDtypeStruct((n * k, nj, d), jnp.float32), grid=(n * k, nj),
        compiler_params=triton_params(tiles.warps, tiles.stages, interpret), interpret=interpret, name="pair_experts",
    )(expert, x, w_gate, w_up, w_down)
    part = part.reshape(n, k, nj, d)
    # skipped pairs' parts are never written: select, not multiply (their memory may hold anything)
    y = jnp.where(valid[:, :, None, None], part, 0.0).sum(axis=2)
    return jnp.einsum("nkd,nk->nd", y, weights.astype(jnp.float32)).astype(x.dtype)
