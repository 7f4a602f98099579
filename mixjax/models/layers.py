"""Building blocks shared by the model families, written in the per-device (local) view.

Every module runs inside one `shard_map` over the (node, gpu) mesh: a weight split by a strategy arrives here as
this device's block, so shapes are read from the arrays, never from the config. Each weight is an `nnx.Param`
with two pieces of metadata:
  * `axes`: logical axis names per dimension ("heads", "experts", ...), mapped to mesh axes by the strategy;
  * `source`: where the weight comes from in a Hugging Face checkpoint (see `Source`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from mixjax.kernels import gemv as gemv_kernel
from mixjax.kernels.grouped_experts import PAIR_BLOCKS_MAX, Blocks, choose_blocks, grouped_swiglu, token_swiglu
from mixjax.sharding.strategies import ParallelContext


@dataclasses.dataclass(frozen=True)
class Source:
    """How a parameter is read from a Hugging Face checkpoint.

    name: tensor name; for stacked experts a template with "{e}".
    transpose: HF linear weights are [out, in]; mixjax keeps [in, out], except where a module stores them out-major
        (Linear(out_major=True)) and this is False.
    experts: stack this many per-expert tensors along a new leading axis.
    repeat_heads: (head_dim, reps): repeat each head block of the output dimension (HF's first axis) reps times, so
        that a tensor-parallel degree larger than the number of KV heads gives every device a whole KV head.
    parts, shards: a fused weight (`FusedLinear`): the parts' tensors side by side along the output dimension, in
        `shards` pieces that each hold their share of every part (piece s = [part 0's block s | part 1's block s |
        ...]), so that a TP group of `shards` devices splitting the output dimension gives each device its heads of
        every part. `name` then only names the weight in messages.
    width: a part's extent along the output dimension (in mixjax's layout, after repeat_heads).
    """

    name: str
    transpose: bool = False
    experts: int | None = None
    repeat_heads: tuple[int, int] | None = None
    parts: tuple["Source", ...] = ()
    shards: int = 1
    width: int = 0


def _init(rngs: nnx.Rngs | None, shape, dtype, scale: float | None):
    if rngs is None or scale is None:  # norms start at one
        return jnp.ones(shape, dtype)
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * scale).astype(dtype)


def param(shape, axes, source: Source, dtype, rngs, scale: float | None = 0.02) -> nnx.Param:
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(_init(rngs, shape, dtype, scale), axes=tuple(axes), source=source)


def zeros_param(shape, axes, source: Source, dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), axes=tuple(axes), source=source)


def matmul(x, w, out_dtype=None):
    """x @ w with float32 accumulation, result in x's dtype (or out_dtype)."""
    out_dtype = out_dtype or x.dtype
    if math.prod(x.shape[:-1]) == 1 and jax.default_backend() == "gpu":
        # One row (batch-1 decode) on a GPU: XLA rewrites a vector-matrix dot as multiply + reduce, which writes the
        # whole product and reduces it over the weight's leading axis: 5x slower than reading the weight once
        # (H200, 2026-11-29: ~190 of a 0.73 ms 4-layer step). Two rows (the barriers keep XLA from folding the copy
        # back, or the slice into the product) stay a matrix product; the second row is discarded.
        x2 = lax.optimization_barrier(jnp.broadcast_to(x.reshape(1, x.shape[-1]), (2, x.shape[-1])))
        y = lax.optimization_barrier(jnp.einsum("ri,io->ro", x2, w, preferred_element_type=jnp.float32))[:1]
        return y.reshape(*x.shape[:-1], w.shape[-1]).astype(out_dtype)
    return jnp.einsum("...i,io->...o", x, w, preferred_element_type=jnp.float32).astype(out_dtype)


class Linear(nnx.Module):
    """y = x W, with W stored [in, out], or with out_major=True as Hugging Face stores it, [out, in] (no bias: none of
    the supported families has one).

    Out-major weights serve batch-1 decode: on the Pallas path a one-row product is one kernel streaming whole
    weight rows (mixjax.kernels.gemv), with the RMSNorm before it (`norm`) computed inside that kernel. `axes` are
    always given in [in, out] order."""

    def __init__(self, d_in, d_out, axes, name: str, *, dtype, rngs, repeat_heads=None, out_major: bool = False):
        shape, axes = ((d_out, d_in), tuple(reversed(axes))) if out_major else ((d_in, d_out), axes)
        self.w = param(shape, axes, Source(name, transpose=not out_major, repeat_heads=repeat_heads), dtype, rngs)
        self.out_major = out_major

    def __call__(self, x, norm: "RMSNorm | None" = None, pallas: str | None = None, out_dtype=None):
        """(norm(x) if norm else x) @ W in x's dtype (or out_dtype); `pallas` (ParallelContext.pallas) lets one row
        take the gemv kernel."""
        return project(x, (self,), norm, pallas, out_dtype)[0]


