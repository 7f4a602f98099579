"""Model presets (real Hugging Face config.json field names) and cluster presets (nameplate hardware numbers).

Cluster numbers are vendor nameplate figures and are only *starting points*: measured NCCL / RDMA bandwidth is
often well below them and the latencies (alpha) are rough guesses. Calibrate before trusting absolute times.
"""

from __future__ import annotations

import dataclasses

GB = 1e9
GiB = 2**30

_DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "first_k_dense_replace": 3, "moe_layer_freq": 1,
    "num_attention_heads": 128, "num_key_value_heads": 128,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    "rms_norm_eps": 1e-6, "rope_theta": 10000, "max_position_embeddings": 163840, "tie_word_embeddings": False,
    "rope_scaling": {"type": "yarn", "rope_type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                     "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
    "torch_dtype": "bfloat16",
}

_QWEN3_235B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 1536,
    "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128,
    "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}

_QWEN3_30B = dict(_QWEN3_235B, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                  num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4)

# name -> (HF config dict, default bytes per weight element). DeepSeek-V3/R1 ship FP8 block weights.
MODEL_PRESETS: dict[str, tuple[dict, float]] = {
    "deepseek-r1": (_DEEPSEEK_V3, 1.0),
    "deepseek-v3": (_DEEPSEEK_V3, 1.0),
    "qwen3-235b-a22b": (_QWEN3_235B, 2.0),
    "qwen3-30b-a3b": (_QWEN3_30B, 2.0),
}


def model_preset(name: str):
    """(config, weight_bytes) for a preset name, config loaded through mixjax.models.config_from_hf."""
    from mixjax.models import config_from_hf  # noqa: PLC0415

    key = name.lower()
    if key not in MODEL_PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    raw, wbytes = MODEL_PRESETS[key]
    return config_from_hf(dict(raw)), wbytes


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    name: str
    nodes: int
    gpus_per_node: int
    hbm_bytes: float  # per GPU
    hbm_bw: float  # bytes/s per GPU
    peak_flops: float  # dense bf16 FLOP/s per GPU
    intra_bw: float  # NVLink bytes/s per GPU per direction
    intra_alpha: float  # s per collective step over NVLink
    inter_bw: float  # bytes/s per GPU NIC (one NIC per GPU, rail aligned)
    inter_alpha: float  # s per collective step over the network
    # --- set by calibration profiles (mixjax.planner.calibrate); nameplate presets leave the defaults
    # per link ("intra", "inter", and "world" = both axes at once on the calibrated mesh) and collective
    # ("all_reduce", "all_gather", "reduce_scatter", "all_to_all"): {"alpha": s, "bw": bytes/s}
    collectives: dict | None = dataclasses.field(default=None, compare=False, repr=False)
    calib_mesh: tuple[int, int] | None = None  # (nodes, gpus) the "world" fits were measured on
    mm_half_width: float = 0.0  # matmul rate = peak_flops * w / (w + this), w = narrowest dimension (0: peak)
    relayout_bw: float = 0.0  # bytes/s of layout-changing copies (transposes); 0: hbm_bw
    # grouped expert kernels' achieved (FLOP/s, bytes/s) per row-block size BM, measured by calibrate's probe
    # of mixjax.kernels.grouped_experts (GPU profiles); None: the matmul width curve and hbm_bw instead
    grouped_rates: dict | None = dataclasses.field(default=None, compare=False, repr=False)
    op_overhead: float = 0.0  # s per kernel launched inside a step (used when a kernel count is known)
    step_overhead: float = 0.0  # s per jitted call
    source: str = "nameplate"  # where the numbers come from, for reports
    platform: str = "gpu"  # jax platform of the devices ("gpu", "cpu", ...): mixjax's default expert path there

    def coll_params(self, link: str, kind: str) -> tuple[float, float] | None:
        """(alpha, bw) of a collective on a link: the calibrated fit if there is one, else the link's numbers
        (None for "world" without a fit: the cost model then composes it from intra and inter)."""
        fit = (self.collectives or {}).get(link, {}).get(kind)
        if fit is not None:
            return fit["alpha"], fit["bw"]
        if link == "intra":
            return self.intra_alpha, self.intra_bw
        if link == "inter":
            return self.inter_alpha, self.inter_bw
        return None

    def with_shape(self, nodes: int, gpus_per_node: int) -> "ClusterSpec":
        return dataclasses.replace(self, nodes=nodes, gpus_per_node=gpus_per_node)


def _gbit(x):  # Gb/s -> bytes/s
    return x * 1e9 / 8


# Nameplate: H100/H800 SXM 80 GB HBM3 3.35 TB/s, 989 TFLOP/s dense bf16; H200 141 GB HBM3e 4.8 TB/s;
# H20 96 GB 4.0 TB/s, 148 TFLOP/s. NVLink per direction: H100/H200/H20 450 GB/s (900 GB/s total), H800 200 GB/s
# (400 GB/s total). NIC: one 400 Gb/s (50 GB/s) or 200 Gb/s (25 GB/s) port per GPU. Alphas are guesses.
CLUSTER_PRESETS: dict[str, ClusterSpec] = {c.name: c for c in [
    ClusterSpec("h100-ib", 2, 8, 80 * GB, 3.35e12, 989e12, 450 * GB, 2e-6, _gbit(400), 5e-6),
    ClusterSpec("h200-ib", 2, 8, 141 * GB, 4.8e12, 989e12, 450 * GB, 2e-6, _gbit(400), 5e-6),
    ClusterSpec("h800-roce", 2, 8, 80 * GB, 3.35e12, 989e12, 200 * GB, 2e-6, _gbit(400), 8e-6),
    ClusterSpec("h800-roce-200", 2, 8, 80 * GB, 3.35e12, 989e12, 200 * GB, 2e-6, _gbit(200), 8e-6),
    ClusterSpec("h20-roce", 2, 8, 96 * GB, 4.0e12, 148e12, 450 * GB, 2e-6, _gbit(200), 8e-6),
]}


def cluster_preset(name: str, nodes: int | None = None, gpus_per_node: int | None = None) -> ClusterSpec:
    key = name.lower()
    if key not in CLUSTER_PRESETS:
        raise KeyError(f"unknown cluster preset {name!r}; choose one of {sorted(CLUSTER_PRESETS)}")
    c = CLUSTER_PRESETS[key]
    return c.with_shape(nodes or c.nodes, gpus_per_node or c.gpus_per_node)
