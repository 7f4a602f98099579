"""Supported model families, keyed by the `architectures` entry of a Hugging Face config.json."""

from __future__ import annotations

import json
from pathlib import Path

from mixjax.models.deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM
from mixjax.models.qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM

ARCHITECTURES = {
    "Qwen3MoeForCausalLM": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
    "DeepseekV3ForCausalLM": (DeepseekV3Config, DeepseekV3ForCausalLM),
}


class UnsupportedModelError(ValueError):
    pass


def config_from_hf(raw: dict):
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            try:
                return ARCHITECTURES[arch][0].from_hf(raw)
            except KeyError as e:
                raise UnsupportedModelError(f"config.json for {arch} lacks the field {e.args[0]!r}") from None
    raise UnsupportedModelError(
        f"unsupported architecture {archs or raw.get('model_type')!r}; mixjax supports {sorted(ARCHITECTURES)}")


def load_config(model_dir: str | Path):
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json (expected a Hugging Face checkpoint directory)")
    return config_from_hf(json.loads(path.read_text()))


def model_class(cfg):
    return ARCHITECTURES[cfg.architecture][1]
