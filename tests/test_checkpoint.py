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