class FusedLinear(nnx.Module):
    """Linear maps of one input stored as one weight: x [W_0 | W_1 | ...], the parts read from their own Hugging Face
    tensors (`Source.parts`), so that a product reads x once and issues one matrix product. Left to XLA, separate
    products of one x either stay apart (the small k and v products of a Qwen3 prompt ran at half the matmul rate,
    with split-K reductions after them) or are merged by its GPU dot merger, which then concatenates their weights
    on every call (a 21 MB copy per Qwen3-30B-A3B layer). vLLM's QKVParallelLinear stores q, k and v the same way.

    Under TP (`shards` devices splitting the output dimension) each device's block holds its share of every part:
    `split` cuts a local output into the parts by their global proportions. `axes` in [in, out] order as for
    Linear; repeat_heads: one per part (or None)."""

    def __init__(self, d_in, d_outs, axes, names, name: str, *, dtype, rngs, shards: int = 1, repeat_heads=None,
                 out_major: bool = False):
        if any(o % shards for o in d_outs):
            raise ValueError(f"{name}: output widths {d_outs} do not split over {shards} tensor-parallel shards")
        d_out = sum(d_outs)
        shape, axes = ((d_out, d_in), tuple(reversed(axes))) if out_major else ((d_in, d_out), axes)
        parts = tuple(Source(n, transpose=not out_major, repeat_heads=r, width=o)
                      for n, o, r in zip(names, d_outs, repeat_heads or (None,) * len(names)))
        self.w = param(shape, axes, Source(name, transpose=not out_major, parts=parts, shards=shards), dtype, rngs)
        self.out_major = out_major
        self.widths = tuple(d_outs)

    def __call__(self, x, norm: "RMSNorm | None" = None, pallas: str | None = None):
        """(norm(x) if norm else x) @ [W_0 | W_1 | ...]: this device's block of the fused output (see `split`)."""
        return project(x, (self,), norm, pallas)[0]

    def products(self, x, groups, norm: "RMSNorm | None" = None, pallas: str | None = None) -> list:
        """A long input's (UNSHARED_ROWS rows and more) products per group of consecutive parts, each its own matrix
        product of x with a slice of the weight; a shorter one's single fused output ([y], cut it with `split`).
        Per Qwen3-30B-A3B layer of a 2048-token prompt on an H200, XLA's one product of 2048 x 5120 outputs was
        55 us but went to cuBLAS with its float32 result converted after (16 us more), at 4096 tokens a Triton
        product at 63% of the matmul rate: q alone (a Triton product, 85%) and k with v do better."""
        if len(groups) == 1 or math.prod(x.shape[:-1]) < UNSHARED_ROWS:
            return [self(x, norm, pallas)]
        x = norm(x) if norm is not None else x
        w = self.w[...]
        ax = 0 if self.out_major else 1
        bounds = self._bounds(w.shape[ax])
        out = []
        for xi, g in zip(_unshared(x, len(groups)), groups):
            wg = lax.slice_in_dim(w, bounds[g[0]][0], bounds[g[-1]][1], axis=ax)
            out.append(matmul(xi, wg.T) if self.out_major else matmul(xi, wg))
        return out

    def local_widths(self, local_out: int) -> list[int]:
        """The parts' widths in a local output of `local_out` columns (each device holds one piece per shard)."""
        total = sum(self.widths)
        return [local_out * w // total for w in self.widths]

    def _bounds(self, local_out: int) -> list[tuple[int, int]]:
        """(start, end) of each part in a local output of `local_out` columns."""
        ends = list(itertools.accumulate(self.local_widths(local_out)))
        return list(zip([0] + ends[:-1], ends))

    def split(self, y) -> list:
        """A local fused output cut into the parts (x W_0, x W_1, ...) along its last axis."""
        return [y[..., a:b] for a, b in self._bounds(y.shape[-1])]


def project(x, linears, norm: "RMSNorm | None" = None, pallas: str | None = None, out_dtype=None) -> list:
    """[(norm(x) if norm else x) @ l.W for l in linears], in x's dtype or out_dtype. One row on the Pallas path
    with out-major weights: one gemv kernel for all of them, the norm computed inside it."""
    ws = [lin.w[...] for lin in linears]
    if pallas and math.prod(x.shape[:-1]) == 1 and all(lin.out_major for lin in linears) and all(
            gemv_kernel.supported(*w.shape, gpu=pallas == "gpu") for w in ws):
        ys = gemv_kernel.gemv_many(x.reshape(1, -1), ws, norm=None if norm is None else norm.w[...],
                                   eps=None if norm is None else norm.eps, interpret=pallas == "interpret",
                                   out_dtype=out_dtype)
        return [y.reshape(*x.shape[:-1], w.shape[0]) for y, w in zip(ys, ws)]
    if norm is not None:
        x = norm(x)
    xs = _unshared(x, len(ws))
    return [matmul(xi, w.T if lin.out_major else w, out_dtype) for xi, lin, w in zip(xs, linears, ws)]


UNSHARED_ROWS = 2048  # rows from which products of one operand are kept apart (`_unshared`)


def _unshared(x, n: int) -> tuple:
    """n handles on x that XLA does not see as one value, for a long prompt (at least UNSHARED_ROWS rows), so that
    its products stay apart (`FusedLinear.products`; `project` of several weights). XLA's GPU dot merger merges
    products that share an operand into one: of separate weights by concatenating them on every call (a 21 MB copy
    per Qwen3-30B-A3B layer, 13 us on an H200), of slices of one weight back into the product of the whole (see
    `FusedLinear.products` for why that is slower for a prompt). MIXJAX_DOT_MERGE=1 leaves the merge to XLA
    (comparisons)."""
    if n == 1 or math.prod(x.shape[:-1]) < UNSHARED_ROWS or os.environ.get("MIXJAX_DOT_MERGE") == "1":
        return (x,) * n
    return lax.optimization_barrier((x,) * n)


class RMSNorm(nnx.Module):
    """y = w * x / sqrt(mean(x^2) + eps), the statistics in float32 (as Hugging Face computes them)."""

    def __init__(self, dim, name: str, *, eps: float, dtype, rngs=None):
        self.w = param((dim,), (None,), Source(name), dtype, None, scale=None)
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.w[...] * xf.astype(x.dtype)


# --- rotary position embedding ------------------------------------------------------------------------------


def rope_inv_freq(dim: int, theta: float, scaling: dict | None, max_position_embeddings: int):
    """Inverse frequencies and the cos/sin scale ("attention factor") for plain RoPE and YaRN."""
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    pos_freqs = theta ** exponents
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in ("default", None):
        return 1.0 / pos_freqs, 1.0
    if rope_type != "yarn":
        raise ValueError(f"unsupported rope scaling type {rope_type!r} (supported: default, yarn)")
    original = scaling.get("original_max_position_embeddings") or max_position_embeddings
    factor = scaling.get("factor") or max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolation = 1.0 - ramp  # 1 keeps the original frequency, 0 interpolates it by `factor`
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_cos_sin(positions, inv_freq, attention_factor):
    """cos, sin of shape [B, T, dim/2] for integer positions [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor


def apply_rope(x, cos, sin, interleaved: bool = False):
    """Rotate x [B, T, H, D]. Half-split pairs (x_i, x_{i+D/2}) by default; interleaved pairs (x_2i, x_2i+1)
    come out in half-split order, as in DeepSeek's reference (keys and queries alike, so scores are unchanged)."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = jnp.split(x, 2, axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# --- attention helpers ---------------------------------------------------------------------------------------


def write_cache(cache, new, starts, seq_axis: int = 1):
    """Write new into cache at per-row offsets starts [B] along seq_axis (new [B, ..., T, ...] and cache
    [B, ..., S, ...] in the same layout)."""

    def one(c, n, s):
        return jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), s, axis=seq_axis - 1)

    return jax.vmap(one)(cache, new, starts)


