"""Write a mixjax model as a Hugging Face checkpoint (config.json + model.safetensors), the inverse of the loader:
each parameter's `source` metadata names its tensor, says whether HF stores it transposed, and whether it is a
stack of per-expert tensors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import save_file


def hf_tensors(model, dtype=np.float32) -> dict[str, np.ndarray]:
    out = {}
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        src = var.get_metadata()["source"]
        if any(s.repeat_heads is not None and s.repeat_heads[1] != 1 for s in (src, *src.parts)):
            raise ValueError(f"{src.name}: export a model built with tp=1 (KV heads are repeated here)")
        arr = np.asarray(var.get_value(), dtype=np.float32)
        if src.parts:  # a fused weight: each part's shard pieces back together (checkpoint._fused_block's inverse)
            ax = 1 if src.transpose else 0
            pieces = np.split(arr, np.cumsum([p.width // src.shards for p in src.parts] * src.shards)[:-1], axis=ax)
            for i, part in enumerate(src.parts):
                full = np.concatenate(pieces[i::len(src.parts)], axis=ax)
                out[part.name] = np.ascontiguousarray((full.T if part.transpose else full).astype(dtype))
        elif src.experts is not None:
            for e in range(src.experts):
                out[src.name.format(e=e)] = np.ascontiguousarray((arr[e].T if src.transpose else arr[e]).astype(dtype))
        else:
            out[src.name] = np.ascontiguousarray((arr.T if src.transpose else arr).astype(dtype))
    return out


def save_hf_checkpoint(model, hf_config: dict, out_dir, dtype=np.float32) -> Path:
    """hf_config: the config.json contents (Hugging Face field names, including "architectures")."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_tensors(model, dtype), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return out
