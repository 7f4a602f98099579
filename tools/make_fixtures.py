#!/usr/bin/env python
"""Build the tiny Hugging Face reference fixtures under tests/fixtures/.

Run with the reference venv (torch + transformers, CPU only, no downloads):

    .venv-ref/bin/python tools/make_fixtures.py            # (re)build every fixture, then verify
    .venv-ref/bin/python tools/make_fixtures.py --verify   # only re-check the committed fixtures
    .venv-ref/bin/python tools/make_fixtures.py --only qwen3_moe_a deepseek_v3_b

Every fixture is a randomly initialised (fixed seed) tiny model saved with
`save_pretrained` (safetensors, Hub per-expert tensor naming) plus `reference.npz`:

    input_ids          int32   [2, 7]       random ids
    logits             float32 [2, 7, V]    full fp32 forward, eval mode, eager attention/experts
    prompt             int32   [1, 5]
    greedy             int32   [8]          greedy continuation of `prompt` (argmax, no EOS stop,
                                            at least 4 distinct tokens)
    imbalanced_ids     int32   [2, 7]       ids whose routing is skewed to experts with index < E // 2
    imbalanced_logits  float32 [2, 7, V]    logits for imbalanced_ids
    meta               str (JSON)           versions, margins, routing statistics, ablation deltas

Inputs are chosen so that every top-k / group decision and every greedy argmax has a
comfortable margin (ROUTER_MARGIN / LOGIT_MARGIN below), so an fp32 reimplementation
that differs from torch by rounding only cannot flip a discrete decision.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures"

BATCH, SEQ, PROMPT_LEN, N_NEW = 2, 7, 5, 8
ROUTER_MARGIN = 1e-3  # min gap (prob/score units) at every top-k and group-selection boundary
LOGIT_MARGIN = 1e-2  # min top1 - top2 logit gap at every greedy step
MIN_DISTINCT_GREEDY = 4  # avoid degenerate "same token forever" continuations (weak cache tests)
FP8_BLOCK = 16
FP8_MAX = 448.0  # largest finite float8_e4m3fn

# ----------------------------------------------------------------------------------------
# Fixture specifications
# ----------------------------------------------------------------------------------------
# hub_style: rewrite config.json after save_pretrained the way real Hub checkpoints look
#            (rope_theta + rope_scaling instead of transformers-5 "rope_parameters",
#            "num_experts" instead of "num_local_experts", no derived head_dim/qk_head_dim,
#            no rope_interleave key for DeepSeek, ...).  from_pretrained is verified on it.
SPECS: dict[str, dict] = {
    "qwen3_moe_a": dict(
        family="qwen3_moe",
        seed=1001,
        hub_style=False,
        config=dict(
            vocab_size=128, hidden_size=48, intermediate_size=64, moe_intermediate_size=24,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
            mlp_only_layers=[], tie_word_embeddings=False, rope_theta=1_000_000.0,
            max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.1,
        ),
    ),
    "qwen3_moe_b": dict(
        family="qwen3_moe",
        seed=1002,
        hub_style=True,
        config=dict(
            vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            num_experts=5, num_experts_per_tok=1, norm_topk_prob=False, decoder_sparse_step=1,
            mlp_only_layers=[0], tie_word_embeddings=True, rope_theta=10_000.0,
            max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.1,
        ),
    ),
    "qwen3_moe_c": dict(
        family="qwen3_moe",
        seed=1003,
        hub_style=True,
        shards=3,
        config=dict(
            vocab_size=112, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=12,
            num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=2,
            mlp_only_layers=[], tie_word_embeddings=False, rope_theta=1_000_000.0,
            max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.1,
        ),
    ),
    "deepseek_v3_a": dict(
        family="deepseek_v3",
        seed=2001,
        hub_style=False,
        config=dict(
            vocab_size=128, hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
            n_routed_experts=6, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
            first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            rope_theta=10_000.0, rope_interleave=False, max_position_embeddings=128,
            rms_norm_eps=1e-6, tie_word_embeddings=False, num_nextn_predict_layers=0,
            initializer_range=0.1,
        ),
    ),
    "deepseek_v3_b": dict(
        family="deepseek_v3",
        seed=2002,
        hub_style=True,
        config=dict(
            vocab_size=96, hidden_size=40, intermediate_size=48, moe_intermediate_size=24,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=8, qk_rope_head_dim=16, v_head_dim=8,
            n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, n_group=4, topk_group=2,
            first_k_dense_replace=0, routed_scaling_factor=2.5, norm_topk_prob=True,
            rope_theta=10_000.0, max_position_embeddings=128,
            rope_scaling={
                "type": "yarn", "rope_type": "yarn", "factor": 4.0,
                "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                "mscale": 1.0, "mscale_all_dim": 1.0,
            },
            rms_norm_eps=1e-6, tie_word_embeddings=False, num_nextn_predict_layers=0,
            initializer_range=0.1,
        ),
    ),
    # Like deepseek_v3_b (q_lora, group-limited routing, YaRN, 2 shared experts) but stored as
    # DeepSeek block-FP8.  Deliberate extras: 12 experts in 4 groups of 3 (so "sum of top-2 per
    # group" differs from "sum of group"), a dense first layer (so a dense MLP is quantised too),
    # mscale != mscale_all_dim (so YaRN's cos/sin attention_factor != 1), 3 layers, and a mix of
    # dimensions that are / are not multiples of 16 (o_proj and shared experts are whole blocks,
    # everything else has partial FP8 blocks).
    "deepseek_v3_fp8": dict(
        family="deepseek_v3",
        seed=2003,
        hub_style=True,
        fp8=True,
        config=dict(
            vocab_size=96, hidden_size=48, intermediate_size=56, moe_intermediate_size=24,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=8, qk_rope_head_dim=16, v_head_dim=8,
            n_routed_experts=12, n_shared_experts=2, num_experts_per_tok=3, n_group=4, topk_group=2,
            first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            rope_theta=10_000.0, max_position_embeddings=128,
            rope_scaling={
                "type": "yarn", "rope_type": "yarn", "factor": 4.0,
                "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                "mscale": 0.707, "mscale_all_dim": 1.0,
            },
            rms_norm_eps=1e-6, tie_word_embeddings=False, num_nextn_predict_layers=0,
            initializer_range=0.1,
        ),
    ),
    # For the sharding tests: dimensions that 1, 2, 4 and 8 devices all divide (8 heads, 8 experts, FFN widths
    # multiples of 8), 2 KV heads (so TP 4 and 8 repeat KV heads) and a vocabulary that 8 does not divide
    # (so the vocabulary is padded).
    "qwen3_moe_shard": dict(
        family="qwen3_moe",
        seed=3001,
        hub_style=True,
        config=dict(
            vocab_size=100, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
            mlp_only_layers=[0], tie_word_embeddings=False, rope_theta=10_000.0,
            max_position_embeddings=128, rms_norm_eps=1e-6, initializer_range=0.1,
        ),
    ),
    "deepseek_v3_shard": dict(
        family="deepseek_v3",
        seed=3002,
        hub_style=True,
        config=dict(
            vocab_size=96, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8,
            q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=2, topk_group=1,
            first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            rope_theta=10_000.0, max_position_embeddings=128,
            rms_norm_eps=1e-6, tie_word_embeddings=True, num_nextn_predict_layers=0,
            initializer_range=0.1,
        ),
    ),
}

FAMILIES = {
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
    "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
}


# ----------------------------------------------------------------------------------------
# Model construction
# ----------------------------------------------------------------------------------------
def make_config(spec: dict, eager: bool = True):
    cfg_cls, _ = FAMILIES[spec["family"]]
    cfg = cfg_cls(**copy.deepcopy(spec["config"]))
    if eager:
        cfg._attn_implementation = "eager"
        cfg._experts_implementation = "eager"
    return cfg


def build_model(spec: dict, seed: int) -> torch.nn.Module:
    _, model_cls = FAMILIES[spec["family"]]
    torch.manual_seed(seed)
    cfg = make_config(spec)
    model = model_cls(cfg).eval()
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # RMSNorm weights are initialised to 1; randomise them so that a reimplementation that
            # forgets (or misplaces) a norm weight is caught.
            if p.ndim == 1 and name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.05 * torch.randn(buf.shape, generator=g))
    return model


# ----------------------------------------------------------------------------------------
# Routing inspection (statistics and margins only; references always come from HF forward)
# ----------------------------------------------------------------------------------------
def moe_gates(model) -> list[tuple[int, torch.nn.Module]]:
    out = []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(layer.mlp, "experts"):
            out.append((i, gate))
    return out


class RouterCapture:
    """Forward hooks that record the router logits ([tokens, E], fp32) of every MoE layer."""

    def __init__(self, model):
        self.logits: dict[int, torch.Tensor] = {}
        self.handles = []
        for i, gate in moe_gates(model):
            self.handles.append(gate.register_forward_hook(self._hook(i)))

    def _hook(self, i):
        def fn(_mod, _inp, out):
            self.logits[i] = out[0].detach().float()

        return fn

    def close(self):
        for h in self.handles:
            h.remove()


def route(cfg, router_logits: torch.Tensor, gate=None, use_groups=True, use_bias=True):
    """Replicates the HF routing decision; returns (topk_idx [T,k], min boundary margin [T])."""
    k = cfg.num_experts_per_tok
    E = router_logits.shape[-1]
    x = router_logits.double()
    if cfg.model_type == "qwen3_moe":
        probs = torch.softmax(x, dim=-1)
        s = probs.sort(dim=-1, descending=True).values
        margin = s[:, k - 1] - s[:, k] if k < E else torch.full((x.shape[0],), math.inf)
        return probs.topk(k, dim=-1).indices, margin
    scores = torch.sigmoid(x)
    bias = gate.e_score_correction_bias.double() if use_bias else torch.zeros(E, dtype=torch.float64)
    choice = scores + bias
    ng, tg = (cfg.n_group, cfg.topk_group) if use_groups else (1, 1)
    gs = choice.view(-1, ng, E // ng).topk(2, dim=-1).values.sum(-1)
    margins = []
    if tg < ng:
        gsorted = gs.sort(dim=-1, descending=True).values
        margins.append(gsorted[:, tg - 1] - gsorted[:, tg])
    gidx = gs.topk(tg, dim=-1).indices
    gmask = torch.zeros_like(gs).scatter_(1, gidx, 1.0).bool()
    emask = gmask.unsqueeze(-1).expand(-1, ng, E // ng).reshape(-1, E)
    masked = choice.masked_fill(~emask, -math.inf)
    ms = masked.sort(dim=-1, descending=True).values
    if k < int(emask[0].sum()):
        margins.append(ms[:, k - 1] - ms[:, k])
    margin = torch.stack(margins, 0).min(0).values if margins else torch.full((x.shape[0],), math.inf)
    return masked.topk(k, dim=-1).indices, margin


@torch.no_grad()
def forward_with_routing(model, ids: torch.Tensor):
    cap = RouterCapture(model)
    try:
        logits = model(input_ids=ids).logits
    finally:
        cap.close()
    gates = dict(moe_gates(model))
    routing = {}
    for i, rl in cap.logits.items():
        idx, margin = route(model.config, rl, gates[i])
        routing[i] = (idx.view(*ids.shape, -1), margin.view(ids.shape))
    return logits, routing


def min_router_margin(routing) -> float:
    return min(float(m.min()) for _, m in routing.values()) if routing else math.inf


# ----------------------------------------------------------------------------------------
# Input selection
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_no_cache(model, prompt: torch.Tensor, n_new: int):
    ids = prompt.clone()
    margins = []
    for _ in range(n_new):
        last = model(input_ids=ids).logits[0, -1].double()
        top2 = last.topk(2).values
        margins.append(float(top2[0] - top2[1]))
        ids = torch.cat([ids, last.argmax().view(1, 1)], dim=1)
    return ids[0, prompt.shape[1]:], min(margins)


def pick_input_ids(model, rng: np.random.Generator, vocab: int):
    for _ in range(500):
        ids = torch.from_numpy(rng.integers(0, vocab, size=(BATCH, SEQ))).long()
        logits, routing = forward_with_routing(model, ids)
        if min_router_margin(routing) >= ROUTER_MARGIN:
            return ids, logits, routing
    return None


def pick_prompt(model, rng: np.random.Generator, vocab: int):
    for _ in range(500):
        prompt = torch.from_numpy(rng.integers(0, vocab, size=(1, PROMPT_LEN))).long()
        if (prompt == 0).any():  # generate(pad_token_id=0) would mask token 0 out of the prompt
            continue
        greedy, gmargin = greedy_no_cache(model, prompt, N_NEW)
        if gmargin < LOGIT_MARGIN or len(set(greedy.tolist())) < MIN_DISTINCT_GREEDY:
            continue
        full = torch.cat([prompt, greedy.view(1, -1)], dim=1)
        _, routing = forward_with_routing(model, full)
        if min_router_margin(routing) >= ROUTER_MARGIN:
            return prompt, greedy, gmargin, min_router_margin(routing)
    return None


@torch.no_grad()
def pick_imbalanced_ids(model, rng: np.random.Generator, vocab: int):
    """Token-by-token greedy construction (routing is causal): at each position pick, among all
    vocabulary tokens, one that sends the most top-k assignments to experts with index < E // 2
    (first MoE layer weighted most), subject to the routing margin."""
    cfg = model.config
    E = cfg.num_experts if cfg.model_type == "qwen3_moe" else cfg.n_routed_experts
    half = E // 2
    first_moe = moe_gates(model)[0][0]
    rows = []
    for _ in range(BATCH):
        prefix = torch.zeros((1, 0), dtype=torch.long)
        for _pos in range(SEQ):
            cand = torch.arange(vocab).view(-1, 1)
            batch = torch.cat([prefix.expand(vocab, -1), cand], dim=1)
            _, routing = forward_with_routing(model, batch)
            score = torch.zeros(vocab, dtype=torch.float64)
            ok = torch.ones(vocab, dtype=torch.bool)
            for li, (idx, margin) in routing.items():
                n_low = (idx[:, -1, :] < half).sum(-1).double()
                score += n_low * (100.0 if li == first_moe else 1.0)
                ok &= margin[:, -1] >= ROUTER_MARGIN
            score[~ok] = -1.0
            best = torch.nonzero(score == score.max()).flatten().numpy()
            tok = int(rng.choice(best))
            prefix = torch.cat([prefix, torch.tensor([[tok]])], dim=1)
        rows.append(prefix)
    ids = torch.cat(rows, 0)
    logits, routing = forward_with_routing(model, ids)
    if min_router_margin(routing) < ROUTER_MARGIN:
        return None
    return ids, logits, routing, half, first_moe


def routing_fractions(routing, half: int, first_moe: int) -> dict:
    low_first = float((routing[first_moe][0] < half).double().mean())
    all_idx = torch.cat([r[0].flatten() for r in routing.values()])
    return {"first_moe_layer": low_first, "all_moe_layers": float((all_idx < half).double().mean())}


# ----------------------------------------------------------------------------------------
# Hub-style config + FP8
# ----------------------------------------------------------------------------------------
def hubify_config(path: Path, family: str, fp8: bool):
    cfg = json.loads(path.read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp["rope_theta"]
    if rp.get("rope_type", "default") == "default":
        cfg["rope_scaling"] = None
    else:  # exactly the keys DeepSeek-V3's own config.json uses
        keep = ["beta_fast", "beta_slow", "factor", "mscale", "mscale_all_dim", "original_max_position_embeddings"]
        cfg["rope_scaling"] = {k: rp[k] for k in keep if k in rp} | {"type": rp["rope_type"]}
    cfg["torch_dtype"] = "bfloat16" if fp8 else cfg.pop("dtype", "float32")
    cfg.pop("dtype", None)
    if family == "qwen3_moe":
        cfg["num_experts"] = cfg.pop("num_local_experts")
        cfg["max_window_layers"] = cfg["num_hidden_layers"]
    else:
        for k in ("head_dim", "qk_head_dim", "rope_interleave"):
            cfg.pop(k, None)
        cfg.update(topk_method="noaux_tc", scoring_func="sigmoid", moe_layer_freq=1, ep_size=1)
    if fp8:
        cfg["quantization_config"] = {
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
        }
    path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def is_fp8_target(name: str, t: torch.Tensor) -> bool:
    if t.ndim != 2 or not name.endswith(".weight"):
        return False
    if name.endswith("embed_tokens.weight") or name == "lm_head.weight" or name.endswith("mlp.gate.weight"):
        return False
    return ".self_attn." in name or ".mlp." in name


def fp8_quantize(w: torch.Tensor, bs: int = FP8_BLOCK):
    out_f, in_f = w.shape
    nb_o, nb_i = math.ceil(out_f / bs), math.ceil(in_f / bs)
    pad = torch.zeros(nb_o * bs, nb_i * bs, dtype=torch.float32)
    pad[:out_f, :in_f] = w.float()
    blocks = pad.view(nb_o, bs, nb_i, bs)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).float()
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.reshape(nb_o * bs, nb_i * bs)[:out_f, :in_f].to(torch.float8_e4m3fn).contiguous()
    return q, scale.contiguous()


def fp8_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, bs: int = FP8_BLOCK) -> torch.Tensor:
    out_f, in_f = q.shape
    s = scale_inv.float().repeat_interleave(bs, 0)[:out_f].repeat_interleave(bs, 1)[:, :in_f]
    return q.float() * s


def load_fp8_checkpoint_dequantized(d: Path) -> dict[str, torch.Tensor]:
    """Independent reader: every `X.weight` with a sibling `X.weight_scale_inv` is dequantised."""
    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    out = {}
    for k, v in sd.items():
        if k.endswith("_scale_inv"):
            continue
        if k + "_scale_inv" in sd:
            assert v.dtype == torch.float8_e4m3fn, k
            out[k] = fp8_dequantize(v, sd[k + "_scale_inv"])
        else:
            out[k] = v.float()
    return out


# ----------------------------------------------------------------------------------------
# Ablations: how far the reference moves if one modelling detail is changed (sensitivity)
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def ablations(spec: dict, model, ids: torch.Tensor, ref: torch.Tensor) -> dict:
    _, model_cls = FAMILIES[spec["family"]]
    sd = model.state_dict()
    variants = {}
    base = copy.deepcopy(spec["config"])
    if spec["family"] == "qwen3_moe":
        variants["norm_topk_prob_flipped"] = dict(norm_topk_prob=not base["norm_topk_prob"])
        variants["rope_theta_x2"] = dict(rope_theta=base["rope_theta"] * 2)
    else:
        variants["rope_interleave_flipped"] = dict(rope_interleave=not base.get("rope_interleave", True))
        variants["routed_scaling_factor_1"] = dict(routed_scaling_factor=1.0)
        if base["n_group"] > 1:
            variants["no_group_limit"] = dict(n_group=1, topk_group=1)
        if base.get("rope_scaling"):
            variants["no_yarn"] = dict(rope_scaling=None)
    out = {}
    for name, delta in variants.items():
        c = dict(base, **delta)
        cfg = FAMILIES[spec["family"]][0](**c)
        cfg._attn_implementation = cfg._experts_implementation = "eager"
        m = model_cls(cfg).eval()
        m.load_state_dict(sd)
        out[name] = float((m(input_ids=ids).logits - ref).abs().max())
    if spec["family"] == "deepseek_v3":
        m = copy.deepcopy(model)
        for _, gate in moe_gates(m):
            gate.e_score_correction_bias.zero_()
        out["e_score_correction_bias_zeroed"] = float((m(input_ids=ids).logits - ref).abs().max())
    m = copy.deepcopy(model)
    for name, p in m.named_parameters():
        if p.ndim == 1 and name.endswith("norm.weight"):
            p.fill_(1.0)
    out["norm_weights_ignored"] = float((m(input_ids=ids).logits - ref).abs().max())
    return out


# ----------------------------------------------------------------------------------------
# Main build
# ----------------------------------------------------------------------------------------
def to_hub_state_dict(model) -> dict[str, torch.Tensor]:
    """State dict in Hub naming, obtained through save_pretrained's own reverse conversion."""
    with tempfile.TemporaryDirectory() as td:
        model.save_pretrained(td)
        sd = {}
        for f in sorted(Path(td).glob("*.safetensors")):
            sd.update(load_file(str(f)))
    return sd


