"""Qwen3-MoE (`Qwen3MoeForCausalLM`): GQA attention with per-head q/k RMSNorm and RoPE, softmax top-k router,
SwiGLU experts, optional dense layers (`mlp_only_layers`, `decoder_sparse_step`).

Local view: runs inside the strategy's shard_map; heads, vocabulary and dense MLP width are split over the
attention TP group, experts over the EP group and their FFN width over the MoE TP group.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mixjax.models.base import CacheEntry, ConfigBase, CausalLM, DecoderLayer, MoE, kv_heads_stored
from mixjax.models.layers import (MLP, Experts, FusedLinear, Linear, RMSNorm, apply_rope, attend, causal_mask,
                                  rope_cos_sin, rope_inv_freq, write_cache)
from mixjax.kernels.decode_attention import decode_attention, reads_in_place as decode_attention_reads_in_place
from mixjax.kernels.decode_attention import supported as decode_attention_supported
from mixjax.kernels import gemv as gemv_kernel, router as router_kernel
from mixjax.kernels.flash_attention import prefill_attention, tiles_for
from mixjax.kernels.norm_rope import norm_rope, supported as norm_rope_supported
from mixjax.sharding.strategies import ParallelContext


@dataclasses.dataclass(frozen=True)
class Qwen3MoeConfig(ConfigBase):
    architecture = "Qwen3MoeForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense layers
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_shared_experts: int = 0

    @classmethod
    def from_hf(cls, c: dict) -> "Qwen3MoeConfig":
        rope = c.get("rope_parameters") or {}
        return cls(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            moe_intermediate_size=c["moe_intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_key_value_heads"],
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            num_experts=c["num_experts"] if "num_experts" in c else c["num_local_experts"],
            num_experts_per_tok=c["num_experts_per_tok"],
            norm_topk_prob=c.get("norm_topk_prob", False), decoder_sparse_step=c.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(c.get("mlp_only_layers") or ()), rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=c.get("rope_theta", rope.get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(c), max_position_embeddings=c.get("max_position_embeddings", 32768),
            tie_word_embeddings=c.get("tie_word_embeddings", False))

    def is_moe_layer(self, i: int) -> bool:
        return (i not in self.mlp_only_layers and self.num_experts > 0
                and (i + 1) % self.decoder_sparse_step == 0)

    def kv_cache_bytes_per_token(self, bytes_per_elem: int) -> int:
        return self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim * bytes_per_elem


def _rope_scaling(c: dict) -> dict | None:
    rs = c.get("rope_scaling") or c.get("rope_parameters")
    if not rs or rs.get("rope_type", rs.get("type", "default")) == "default":
        return None
    return dict(rs)


class Qwen3Attention(nnx.Module):
    def __init__(self, cfg: Qwen3MoeConfig, prefix: str, tp: int, *, dtype, rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        kv = kv_heads_stored(cfg.num_key_value_heads, cfg.num_attention_heads, tp)
        rep = (hd, kv // cfg.num_key_value_heads) if kv != cfg.num_key_value_heads else None
        # q, k and v in one weight (each TP device's block holds its q, k and v heads), out-major ([out, in], as HF
        # stores them): one product per prompt or decode step, one gemv kernel for a batch-1 decode step
        self.qkv_proj = FusedLinear(d, (cfg.num_attention_heads * hd, kv * hd, kv * hd), (None, "heads"),
                                    [f"{prefix}.{p}_proj.weight" for p in "qkv"], f"{prefix}.{{q,k,v}}_proj.weight",
                                    shards=tp, repeat_heads=(None, rep, rep), dtype=dtype, rngs=rngs, out_major=True)
        self.o_proj = Linear(cfg.num_attention_heads * hd, d, ("heads", None), f"{prefix}.o_proj.weight",
                             dtype=dtype, rngs=rngs, out_major=True)
        self.q_norm = RMSNorm(hd, f"{prefix}.q_norm.weight", eps=cfg.rms_norm_eps, dtype=dtype)
        self.k_norm = RMSNorm(hd, f"{prefix}.k_norm.weight", eps=cfg.rms_norm_eps, dtype=dtype)
        self.head_dim = hd
        self.kv_heads = kv
        self.rope = (cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)

    def cache_entries(self):
        return [CacheEntry("k", (self.kv_heads, self.head_dim), ("kv_heads", None), seq_axis=2),
                CacheEntry("v", (self.kv_heads, self.head_dim), ("kv_heads", None), seq_axis=2)]

    def __call__(self, x, positions, cache, par: ParallelContext, reduce: bool = True, norm=None):
        """x: the residual stream, normed here by `norm` (the layer's input norm) when given."""
        b, t, _ = x.shape
        hd = self.head_dim
        # this device's q, k and v heads: one product ([q | k | v]; one row on the Pallas path: a gemv kernel that
        # also computes the norm), or for a long prompt q and [k | v] as two
        ys = [y.reshape(b, t, -1, hd) for y in self.qkv_proj.products(x, ((0,), (1, 2)), norm, par.pallas)]
        hq, hk, _ = (w // hd for w in self.qkv_proj.local_widths(sum(y.shape[2] for y in ys) * hd))
        (qa, q0), (ka, k0) = ((ys[0], 0), (ys[0], hq)) if len(ys) == 1 else ((ys[0], 0), (ys[1], 0))
        q, k, v = qa[:, :, q0:q0 + hq], ka[:, :, k0:k0 + hk], ka[:, :, k0 + hk:k0 + 2 * hk]
        inv_freq, factor = rope_inv_freq(*self.rope)
        cos, sin = rope_cos_sin(positions, inv_freq, factor)
        starts = positions[:, 0]
        if par.pallas and t == 1 and decode_attention_supported(hd, cache["k"].shape[2], par.pallas == "gpu"):
            # one token per row: q/k norms, RoPE, cache write and attention in one kernel (XLA makes ~13 of them),
            # q, k and v read in place from the fused projection's output where they can be
            in_place = qa is ka and decode_attention_reads_in_place(hq, hk, qa.shape[2], q0)
            qkv = (qa[:, 0], None, None) if in_place else (q[:, 0], k[:, 0], v[:, 0])
            out, kc, vc = decode_attention(*qkv, cache["k"], cache["v"], starts,
                                           scale=hd ** -0.5, interpret=par.pallas == "interpret",
                                           qk_norm=(self.q_norm.w[...], self.k_norm.w[...], cos[:, 0], sin[:, 0]),
                                           eps=self.q_norm.eps, fused=(q0, hq, k0, k0 + hk) if in_place else None)
            cache = {"k": kc, "v": vc}
        else:
            if par.pallas and norm_rope_supported(hq, hd) and norm_rope_supported(hk, hd) and hq % hk == 0:
                # a prompt: each head's norm and rotation in one pass over q (XLA reads and writes it twice), the
                # heads read straight from the fused output
                q, k = (norm_rope(a, nrm.w[...], cos, sin, eps=nrm.eps, heads=h, first=first,
                                  interpret=par.pallas == "interpret")
                        for a, nrm, h, first in ((qa, self.q_norm, hq, q0), (ka, self.k_norm, hk, k0)))
            else:
                q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
            heads_major = lambda a: a.transpose(0, 2, 1, 3)  # [B, T, K, D] -> the cache's [B, K, T, D]
            cache = {"k": write_cache(cache["k"], heads_major(k), starts, seq_axis=2),
                     "v": write_cache(cache["v"], heads_major(v), starts, seq_axis=2)}
            kc, vc = cache["k"].astype(q.dtype), cache["v"].astype(q.dtype)
            tiles = tiles_for(t, kc.shape[2], hd) if par.pallas and t > 1 else None
            if tiles:  # prefill: flash attention, no [T, S] score matrix in memory
                out = prefill_attention(q, k, v, kc, vc, positions, scale=hd ** -0.5, tiles=tiles,
                                        pallas=par.pallas, fresh=par.fresh_prompt)
            else:
                out = attend(q, kc, vc, causal_mask(positions, kc.shape[2]), hd ** -0.5, heads_major=True)
        out = self.o_proj(out.reshape(b, t, -1), pallas=par.pallas)
        return (par.psum_attn_tp(out) if reduce else out), cache


class Qwen3MoE(MoE):
    def __init__(self, cfg: Qwen3MoeConfig, prefix: str, *, dtype, rngs):
        self.router = Linear(cfg.hidden_size, cfg.num_experts, (None, None), f"{prefix}.gate.weight",
                             dtype=dtype, rngs=rngs, out_major=True)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, prefix,
                               dtype=dtype, rngs=rngs)
        self.shared = None
        self.num_experts, self.top_k, self.norm_topk = cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob

    def route(self, x, pallas: str | None = None):
        """Softmax over all experts (float32), top-k, optionally renormalised over the k chosen. The Pallas path
        takes one kernel for it (mixjax.kernels.router) instead of XLA's five, whose top-k is a sort."""
        # The logits in float32, not rounded to x's dtype as Hugging Face's bf16 router does: at a near-tie a bf16
        # rounding flips the choice of an expert, which moves the row's output far more than any other rounding.
        # On the GPU XLA's prompt products kept them in float32 anyway (it drops a rounding to bf16 that a
        # conversion back to float32 follows); the router kernel and the one-row products read rounded ones. In a
        # 512-token prompt of 2 random layers (batch 1) 10-12% of the Pallas path's rows ended over 5e-2 from the
        # float32 model against 5-6% on XLA's; with float32 logits 7.6-9.0%, and at 2048 tokens 6.7-7.0% on both
        # (H200, 2026-12-04; docs/BENCHMARKS.md, twenty-fourth session).
        logits = self.router(x, pallas=pallas, out_dtype=jnp.float32)
        if pallas:
            ids, w = router_kernel.route(logits, k=self.top_k, norm=self.norm_topk, interpret=pallas == "interpret")
        else:
            ids, w = router_kernel.softmax_topk(logits, self.top_k, self.norm_topk)
        return ids, w.astype(x.dtype)

    def route_token(self, x, a, norm, pallas: str, live, rows: int):
        """One token (MoE.one_token): the router's product computes h = x + a, its norm and the logits, and writes
        the normed row for the experts; the router kernel masks the weights of a row without a token and rounds
        them to x's dtype, as `route` and MoE.__call__ do in XLA."""
        w_router = self.router.w[...]
        if not self.router.out_major or not gemv_kernel.supported(*w_router.shape, gpu=pallas == "gpu"):
            return None
        interpret = pallas == "interpret"
        logits, u = gemv_kernel.gemv_many(x, (w_router,), norm=norm.w[...], eps=norm.eps, add=a, emit=rows,
                                          interpret=interpret, out_dtype=jnp.float32)  # float32: see `route`
        ids, w = router_kernel.route(logits, k=self.top_k, norm=self.norm_topk, live=live, dtype=x.dtype,
                                     padded=True, interpret=interpret)
        return ids, w, u


class Qwen3MoeForCausalLM(CausalLM):
    def __init__(self, cfg: Qwen3MoeConfig, *, tp: int = 1, vocab_padded: int | None = None,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self._init_embeddings(cfg, vocab_padded or cfg.vocab_size, dtype=dtype, rngs=rngs)
        layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}"
            attn = Qwen3Attention(cfg, f"{p}.self_attn", tp, dtype=dtype, rngs=rngs)
            ffn = (Qwen3MoE(cfg, f"{p}.mlp", dtype=dtype, rngs=rngs) if cfg.is_moe_layer(i)
                   else MLP(cfg.hidden_size, cfg.intermediate_size, f"{p}.mlp", dtype=dtype, rngs=rngs))
            layers.append(DecoderLayer(attn, ffn, d_model=cfg.hidden_size, eps=cfg.rms_norm_eps, prefix=p,
                                       dtype=dtype))
        self.layers = nnx.List(layers)
