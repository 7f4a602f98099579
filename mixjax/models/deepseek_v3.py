"""DeepSeek-V3 / R1 (`DeepseekV3ForCausalLM`): Multi-head Latent Attention, sigmoid router with score-correction
bias and group-limited top-k, routed scaling, shared experts, dense first layers.

MLA caches the compressed latent c_kv [kv_lora_rank] and the rotated key part k_pe [qk_rope_head_dim] per token,
not full keys and values: the latent is shared by all heads, so under attention TP every device of the group
keeps the same latent and expands it with its own heads' slice of kv_b_proj.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mixjax.kernels.flash_attention import mla_cudnn_supported, mla_flash_attention, mla_supported, mla_tiles_for
from mixjax.models.base import CacheEntry, ConfigBase, CausalLM, DecoderLayer, MoE
from mixjax.models.layers import (MLP, Experts, FusedLinear, Linear, RMSNorm, Source, apply_rope, attend,
                                  causal_mask, matmul, project, rope_cos_sin, rope_inv_freq, write_cache, yarn_mscale,
                                  zeros_param)
from mixjax.models.qwen3_moe import _rope_scaling
from mixjax.sharding.strategies import ParallelContext


@dataclasses.dataclass(frozen=True)
class DeepseekV3Config(ConfigBase):
    architecture = "DeepseekV3ForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    num_experts: int  # n_routed_experts
    num_experts_per_tok: int
    num_shared_experts: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    first_k_dense_replace: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    rope_interleave: bool
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, c: dict) -> "DeepseekV3Config":
        rope = c.get("rope_parameters") or {}
        return cls(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            moe_intermediate_size=c["moe_intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"], q_lora_rank=c.get("q_lora_rank"),
            kv_lora_rank=c["kv_lora_rank"], qk_nope_head_dim=c["qk_nope_head_dim"],
            qk_rope_head_dim=c["qk_rope_head_dim"], v_head_dim=c["v_head_dim"],
            num_experts=c["n_routed_experts"] if "n_routed_experts" in c else c["num_local_experts"],
            num_experts_per_tok=c["num_experts_per_tok"],
            num_shared_experts=c.get("n_shared_experts") or 0, n_group=c.get("n_group") or 1,
            topk_group=c.get("topk_group") or 1, routed_scaling_factor=c.get("routed_scaling_factor", 1.0),
            norm_topk_prob=c.get("norm_topk_prob", True), first_k_dense_replace=c.get("first_k_dense_replace", 0),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=c.get("rope_theta", rope.get("rope_theta", 10000.0)), rope_scaling=_rope_scaling(c),
            rope_interleave=c.get("rope_interleave", True),
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            tie_word_embeddings=c.get("tie_word_embeddings", False))

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace and self.num_experts > 0

    @property
    def num_key_value_heads(self) -> int:  # MLA: one latent shared by all heads
        return 1

    def kv_cache_bytes_per_token(self, bytes_per_elem: int) -> int:
        return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * bytes_per_elem


# New tokens per row up to which MLA attends in the latent space (decode, short chunks); longer prompts expand the
# latent into per-head keys and values once, which costs fewer FLOPs when the new tokens are many.
ABSORB_MAX_TOKENS = 16


class MLA(nnx.Module):
    """q/kv low-rank projections; the reference's q_a_layernorm and kv_a_layernorm use eps 1e-6 whatever the
    config's rms_norm_eps (transformers' DeepseekV3Attention), and so do these."""

    def __init__(self, cfg: DeepseekV3Config, prefix: str, *, dtype, rngs):
        d, h = cfg.hidden_size, cfg.num_attention_heads
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        kv_a = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        kv_a_name = f"{prefix}.kv_a_proj_with_mqa.weight"
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(d, h * qk, (None, "heads"), f"{prefix}.q_proj.weight", dtype=dtype, rngs=rngs)
            self.kv_a_proj = Linear(d, kv_a, (None, None), kv_a_name, dtype=dtype, rngs=rngs)
        else:
            # both down-projections of x in one weight (replicated): one product reads x once
            self.qkv_a_proj = FusedLinear(d, (cfg.q_lora_rank, kv_a), (None, None),
                                          [f"{prefix}.q_a_proj.weight", kv_a_name],
                                          f"{prefix}.{{q_a_proj,kv_a_proj_with_mqa}}.weight", dtype=dtype, rngs=rngs)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, f"{prefix}.q_a_layernorm.weight", eps=1e-6,
                                    dtype=dtype)
            self.q_b_proj = Linear(cfg.q_lora_rank, h * qk, (None, "heads"), f"{prefix}.q_b_proj.weight",
                                   dtype=dtype, rngs=rngs)
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, f"{prefix}.kv_a_layernorm.weight", eps=1e-6,
                                 dtype=dtype)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), (None, "heads"),
                                f"{prefix}.kv_b_proj.weight", dtype=dtype, rngs=rngs)
        self.o_proj = Linear(h * cfg.v_head_dim, d, ("heads", None), f"{prefix}.o_proj.weight", dtype=dtype,
                             rngs=rngs)
        self.has_q_lora = cfg.q_lora_rank is not None
        self.dims = (cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim)
        self.interleave = cfg.rope_interleave
        self.rope = (cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        scale = qk ** -0.5
        rs = cfg.rope_scaling or {}
        if rs.get("mscale_all_dim"):  # YaRN also sharpens the softmax (DeepSeek's reference does the same)
            scale *= yarn_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2
        self.scale = scale

    def cache_entries(self):
        lora, _, rope, _ = self.dims
        return [CacheEntry("c_kv", (lora,), (None,)), CacheEntry("k_pe", (rope,), (None,))]

    def __call__(self, x, positions, cache, par: ParallelContext, reduce: bool = True, norm=None):
        """x: the residual stream, normed here by `norm` (the layer's input norm) when given."""
        x = x if norm is None else norm(x)
        b, t, _ = x.shape
        lora, nope, rope_d, v_d = self.dims
        if self.has_q_lora:
            q_a, kv_a = self.qkv_a_proj.split(self.qkv_a_proj(x))
            q = self.q_b_proj(self.q_a_norm(q_a))
        else:
            q, kv_a = project(x, (self.q_proj, self.kv_a_proj))
        q = q.reshape(b, t, -1, nope + rope_d)
        q_nope, q_pe = q[..., :nope], q[..., nope:]
        c_kv, k_pe = self.kv_a_norm(kv_a[..., :lora]), kv_a[..., None, lora:]
        inv_freq, factor = rope_inv_freq(*self.rope)
        cos, sin = rope_cos_sin(positions, inv_freq, factor)
        q_pe = apply_rope(q_pe, cos, sin, self.interleave)
        k_pe = apply_rope(k_pe, cos, sin, self.interleave)[:, :, 0]
        starts = positions[:, 0]
        cache = {"c_kv": write_cache(cache["c_kv"], c_kv, starts), "k_pe": write_cache(cache["k_pe"], k_pe, starts)}
        if t <= ABSORB_MAX_TOKENS:
            out = self._attend_latent(q_nope, q_pe, cache, positions)
        elif par.pallas == "gpu" and par.fresh_prompt and mla_cudnn_supported(nope + rope_d, v_d,
                                                                                 jnp.dtype(x.dtype).itemsize):
            out = self._attend_cudnn(q_nope, q_pe, c_kv, k_pe)
        else:  # expand the cached latent into this device's heads' keys and values
            kv = self.kv_b_proj(cache["c_kv"].astype(x.dtype))
            kv = kv.reshape(b, kv.shape[1], -1, nope + v_d)
            if par.pallas and mla_supported(nope, rope_d, v_d, kv.shape[1], gpu=par.pallas == "gpu"):
                # flash attention: no [B, H, T, S] score matrix in memory (34 GB per layer at 8192 tokens)
                out = mla_flash_attention(q_nope, q_pe, kv, cache["k_pe"].astype(x.dtype), positions,
                                          scale=self.scale, tiles=mla_tiles_for(t, kv.shape[1]),
                                          interpret=par.pallas == "interpret")
            else:
                out = self._attend_expanded(q_nope, q_pe, kv, cache["k_pe"], positions)
        out = self.o_proj(out.reshape(b, t, -1))
        return (par.psum_attn_tp(out) if reduce else out), cache

    def _attend_expanded(self, q_nope, q_pe, kv, k_pe, positions):
        """XLA's attention over the expanded cache kv [B, S, H, N + V]: the rotary key repeated for every head and
        the whole masked [B, H, T, S] float32 score matrix in memory."""
        nope = self.dims[1]
        b, s_len, heads, _ = kv.shape
        k_nope, v = kv[..., :nope], kv[..., nope:]
        k_pe_all = jnp.broadcast_to(k_pe.astype(q_nope.dtype)[:, :, None], (b, s_len, heads, k_pe.shape[-1]))
        k = jnp.concatenate([k_nope, k_pe_all], axis=-1)
        return attend(jnp.concatenate([q_nope, q_pe], axis=-1), k, v, causal_mask(positions, s_len), self.scale)

    def _attend_cudnn(self, q_nope, q_pe, c_kv, k_pe):
        """A whole prompt (every row from position 0: the caller's static promise, `fresh_prompt`) on the GPU: its
        own keys and values, expanded from its latent, through cuDNN's fused causal attention. jax's cuDNN path
        wants one head dim for q, k and v, so v is padded with zeros to q/k's (128 -> 192 for DeepSeek-V3) and the
        output cut back: at 8192 tokens on an H200 6.2 ms per layer against 8.2 ms for the Triton kernel
        (tools/probe_mla.py), as fast at 2048."""
        _, nope, rope_d, v_d = self.dims
        b, t, heads, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv.astype(q_nope.dtype)).reshape(b, t, heads, nope + v_d)
        k_pe_all = jnp.broadcast_to(k_pe.astype(q_nope.dtype)[:, :, None], (b, t, heads, rope_d))
        k = jnp.concatenate([kv[..., :nope], k_pe_all], axis=-1)
        v = jnp.pad(kv[..., nope:], ((0, 0), (0, 0), (0, 0), (0, nope + rope_d - v_d)))
        out = jax.nn.dot_product_attention(jnp.concatenate([q_nope, q_pe], axis=-1), k, v, scale=self.scale,
                                           is_causal=True, implementation="cudnn")
        return out[..., :v_d]

    def _attend_latent(self, q_nope, q_pe, cache, positions):
        """Attention in the latent space, for few new tokens over a long cache (decode): kv_b_proj's key half is
        folded into the queries and its value half applied after the weighted sum, so the cache is read once as
        [S, kv_lora_rank] instead of being expanded to every head's keys and values at every step (for
        DeepSeek-V3, per new token and head ~2.2k FLOPs per cached position instead of the expansion's ~33.5M per
        cached position and step). The same function as the expanded form; only the order of the sums differs.
            score_h(s) = (W_uk_h q_nope_h) . c_kv(s) + q_pe_h . k_pe(s),   out_h = W_uv_h^T sum_s p_h(s) c_kv(s)"""
        lora, nope, _, v_d = self.dims
        dt = q_nope.dtype
        w = self.kv_b_proj.w[...].reshape(lora, -1, nope + v_d)  # [lora, heads on this device, nope + v]
        w_uk, w_uv = w[..., :nope], w[..., nope:]
        c, k_pe = cache["c_kv"].astype(dt), cache["k_pe"].astype(dt)  # [B, S, lora], [B, S, rope]
        q_lat = jnp.einsum("bthn,lhn->bthl", q_nope, w_uk, preferred_element_type=jnp.float32).astype(dt)
        scores = (jnp.einsum("bthl,bsl->bhts", q_lat, c, preferred_element_type=jnp.float32)
                  + jnp.einsum("bthr,bsr->bhts", q_pe, k_pe, preferred_element_type=jnp.float32)) * self.scale
        scores = jnp.where(causal_mask(positions, c.shape[1]), scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        o_lat = jnp.einsum("bhts,bsl->bhtl", probs, c, preferred_element_type=jnp.float32).astype(dt)
        return jnp.einsum("bhtl,lhv->bthv", o_lat, w_uv, preferred_element_type=jnp.float32).astype(dt)


class DeepseekV3MoE(MoE):
    def __init__(self, cfg: DeepseekV3Config, prefix: str, *, dtype, rngs):
        self.router = Linear(cfg.hidden_size, cfg.num_experts, (None, None), f"{prefix}.gate.weight",
                             dtype=jnp.float32, rngs=rngs)
        self.bias = zeros_param((cfg.num_experts,), (None,), Source(f"{prefix}.gate.e_score_correction_bias"),
                                jnp.float32)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, prefix,
                               dtype=dtype, rngs=rngs)
        self.shared = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts,
                           f"{prefix}.shared_experts", dtype=dtype, rngs=rngs) if cfg.num_shared_experts else None)
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor

    def route(self, x, pallas: str | None = None):
        """Sigmoid scores; choose among the best `topk_group` groups (a group's score is the sum of its two best
        biased scores) the top-k by biased score; weights are the unbiased scores, renormalised and scaled.
        Always in XLA (`pallas` is not used: there is no kernel for group-limited routing)."""
        scores = jax.nn.sigmoid(matmul(x.astype(jnp.float32), self.router.w[...]))
        biased = scores + self.bias[...]
        n, e = biased.shape
        grouped = biased.reshape(n, self.n_group, e // self.n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
        _, best_groups = jax.lax.top_k(group_scores, self.topk_group)
        keep = jnp.any(jnp.arange(self.n_group)[None, :, None] == best_groups[:, None, :], axis=-1)  # [n, G]
        masked = jnp.where(jnp.repeat(keep, e // self.n_group, axis=1), biased, -jnp.inf)
        _, ids = jax.lax.top_k(masked, self.top_k)
        w = jnp.take_along_axis(scores, ids, axis=1)
        if self.norm_topk:
            w = w / (w.sum(-1, keepdims=True) + 1e-20)
        return ids, (w * self.scaling).astype(x.dtype)


class DeepseekV3ForCausalLM(CausalLM):
    def __init__(self, cfg: DeepseekV3Config, *, tp: int = 1, vocab_padded: int | None = None,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        if cfg.num_attention_heads % tp:
            raise ValueError(f"{cfg.num_attention_heads} attention heads cannot be split over a tensor-parallel "
                             f"group of {tp}")
        self.config = cfg
        self._init_embeddings(cfg, vocab_padded or cfg.vocab_size, dtype=dtype, rngs=rngs)
        layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}"
            attn = MLA(cfg, f"{p}.self_attn", dtype=dtype, rngs=rngs)
            ffn = (DeepseekV3MoE(cfg, f"{p}.mlp", dtype=dtype, rngs=rngs) if cfg.is_moe_layer(i)
                   else MLP(cfg.hidden_size, cfg.intermediate_size, f"{p}.mlp", dtype=dtype, rngs=rngs))
            layers.append(DecoderLayer(attn, ffn, d_model=cfg.hidden_size, eps=cfg.rms_norm_eps, prefix=p,
                                       dtype=dtype))
        self.layers = nnx.List(layers)