@torch.no_grad()
def build_fixture(name: str, spec: dict) -> dict:
    family = spec["family"]
    vocab = spec["config"]["vocab_size"]
    _, model_cls = FAMILIES[family]
    out_dir = OUT / name
    seed = spec["seed"]
    for attempt in range(20):
        model = build_model(spec, seed + 100 * attempt)
        fp8_tensors = orig_model = None
        if spec.get("fp8"):
            orig_model = model
            # Quantise (Hub naming), then make the reference model hold exactly the dequantised
            # values; non-quantised tensors are stored (and used) at bf16 precision, except the
            # router bias which DeepSeek keeps in fp32.
            hub_sd = to_hub_state_dict(model)
            fp8_tensors, deq = {}, {}
            for k, v in hub_sd.items():
                if is_fp8_target(k, v):
                    q, s = fp8_quantize(v)
                    fp8_tensors[k], fp8_tensors[k + "_scale_inv"] = q, s
                    deq[k] = fp8_dequantize(q, s)
                elif k.endswith("e_score_correction_bias"):
                    fp8_tensors[k] = v.float().contiguous()
                    deq[k] = v.float()
                else:
                    fp8_tensors[k] = v.to(torch.bfloat16).contiguous()
                    deq[k] = fp8_tensors[k].float()
            with tempfile.TemporaryDirectory() as td:
                model.config.save_pretrained(td)
                save_file(deq, str(Path(td) / "model.safetensors"), metadata={"format": "pt"})
                model = model_cls.from_pretrained(
                    td, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
                ).eval()
        rng = np.random.default_rng(seed + attempt)
        picked = pick_input_ids(model, rng, vocab)
        pr = pick_prompt(model, rng, vocab) if picked else None
        imb = pick_imbalanced_ids(model, rng, vocab) if pr else None
        if picked and pr and imb:
            break
        print(f"  [{name}] attempt {attempt}: margins too small, reseeding")
    else:
        raise RuntimeError(f"{name}: could not find inputs with safe margins")
    ids, logits, routing = picked
    prompt, greedy, gmargin, prompt_rmargin = pr
    imb_ids, imb_logits, imb_routing, half, first_moe = imb

    # Cross-check greedy with HF generate (KV cache path); EOS stopping disabled.
    gen = model.generate(
        prompt, do_sample=False, max_new_tokens=N_NEW, eos_token_id=None, pad_token_id=0,
        num_beams=1, top_k=None, top_p=None, temperature=None,
    )[0, PROMPT_LEN:]
    generate_agrees = bool(torch.equal(gen, greedy))
    assert generate_agrees, (name, gen.tolist(), greedy.tolist())

    # Routing statistics that show the fixture exercises the intended features.
    cfg = model.config
    stats = {}
    cap = RouterCapture(model)
    model(input_ids=ids)
    cap.close()
    gates = dict(moe_gates(model))
    if family == "deepseek_v3":
        changed_bias = changed_group = 0
        total = 0
        for li, rl in cap.logits.items():
            base_idx, _ = route(cfg, rl, gates[li])
            nob, _ = route(cfg, rl, gates[li], use_bias=False)
            nog, _ = route(cfg, rl, gates[li], use_groups=False)
            srt = lambda t: t.sort(-1).values  # noqa: E731
            changed_bias += int((srt(base_idx) != srt(nob)).any(-1).sum())
            changed_group += int((srt(base_idx) != srt(nog)).any(-1).sum())
            total += rl.shape[0]
        stats["tokens_whose_topk_changes_without_bias"] = f"{changed_bias}/{total}"
        stats["tokens_whose_topk_changes_without_group_limit"] = f"{changed_group}/{total}"
    abl = ablations(spec, model, ids, logits)
    if orig_model is not None:
        abl["fp8_vs_unquantised_fp32_weights"] = float((orig_model(input_ids=ids).logits - logits).abs().max())

    # Write the checkpoint.
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    if fp8_tensors is not None:
        model.config.save_pretrained(out_dir)
        model.generation_config.save_pretrained(out_dir)
        save_file(fp8_tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    elif spec.get("shards"):
        total_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        max_shard = int(total_bytes / spec["shards"]) + 1
        model.save_pretrained(out_dir, max_shard_size=max_shard)
    else:
        model.save_pretrained(out_dir)
    if spec["hub_style"]:
        hubify_config(out_dir / "config.json", family, bool(spec.get("fp8")))

    meta = {
        "name": name,
        "family": family,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "seed": seed,
        "attempt": attempt,
        "reference_attn_implementation": "eager",
        "reference_experts_implementation": "eager",
        "rope_interleave": getattr(cfg, "rope_interleave", None),
        "hub_style_config": spec["hub_style"],
        "fp8": bool(spec.get("fp8")),
        "min_router_margin_input_ids": min_router_margin(routing),
        "min_router_margin_prompt_and_greedy": prompt_rmargin,
        "min_greedy_logit_margin": gmargin,
        "min_router_margin_imbalanced_ids": min_router_margin(imb_routing),
        "imbalanced_half": half,
        "imbalanced_first_moe_layer": first_moe,
        "imbalanced_fraction_low_experts": routing_fractions(imb_routing, half, first_moe),
        "input_ids_fraction_low_experts": routing_fractions(routing, half, first_moe),
        "moe_layers": [i for i, _ in moe_gates(model)],
        "generate_agrees_with_no_cache_greedy": generate_agrees,
        "ablation_max_abs_logit_delta": abl,
        **stats,
    }
    np.savez(
        out_dir / "reference.npz",
        input_ids=ids.numpy().astype(np.int32),
        logits=logits.float().numpy(),
        prompt=prompt.numpy().astype(np.int32),
        greedy=greedy.numpy().astype(np.int32),
        imbalanced_ids=imb_ids.numpy().astype(np.int32),
        imbalanced_logits=imb_logits.float().numpy(),
        meta=np.array(json.dumps(meta, sort_keys=True)),
    )
    return meta


# ----------------------------------------------------------------------------------------
# Verification: reload from disk with from_pretrained and compare
# ----------------------------------------------------------------------------------------
def check_fp8_semantics(d: Path) -> dict:
    """Cross-check the block dequantisation against (1) a naive per-block loop and (2)
    transformers' own Fp8Dequantize for tensors whose shape is a multiple of the block size
    (that HF helper rejects partial blocks, so it cannot load this checkpoint as a whole)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    sd = load_file(str(d / "model.safetensors"))
    n_q = n_partial = n_hf = 0
    for k, q in sd.items():
        if k + "_scale_inv" not in sd:
            continue
        s = sd[k + "_scale_inv"]
        n_q += 1
        rows, cols = q.shape
        assert s.shape == (math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK)) and s.dtype == torch.float32, k
        naive = torch.empty(rows, cols)
        for bi in range(s.shape[0]):
            for bj in range(s.shape[1]):
                r, c = slice(bi * FP8_BLOCK, (bi + 1) * FP8_BLOCK), slice(bj * FP8_BLOCK, (bj + 1) * FP8_BLOCK)
                naive[r, c] = q[r, c].float() * s[bi, bj]
        assert torch.equal(naive, fp8_dequantize(q, s)), k
        if rows % FP8_BLOCK or cols % FP8_BLOCK:
            n_partial += 1
        else:
            hf = Fp8Dequantize(None)._dequantize_one(q, s, torch.float32)
            assert torch.equal(hf, naive), k
            n_hf += 1
    return {"fp8_quantized_tensors": n_q, "fp8_with_partial_blocks": n_partial, "fp8_checked_against_hf_dequant": n_hf}


@torch.no_grad()
def verify_fixture(name: str) -> dict:
    d = OUT / name
    ref = np.load(d / "reference.npz")
    cfg_json = json.loads((d / "config.json").read_text())
    family = cfg_json["model_type"]
    _, model_cls = FAMILIES[family]
    report = {}
    # Hub naming: no fused expert tensors anywhere.
    names = []
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            names += list(s.keys())
    assert not any("gate_up_proj" in n for n in names), name
    assert any(".mlp.experts.0.gate_proj.weight" in n for n in names), name
    report["n_tensors"] = len(names)
    report["n_files"] = len(list(d.glob("*.safetensors")))

    if "quantization_config" in cfg_json:
        deq = load_fp8_checkpoint_dequantized(d)
        report.update(check_fp8_semantics(d))
        td = tempfile.mkdtemp()
        try:
            plain = dict(cfg_json)
            plain.pop("quantization_config")
            (Path(td) / "config.json").write_text(json.dumps(plain))
            save_file(deq, str(Path(td) / "model.safetensors"), metadata={"format": "pt"})
            models = {
                impl: model_cls.from_pretrained(
                    td, dtype=torch.float32, attn_implementation=impl[0], experts_implementation=impl[1]
                ).eval()
                for impl in [("eager", "eager"), ("sdpa", "grouped_mm")]
            }
        finally:
            shutil.rmtree(td)
    else:
        models = {
            impl: model_cls.from_pretrained(
                d, dtype=torch.float32, attn_implementation=impl[0], experts_implementation=impl[1]
            ).eval()
            for impl in [("eager", "eager"), ("sdpa", "grouped_mm")]
        }
    for impl, m in models.items():
        tag = "+".join(impl)
        for key_ids, key_logits in [("input_ids", "logits"), ("imbalanced_ids", "imbalanced_logits")]:
            got = m(input_ids=torch.from_numpy(ref[key_ids]).long()).logits.numpy()
            report[f"{tag}:{key_logits}_max_abs_diff"] = float(np.abs(got - ref[key_logits]).max())
        greedy, _ = greedy_no_cache(m, torch.from_numpy(ref["prompt"]).long(), N_NEW)
        report[f"{tag}:greedy_equal"] = bool(np.array_equal(greedy.numpy(), ref["greedy"]))
    eager = report["eager+eager:logits_max_abs_diff"], report["eager+eager:imbalanced_logits_max_abs_diff"]
    assert max(eager) < 1e-5, (name, report)
    assert report["sdpa+grouped_mm:logits_max_abs_diff"] < 1e-4, (name, report)
    assert report["eager+eager:greedy_equal"] and report["sdpa+grouped_mm:greedy_equal"], (name, report)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verify", action="store_true", help="only verify existing fixtures")
    ap.add_argument("--only", nargs="*", default=None, help="subset of fixture names")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    names = args.only or list(SPECS)
    for n in names:
        if n not in SPECS:
            ap.error(f"unknown fixture {n!r}; known: {', '.join(SPECS)}")
    if not args.verify:
        for n in names:
            print(f"building {n} ...", flush=True)
            meta = build_fixture(n, SPECS[n])
            print(json.dumps(meta, indent=1, sort_keys=True), flush=True)
    for n in names:
        rep = verify_fixture(n)
        print(f"verified {n}: {json.dumps(rep, sort_keys=True)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
