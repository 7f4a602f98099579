"""The compiled program of `hybrid_fused` holds, per MoE layer and chunk, the reduce-scatter over `gpu`, the
all-to-alls over `node` and the all-gathers over `gpu` of the fused AR-A2A, and no all-reduce in their place;
`hybrid` keeps the unfused all-reduce + all-to-all."""

import re

import pytest

from mixjax.models.qwen3_moe import Qwen3MoeConfig
from mixjax.sharding.mesh import make_mesh
from mixjax.sharding.runner import ShardedModel
from mixjax.sharding.strategies import STRATEGIES

CFG = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=8, num_experts=4,
                     num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=(),
                     rms_norm_eps=1e-6, rope_theta=1e4, rope_scaling=None, max_position_embeddings=64,
                     tie_word_embeddings=True)
LAYERS, CHUNKS = 2, 3


def collectives(strategy):
    model = ShardedModel(CFG, make_mesh("2x4"), STRATEGIES[strategy], fused_chunks=CHUNKS)
    hlo = model.lower_forward(2, 12, 12).compile().as_text()
    ops = {}
    for line in hlo.splitlines():
        m = re.search(r"= (?:\([^=]*?\)|\S+) (all-to-all|reduce-scatter|all-gather|all-reduce)(-start)?\(", line)
        if m:
            group = re.search(r"\{'(node|gpu)'(, '(node|gpu)')?\}", line)
            key = (m.group(1), group.group(0) if group else "?")
            ops[key] = ops.get(key, 0) + 1
    return ops


@pytest.fixture(scope="module")
def fused():
    return collectives("hybrid_fused")


def test_fused_has_chunked_rs_a2a_ag(fused):
    # per chunk: RS(attention partial sums), RS(expert partial sums); A2A tokens, A2A gates, A2A back;
    # AG tokens, AG gates, AG layer output
    assert fused[("reduce-scatter", "{'gpu'}")] == 2 * CHUNKS * LAYERS
    assert fused[("all-to-all", "{'node'}")] == 3 * CHUNKS * LAYERS
    assert fused[("all-gather", "{'gpu'}")] == 3 * CHUNKS * LAYERS


def test_fused_drops_the_attention_all_reduce(fused):
    # the only all-reduce left is the vocabulary-parallel embedding's
    assert sum(v for (op, _), v in fused.items() if op == "all-reduce") == 1


def test_unfused_hybrid_all_reduces_then_all_to_all():
    ops = collectives("hybrid")
    assert sum(v for (op, _), v in ops.items() if op == "all-reduce") == 1 + 2 * LAYERS
    assert ops[("all-to-all", "{'node'}")] == 3 * LAYERS
    assert not any(op == "reduce-scatter" for op, _ in ops)
