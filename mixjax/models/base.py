"""The decoder skeleton both families share: embedding, decoder layers, MoE block, final norm and LM head.

All of it is local-view code that runs inside the strategy's `shard_map` (see mixjax.sharding.runner).
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
from jax import lax
from flax import nnx

from mixjax.models.layers import MLP, Experts, RMSNorm, Source, param
from mixjax.sharding.dispatch import dense_gates, moe_unfused
from mixjax.sharding.fused import fused_moe_residual
from mixjax.sharding.strategies import ParallelContext

# A token id that marks a position carrying no token: a prompt's padding up to its bucket, an idle row of a decode
# call. Its embedding is zero and its routing weights are zero, so that the expert kernels, which skip pairs of
# weight zero, read and compute nothing for it (and expert parallelism sends it nowhere). Whatever such a position
# computes is never read: real tokens attend only to earlier positions, and their own.
NO_TOKEN = -1


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """One per-layer cache array: its shape without the batch and sequence dims, their logical axes, and where the
    sequence axis sits in the full array. seq_axis 1 gives [batch, seq, ...]; Qwen3's K/V use 2, [batch, heads,
    seq, head_dim], so that decode attention reads each head's keys contiguously instead of transposing the
    whole cache every step (measured on an H200: the transposes took half of a batch-128 decode step)."""

    name: str
    feature_shape: tuple[int, ...]
    feature_axes: tuple[str | None, ...]
    seq_axis: int = 1

    def shape(self, batch: int, max_len: int) -> tuple[int, ...]:
        f = list(self.feature_shape)
        f.insert(self.seq_axis - 1, max_len)
        return (batch, *f)

    def axes(self) -> tuple[str | None, ...]:
        f = list(self.feature_axes)
        f.insert(self.seq_axis - 1, None)
        return ("batch", *f)


class ConfigBase:
    """Names shared by every family's config (the planner and the sharding checks read these)."""

    num_experts_per_tok: int
    num_attention_heads: int

    @property
    def top_k(self) -> int:
        return self.num_experts_per_tok

    @property
    def attention_heads(self) -> int:
        return self.num_attention_heads


ONE_TOKEN_ENV = "MIXJAX_ONE_TOKEN_MOE"  # "0": a batch-1 decode step's MoE takes the unfused path (comparisons)


