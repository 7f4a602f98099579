"""Hopper (sm_90) versions of the grouped-experts kernels A and B, for prompts: Pallas on Mosaic GPU.

Same layout and the same functions as `grouped_experts.gate_up` / `down_proj` (blocks of bm rows of the padded,
expert-sorted x, block b computed with expert block_expert[b]), written for what the Triton backend cannot reach:

- Warp specialisation: one warpgroup only issues TMA copies of the x and weight tiles into a ring of shared-memory
  stages, two compute warpgroups only issue wgmma, each on 64 of the block's 128 rows and all of the tile's
  columns. Triton's grouped kernels stayed at ~57% (A) and ~50-54% (B) of the matmul rate on an H200 at every
  tiling swept; these reach 68% / 57% at 4096 tokens, 75% / 67% at 8192 (docs/BENCHMARKS.md).
- Persistent: one program per SM walks the (block, output tile) pairs of the used blocks only (a prefix of the
  blocks: `used` is read on the device, nothing is launched for the padding blocks), in the order of
  `HopperTiles.minor` / `width` (blocks of one expert next to each other share each weight tile while it is in L2).
- Kernel A keeps two accumulators per warpgroup (gate and up columns of one tile) and applies SwiGLU before the
  store: h = silu(x W_gate[e]) * (x W_up[e]), float32 accumulation, stored in x's dtype.

Kernel A reads the padded, sorted copy of x (`grouped_experts.gather_rows`). Two versions that read x's rows by
index instead were bit-exact but slower on an H200 at every prompt length (one TMA copy per row: 5.8-7.2x; the memory
warpgroup's threads fetching a row each with cp.async: 0.65-0.80x the speed of copy + kernel A) and were removed
(docs/BENCHMARKS.md, ninth session; the cp.async version is in git at commit 1cb1d68).

Mosaic GPU kernels run only on sm_90 GPUs: `hopper_available()` says whether this process has one. The CPU tests
run them in Mosaic GPU's interpreter against numpy and lower the production tilings for CUDA; on a GPU
tools/probe_hopper_experts.py compares them with the Triton kernels and tools/check_gpu_paths.py runs the model.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

COMPUTE_WARPGROUPS = 2  # each owns half of the output tile: half its rows or half its columns (`HopperTiles.split`)
MEMORY_REGISTERS = 40  # registers per thread left to the TMA warpgroup (the rest go to the accumulators)
H100_SMS = 132  # programs when lowering without a GPU at hand (H100 / H200 SXM)


@dataclasses.dataclass(frozen=True)
class HopperTiles:
    """Tiles and schedule of one Hopper expert kernel.

    bn: output columns per program (kernel A: of the gate and of the up projection each). bk: the contraction tile.
    split: how the two compute warpgroups share the bm x bn output tile, "m" (bm/2 rows each, all columns) or "n"
    (all rows, bn/2 columns each). stages: shared-memory stages in flight. minor / width: the walk over (block,
    tile) pairs, `plgpu.planar_snake`'s minor dimension (0: blocks) and tile width. release: wgmma groups left in
    flight when a step ends (its stage goes back to the TMA warpgroup that many steps later). epi: columns per store
    of the epilogue (0: all), which sizes its shared-memory buffer. chain: the TMA warpgroup starts the next tile's
    loads as soon as this tile's stages are consumed, instead of waiting for the whole tile first (the pipeline of
    pipelines of `plgpu.emit_pipeline_warp_specialized`; needs release 0 and stages dividing the k steps)."""

    bn: int = 128
    bk: int = 64
    split: str = "m"
    stages: int = 3
    minor: int = 0
    width: int = 1
    release: int = 0
    epi: int = 0
    chain: bool = False


def hopper_available() -> bool:
    """Whether the default device is a CUDA GPU of compute capability 9.x (H100, H200)."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def _num_sms() -> int:
    dev = jax.devices()[0]
    return (getattr(dev, "core_count", None) if dev.platform == "gpu" else None) or H100_SMS