def causal_mask(positions, cache_len: int):
    """[B, 1, T, S]: query at position p sees cache slots 0..p (later slots hold stale or padded entries)."""
    keys = jnp.arange(cache_len)
    return (keys[None, None, :] <= positions[:, :, None])[:, None]


def attend(q, k, v, mask, scale, heads_major: bool = False):
    """Softmax attention in float32. q [B,T,H,D], k [B,S,K,D], v [B,S,K,Dv] with H = K * group -> [B,T,H,Dv].
    heads_major: k [B,K,S,D], v [B,K,S,Dv] (the layout in which the dots need no transpose of the cache)."""
    b, t, h, d = q.shape
    kh = k.shape[1 if heads_major else 2]
    kv = "bksd" if heads_major else "bskd"
    qg = q.reshape(b, t, kh, h // kh, d)
    scores = jnp.einsum(f"btkgd,{kv}->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, :, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    # Output in the dot's own order (batch, probs' free dims, v's), transposed after. Asking einsum for "btkgd"
    # directly lets XLA:CPU fold that transpose into the dot after it has decided the bf16 dot needs no f32
    # upcast, leaving a form its runtime cannot execute ("Unsupported element type for DotThunk::Execute:
    # BF16 x BF16 = F32", batch >= 2 with several KV heads). Same dot on GPU; only the small output moves.
    out = jnp.einsum(f"bkgts,{kv}->bkgtd", probs, v, preferred_element_type=jnp.float32).transpose(0, 3, 1, 2, 4)
    return out.reshape(b, t, h, v.shape[-1]).astype(q.dtype)


# --- feed-forward --------------------------------------------------------------------------------------------


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), intermediate width split over the attention TP group."""

    def __init__(self, d_model, d_ff, prefix: str, *, dtype, rngs):
        self.gate = Linear(d_model, d_ff, (None, "mlp"), f"{prefix}.gate_proj.weight", dtype=dtype, rngs=rngs)
        self.up = Linear(d_model, d_ff, (None, "mlp"), f"{prefix}.up_proj.weight", dtype=dtype, rngs=rngs)
        self.down = Linear(d_ff, d_model, ("mlp", None), f"{prefix}.down_proj.weight", dtype=dtype, rngs=rngs)

    def partial(self, x):
        """This device's share of the output; the sum over the TP group is the MLP's output."""
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))

    def __call__(self, x, par: ParallelContext):
        return par.psum_attn_tp(self.partial(x))


class Experts(nnx.Module):
    """The routed experts as stacked SwiGLU weights [E, D, F] / [E, F, D] (experts split by EP, F by TP)."""

    def __init__(self, num_experts, d_model, d_ff, prefix: str, *, dtype, rngs):
        def stacked(proj, shape, axes):
            src = Source(f"{prefix}.experts.{{e}}.{proj}.weight", transpose=True, experts=num_experts)
            return param(shape, axes, src, dtype, rngs)

        self.gate = stacked("gate_proj", (num_experts, d_model, d_ff), ("experts", None, "expert_mlp"))
        self.up = stacked("up_proj", (num_experts, d_model, d_ff), ("experts", None, "expert_mlp"))
        self.down = stacked("down_proj", (num_experts, d_ff, d_model), ("experts", "expert_mlp", None))

    def __call__(self, x, gates, *, impl: str = "dense", top_k: int | None = None, routed=None):
        """sum_e gates[:, e] * FFN_e(x) over this device's experts: x [n, D], gates [n, E_local] -> [n, D].

        impl "dense": every local expert runs on every row (rows whose gate is zero contribute exactly zero).
        Exact and static-shaped; the cost is n * E_local expert evaluations and all expert weights are read.
        impl "grouped" / "grouped-interpret": only the (row, expert) pairs with a non-zero gate are computed,
        by the Pallas kernels of mixjax.kernels.grouped_experts (on GPU / interpreted anywhere); untouched
        experts' weights are not read. `top_k` bounds the non-zeros per row. `routed`: the router's (ids,
        weights) [n, top_k] behind the gates, numbered as the gates' columns, when at hand (the grouped path then
        skips a top-k)."""
        if impl != "dense":
            e, d, f = self.gate.shape
            k = min(top_k or e, e)
            blk = choose_blocks(x.shape[0] * k, e, d, f, rows=x.shape[0])
            if blk is not None:
                return grouped_swiglu(x, gates, self.gate[...], self.up[...], self.down[...], k=k, blk=blk,
                                      interpret=impl == "grouped-interpret", routed=routed)
        dt = x.dtype
        g = jnp.einsum("nd,edf->enf", x, self.gate[...], preferred_element_type=jnp.float32)
        u = jnp.einsum("nd,edf->enf", x, self.up[...], preferred_element_type=jnp.float32)
        h = (jax.nn.silu(g) * u).astype(dt)
        y = jnp.einsum("enf,efd->end", h, self.down[...], preferred_element_type=jnp.float32)
        return jnp.einsum("end,ne->nd", y, gates.astype(jnp.float32)).astype(dt)

    def token_blocks(self, top_k: int, impl: str) -> Blocks | None:
        """The tiles of `token` for one token's top_k pairs, or None where that path does not apply (the dense
        implementation, or a shape the kernels do not tile)."""
        e, d, f = self.gate.shape
        k = min(top_k, e)
        if impl == "dense" or k > PAIR_BLOCKS_MAX:
            return None
        return choose_blocks(k, e, d, f)

    def token(self, u, ids, w, blk: Blocks, *, top_k: int, impl: str):
        """The experts of one token from its normed row on top of zero rows, u [blk.bm, D], and the router kernel's
        padded (ids, weights) [1, k_pad], read in place (grouped_experts.token_swiglu): [1, D] in u's dtype. blk
        from `token_blocks`."""
        return token_swiglu(u, ids, w, self.gate[...], self.up[...], self.down[...], k=min(top_k, self.gate.shape[0]),
                            blk=blk, interpret=impl == "grouped-interpret")