class MoE(nnx.Module):
    """Routed experts (+ optional shared experts). Subclasses provide the router: `route(x, pallas=None) ->
    (ids, weights)`; `pallas` (ParallelContext.pallas) lets a router use a kernel (Qwen3: mixjax.kernels.router)."""

    num_experts: int
    top_k: int
    experts: Experts
    shared: MLP | None

    def __call__(self, x, par: ParallelContext, live=None):
        """x [..., D]; live: a bool mask of x's leading shape (False: no token, see NO_TOKEN) or None (all live)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        ids, w = self.route(flat, par.pallas)
        if live is not None:
            w = jnp.where(live.reshape(-1, 1), w, 0)
        y = moe_unfused(flat, dense_gates(ids, w, self.num_experts), self.experts, par, self.top_k, routed=(ids, w))
        if self.shared is not None:
            y = y + self.shared(flat, par)
        return y.reshape(shape)

    def route_token(self, x, a, norm, pallas: str, live, rows: int):
        """For `one_token`: (ids, weights, u) of one token whose residual sum is h = x + a (x, a [1, D]), with u
        [rows, D] the row the experts read, norm(h), on top of zero rows (their tensor-core tile), ids and weights
        as the router kernel leaves them ([1, k_pad]); None where the router has no such path (the default)."""
        return None

    def one_token(self, x, a, norm, par: ParallelContext, live=None):
        """h + MoE(norm(h)) for h = x + a of one token (x, a [1, 1, D]; a batch-1 decode step) on the Pallas path:
        the router's product computes h and its norm and writes the normed row, the router kernel masks and
        rounds the weights, and kernels A and B read the row and the router's outputs in place; XLA's combine adds
        h. The layer's unfused path makes nine kernels of this; here they are five (H200: see docs/BENCHMARKS.md).
        None where it does not apply: no Pallas kernels, experts over an EP group, more than one token, or a
        router or experts without the one-token path, or $MIXJAX_ONE_TOKEN_MOE=0 (for comparisons)."""
        if (not par.pallas or par.strategy.moe_ep or x.size != x.shape[-1]
                or os.environ.get(ONE_TOKEN_ENV, "1") == "0"):
            return None
        blk = self.experts.token_blocks(self.top_k, par.expert_impl)
        routed = blk and self.route_token(x.reshape(1, -1), a.reshape(1, -1), norm, par.pallas,
                                          None if live is None else live.reshape(1), rows=blk.bm)
        if not routed:
            return None
        ids, w, u = routed
        y = self.experts.token(u, ids, w, blk, top_k=self.top_k, impl=par.expert_impl)
        if par.strategy.moe_tp:
            y = lax.psum(y, par.strategy.moe_tp)
        if self.shared is not None:
            y = y + self.shared(u[:1], par)
        return ((x + a).reshape(y.shape) + y).reshape(x.shape)


class DecoderLayer(nnx.Module):
    """x -> h = x + Attn(norm1(x)) -> h + FFN(norm2(h)); FFN is a dense MLP or an MoE block."""

    def __init__(self, attn, ffn, *, d_model, eps, prefix, dtype):
        self.input_norm = RMSNorm(d_model, f"{prefix}.input_layernorm.weight", eps=eps, dtype=dtype)
        self.post_norm = RMSNorm(d_model, f"{prefix}.post_attention_layernorm.weight", eps=eps, dtype=dtype)
        self.attn = attn
        self.ffn = ffn
        self.is_moe = isinstance(ffn, MoE)

    def __call__(self, x, positions, cache, par: ParallelContext, live=None):
        """live: [B, T] bool, False where the position carries no token (NO_TOKEN), or None."""
        fused = par.strategy.fused and self.is_moe
        # the attention applies input_norm itself: a batch-1 decode step fuses it into its q/k/v kernels
        a, cache = self.attn(x, positions, cache, par, reduce=not fused, norm=self.input_norm)
        if fused:  # the attention all-reduce is folded into the MoE's chunked RS / A2A / AG pipeline
            b, t, d = x.shape
            out = fused_moe_residual(
                x.reshape(-1, d), a.reshape(-1, d), norm=self.post_norm, route=self.ffn.route,
                experts=self.ffn.experts, shared=self.ffn.shared, num_experts=self.ffn.num_experts,
                top_k=self.ffn.top_k, par=par, live=None if live is None else live.reshape(-1))
            return out.reshape(b, t, d), cache
        out = None if fused or not self.is_moe else self.ffn.one_token(x, a, self.post_norm, par, live)
        if out is not None:
            return out, cache
        h = x + a
        u = self.post_norm(h)
        return h + (self.ffn(u, par, live) if self.is_moe else self.ffn(u, par)), cache


class CausalLM(nnx.Module):
    """Embedding (vocabulary split over the attention TP group), layers, final norm, LM head."""

    config: object
    layers: nnx.List

    def _init_embeddings(self, cfg, vocab_padded, *, dtype, rngs):
        self.embed = param((vocab_padded, cfg.hidden_size), ("vocab", None), Source("model.embed_tokens.weight"),
                           dtype, rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, "model.norm.weight", eps=cfg.rms_norm_eps, dtype=dtype)
        self.tied = cfg.tie_word_embeddings
        if not self.tied:
            self.lm_head = param((cfg.hidden_size, vocab_padded), (None, "vocab"),
                                 Source("lm_head.weight", transpose=True), dtype, rngs)

    def embed_tokens(self, tokens, par: ParallelContext):
        table = self.embed[...]
        v_local = table.shape[0]
        local = tokens - par.attn_tp_index() * v_local
        ok = (local >= 0) & (local < v_local)
        x = jnp.where(ok[..., None], table[jnp.clip(local, 0, v_local - 1)], 0)
        return par.psum_attn_tp(x)

    def __call__(self, tokens, positions, cache, par: ParallelContext, last=None):
        """tokens, positions [B, T] -> logits [B, T, V_local] (this device's vocabulary block), new cache. A token
        of NO_TOKEN (negative) is padding: no expert computes it.

        With `last` [B] (a position index per row), only those positions reach the LM head: logits [B, 1, V_local].
        Prefill needs one position per prompt, and the head is the largest matmul of a long prompt otherwise."""
        x = self.embed_tokens(tokens, par)
        live = tokens >= 0
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            x, layer_cache = layer(x, positions, layer_cache, par, live)
            new_cache.append(layer_cache)
        if last is not None:
            x = jnp.take_along_axis(x, last[:, None, None], axis=1)
        x = self.final_norm(x)
        w = self.embed[...].T if self.tied else self.lm_head[...]
        logits = jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32)
        return logits, new_cache

    def cache_entries(self, layer: int) -> list[CacheEntry]:
        return self.layers[layer].attn.cache_entries()


def kv_heads_stored(num_kv_heads: int, num_heads: int, tp: int) -> int:
    """KV heads held in the (global) weights: repeated when the TP degree exceeds the number of KV heads."""
    if tp <= num_kv_heads:
        if num_kv_heads % tp:
            raise ValueError(f"{num_kv_heads} KV heads cannot be split over a tensor-parallel group of {tp}")
        return num_kv_heads
    if tp % num_kv_heads or num_heads % tp:
        raise ValueError(f"tensor-parallel degree {tp} must be a multiple of the {num_kv_heads} KV heads and "
                         f"divide the {num_heads} query heads")
    return tp

