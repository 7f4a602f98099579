"""Bad checkpoints fail with an error that names the problem."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mixjax
from mixjax.checkpoint import CheckpointError
from mixjax.models import UnsupportedModelError
from conftest import FIXTURES

SOURCE = FIXTURES / "qwen3_moe_a"


@pytest.fixture
def ckpt(tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(SOURCE, dst)
    return dst


def _edit_tensors(d, fn):
    f = d / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f)


def test_missing_tensor_is_named(ckpt):
    name = "model.layers.0.self_attn.k_proj.weight"
    _edit_tensors(ckpt, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        mixjax.LLM(ckpt, progress=False)


def test_wrong_shape_is_named(ckpt):
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    _edit_tensors(ckpt, lambda t: t.__setitem__(name, np.zeros((3, 5), t[name].dtype)))
    with pytest.raises(CheckpointError, match=r"experts\.3\.up_proj.*\(3, 5\)"):
        mixjax.LLM(ckpt, progress=False)


def test_unsupported_architecture_names_supported_ones(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*DeepseekV3ForCausalLM.*Qwen3MoeForCausalLM"):
        mixjax.LLM(ckpt, progress=False)


def test_truncated_file_is_reported(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        mixjax.LLM(ckpt, progress=False)


def test_not_a_checkpoint_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        mixjax.LLM(tmp_path, progress=False)


@pytest.mark.parametrize("shards", [1, 2])
def test_fused_weight_reads_each_shards_heads_and_exports_back(tmp_path, shards):
    """A fused q/k/v weight (FusedLinear) holds, in TP shard piece s, block s of every part: a device's block read
    from the checkpoint is its q, k and v rows, and export writes the three tensors back exactly."""
    import jax.numpy as jnp
    from flax import nnx
    from mixjax.checkpoint import Checkpoint, read_slice
    from mixjax.export import hf_tensors
    from mixjax.models.layers import FusedLinear

    rng = np.random.RandomState(shards)
    parts = {n: rng.randn(o, 6).astype(np.float32) for n, o in (("q.weight", 8), ("k.weight", 4), ("v.weight", 4))}
    save_file(parts, str(tmp_path / "model.safetensors"))  # HF's [out, in]
    lin = FusedLinear(6, (8, 4, 4), (None, "heads"), list(parts), "{q,k,v}", shards=shards, dtype=jnp.float32,
                      rngs=nnx.Rngs(0), out_major=True)
    src, shape = lin.w.get_metadata()["source"], lin.w.shape
    ckpt = Checkpoint(tmp_path)
    rows = 16 // shards
    for s in range(shards):
        block = read_slice(ckpt, src, shape, (slice(s * rows, (s + 1) * rows), slice(None)), np.float32)
        want = np.concatenate([p[s * len(p) // shards:(s + 1) * len(p) // shards] for p in parts.values()])
        np.testing.assert_array_equal(block, want)
        assert [len(y) for y in lin.split(jnp.zeros(rows))] == [8 // shards, 4 // shards, 4 // shards]
    lin.w[...] = jnp.asarray(read_slice(ckpt, src, shape, (slice(None), slice(None)), np.float32))
    out = hf_tensors(lin)
    assert sorted(out) == sorted(parts)
    for name, p in parts.items():
        np.testing.assert_array_equal(out[name], p)


def test_fused_weight_missing_part_is_named(ckpt):
    name = "model.layers.1.self_attn.v_proj.weight"
    _edit_tensors(ckpt, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        mixjax.LLM(ckpt, progress=False)