def _swizzled(cols: int, dtype) -> tuple:
    """Shared-memory transforms for a tile whose rows hold `cols` elements (the widest swizzle that fits)."""
    swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def _grouped_kernel(block_expert, src_row, used, x, *refs, bm: int, t: HopperTiles, n_tiles: int, k_steps: int,
                    swiglu: bool, n_x: int | None):
    """out[rows of block b, tile j] = x[rows] @ w[e][:, tile j] for e = block_expert[b] (kernel B), or SwiGLU of
    the gate and up products (kernel A: w = (w_gate, w_up)). Runs in each of the 3 warpgroups of a program."""
    *ws, out = refs
    by_rows = t.split == "m"
    rows_w, cols_w = (bm // COMPUTE_WARPGROUPS, t.bn) if by_rows else (bm, t.bn // COMPUTE_WARPGROUPS)
    in_tr = _swizzled(t.bk, x.dtype)
    epi = t.epi or cols_w
    specs = [plgpu.BlockSpec((bm, t.bk), lambda k: (0, k), transforms=in_tr, memory_space=plgpu.SMEM,
                             delay_release=t.release)]
    specs += [plgpu.BlockSpec((t.bk, t.bn), lambda k: (k, 0), transforms=_swizzled(t.bn, x.dtype),
                              memory_space=plgpu.SMEM, delay_release=t.release) for _ in ws]

    def pipeline(body, context, state=None):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_steps,), memory_registers=MEMORY_REGISTERS, in_specs=specs, wg_axis="wg",
            num_compute_wgs=COMPUTE_WARPGROUPS, max_concurrent_steps=t.stages, compute_context=context,
            pipeline_state=state)

    nothing = lambda *_, **__: None  # the allocations do not depend on the bodies
    allocs = pipeline(nothing, nothing).get_allocations(x, *(w.at[0] for w in ws))

    @functools.partial(pl.run_scoped, allocs=allocs,
                       out_smem=plgpu.SMEM((COMPUTE_WARPGROUPS, rows_w, epi), out.dtype,
                                           transforms=_swizzled(epi, out.dtype)),
                       collective_axes="wg")
    def _scope(allocs, out_smem):
        wg = lax.axis_index("wg")
        n_used = used[0]

        @plgpu.nd_loop((n_used * n_tiles,), collective_axes="sm")
        def _tile(info: plgpu.NDLoopInfo):
            b, j = plgpu.planar_snake(info.index[0], (n_used, n_tiles), t.minor, t.width)
            e = block_expert[b]
            rows = pl.ds(b * bm, bm)
            w_rows = pl.ds(wg * rows_w, rows_w) if by_rows else pl.ds(0, bm)  # of the block
            w_cols = pl.ds(0, t.bn) if by_rows else pl.ds(wg * cols_w, cols_w)  # of the tile
            # A warpgroup whose rows are all padding (an expert's last block, filled to at most half) skips its
            # products and its store: the tile then costs the tensor cores half as much. An expert's rows fill a
            # prefix of its blocks, so the warpgroup's first row tells (the rule gather_rows skips tiles by).
            has_rows = src_row[b * bm + wg * rows_w] < n_x if by_rows and n_x is not None else True

            def context(run):
                def accumulate(*accs):
                    accs = run(accs)
                    plgpu.wgmma_wait(0)
                    if swiglu:
                        g, u = accs[0][...], accs[1][...]
                        y = g * jax.nn.sigmoid(g) * u
                    else:
                        y = accs[0][...]
                    y = y.astype(out.dtype)
                    col0 = j * t.bn + (0 if by_rows else wg * cols_w)

                    @pl.when(has_rows)
                    def _store():
                        for c in range(cols_w // epi):
                            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous store has left out_smem
                            out_smem[wg] = y[:, c * epi:(c + 1) * epi]
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(out_smem.at[wg],
                                                    out.at[rows, :].at[w_rows, pl.ds(col0 + c * epi, epi)])

                pl.run_scoped(accumulate, *(plgpu.ACC((rows_w, cols_w), jnp.float32) for _ in ws))

            def mma(_, x_smem, *rest):
                w_smems, accs = rest[:-1], rest[-1]

                @pl.when(has_rows)
                def _issue():
                    for acc, w_smem in zip(accs, w_smems):
                        plgpu.wgmma(acc, x_smem.at[w_rows], w_smem.at[:, w_cols])

                plgpu.wgmma_wait(t.release)
                return accs

            state = None
            if t.chain:  # a program's first tile fills the stages, its last one drains them
                steady = jnp.where(info.local_index == info.num_local_steps - 1, plgpu.PipelinePipeline.STOP,
                                   plgpu.PipelinePipeline.STEADY)
                state = jnp.where(info.local_index == 0, plgpu.PipelinePipeline.START, steady).astype(jnp.int32)
            pipeline(mma, context, state)(x.at[rows, :], *(w.at[e, :, pl.ds(j * t.bn, t.bn)] for w in ws),
                                   allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def tiling_error(bm: int, k: int, n_out: int, t: HopperTiles) -> str | None:
    """Why tiles t cannot run over blocks of bm rows with contraction k and n_out output columns (None: they can)."""
    rows_w = bm // COMPUTE_WARPGROUPS if t.split == "m" else bm
    if rows_w % 64 or k % t.bk or n_out % t.bn:
        return (f"{rows_w} rows per warpgroup (wgmma needs multiples of 64), contraction {k} by {t.bk}, {n_out} "
                f"output columns by {t.bn}: shape does not tile")
    if t.chain and (t.release or (k // t.bk) % t.stages):
        return f"chained tiles need release 0 and {t.stages} stages dividing the {k // t.bk} k-steps"
    return None


def _grouped_call(x, block_expert, src_row, n_x, ws, n_out: int, t: HopperTiles, swiglu: bool, interpret: bool,
                  programs: int | None):
    m, k = x.shape
    nb = block_expert.shape[0]
    bm = m // nb
    why = f"rows {m} in {nb} blocks" if m % nb else tiling_error(bm, k, n_out, t)
    if why:
        raise ValueError(f"grouped Hopper kernel: {why} (tiles {t})")
    used = jnp.sum(block_expert >= 0, dtype=jnp.int32).reshape(1)  # used blocks are a prefix (group_layout)
    if (src_row is None) != (n_x is None):
        raise ValueError("grouped Hopper kernel: give src_row and n_x together (or neither)")
    kernel = plgpu.kernel(  # persistent: one program per SM (or `programs`), three warpgroups
        functools.partial(_grouped_kernel, bm=bm, t=t, n_tiles=n_out // t.bn, k_steps=k // t.bk, swiglu=swiglu,
                          n_x=n_x),
        out_type=jax.ShapeDtypeStruct((m, n_out), x.dtype), grid=(programs or _num_sms(),), grid_names=("sm",),
        num_threads=COMPUTE_WARPGROUPS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else None)
    src_row = jnp.zeros(1, jnp.int32) if src_row is None else src_row  # not read without n_x
    return kernel(block_expert, src_row.astype(jnp.int32), used, x, *ws)


# The fastest of tools/probe_hopper_experts.py, Qwen3-30B-A3B expert shapes, H200 (2026-12-01), at 2048 / 4096 / 8192
# tokens: kernel A 306 / 425 / 701 us against 337 / 498 / 859 for the Triton kernel in the same run, kernel B
# 189 / 252 / 393 against 205 / 287 / 477. Splitting the tile by columns was slower (4096: 499 / 286 us); chaining
# helps B (12 k-steps a tile, 256 -> 252 and 421 -> 393 us) more than A (32 k-steps a tile, within noise).
# Tried and slower (2026-12-02, docs/BENCHMARKS.md): clusters of 2 programs taking two tiles of one block with each
# x tile multicast to both (kernel A 257 -> 280 us a layer at 2048 tokens; in git at commit 9b82ce3), and 192-row
# blocks with three compute warpgroups (ptxas caps 512 threads at 128 registers: the accumulators do not fit).
GATE_UP_TILES = HopperTiles(128, 64, "m", stages=4, release=1, epi=64)
DOWN_TILES = HopperTiles(256, 64, "m", stages=4, epi=64, chain=True)


def fits(bm: int, d_model: int, d_ff: int) -> bool:
    """Whether kernels A and B, at their default tiles, run experts of this shape in blocks of bm rows."""
    return (tiling_error(bm, d_model, d_ff, GATE_UP_TILES) is None
            and tiling_error(bm, d_ff, d_model, DOWN_TILES) is None)


def gate_up(xp, block_expert, w_gate, w_up, t: HopperTiles = GATE_UP_TILES, *, src_row=None, n_x: int | None = None,
            interpret: bool = False, programs: int | None = None):
    """Kernel A on Hopper: h = silu(xp W_gate[e]) * (xp W_up[e]) per block of the padded, sorted xp [M, D]
    (blocks of expert -1, a suffix, are skipped and their rows left unwritten). src_row, n_x: `Layout.src_row` and
    the row count of the x it was made for (padding rows are those whose src_row is n_x): a warpgroup whose rows are
    all padding is not computed and its output rows are left unwritten (default: every row computed;
    `grouped_experts.skips_padding` says where skipping pays). interpret: run in Mosaic GPU's interpreter (any
    backend, slow); programs: persistent programs (default: one per SM)."""
    return _grouped_call(xp, block_expert, src_row, n_x, (w_gate, w_up), w_gate.shape[2], t, swiglu=True,
                         interpret=interpret, programs=programs)


def down_proj(h, block_expert, w_down, t: HopperTiles = DOWN_TILES, *, src_row=None, n_x: int | None = None,
              interpret: bool = False, programs: int | None = None):
    """Kernel B on Hopper: y = h W_down[e] per block of rows of h [M, F], stored in h's dtype (src_row, n_x: as
    for `gate_up`)."""
    return _grouped_call(h, block_expert, src_row, n_x, (w_down,), w_down.shape[2], t, swiglu=False,
                         interpret=interpret, programs=programs)
