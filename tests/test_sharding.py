"""Every strategy computes the same function: on 8 simulated CPU devices, for meshes 1x8, 2x4, 4x2 and 8x1 and
every strategy the mesh admits, logits equal the single-device logits (float32, 1e-5 relative) and greedy
tokens are identical; also when every token routes to the experts of one node."""

import jax
import numpy as np
import pytest
from flax import nnx

from mixjax.models import load_config
from mixjax.sharding.mesh import LayoutError, check_layout, make_mesh
from mixjax.sharding.runner import ShardedModel, load_sharded
from mixjax.sharding.strategies import STRATEGIES, Strategy
from conftest import FIXTURES, prefill_and_greedy, reference, rel_err

SHARD_FIXTURES = ["qwen3_moe_shard", "deepseek_v3_shard"]
MESHES = ["1x8", "2x4", "4x2", "8x1"]
N_NEW = 4
_single = {}


def single_device(name, ids_key="input_ids"):
    key = (name, ids_key)
    if key not in _single:
        model = load_sharded(FIXTURES / name, make_mesh("1x1"), STRATEGIES["tp"], progress=False)
        _single[key] = prefill_and_greedy(model, reference(name)[ids_key], N_NEW)
    return _single[key]


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("name", SHARD_FIXTURES)
def test_strategy_matches_single_device(name, mesh, strategy):
    cfg = load_config(FIXTURES / name)
    m = make_mesh(mesh)
    try:
        check_layout(cfg, m, STRATEGIES[strategy])
    except LayoutError as e:
        pytest.skip(f"mesh does not admit the strategy: {e}")
    model = load_sharded(FIXTURES / name, m, STRATEGIES[strategy], progress=False)
    logits, greedy = prefill_and_greedy(model, reference(name)["input_ids"], N_NEW)
    ref_logits, ref_greedy = single_device(name)
    assert rel_err(logits, ref_logits) < 1e-5
    np.testing.assert_array_equal(greedy, ref_greedy)



@pytest.mark.parametrize("strategy", ["ep", "dp_ep", "hybrid", "hybrid_fused"])
def test_worst_case_imbalance(strategy):
    name = "deepseek_v3_shard"
    cfg = load_config(FIXTURES / name)

    def skewed(mesh, strat):
        model = load_sharded(FIXTURES / name, make_mesh(mesh), STRATEGIES[strat], progress=False)
        graphdef_state = nnx.state(nnx.merge(model.graphdef, model.state))
        skewed_layers = 0
        for path, var in nnx.to_flat_state(graphdef_state):
            if path[-1] == "bias":
                skewed_layers += 1
                b = np.zeros(var[...].shape, np.float32)
                b[: cfg.num_experts // 2] = 10.0  # experts of node 0 on a 2-node mesh
                var[...] = jax.device_put(b, var[...].sharding)
        assert skewed_layers == sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        model.state = graphdef_state
        return prefill_and_greedy(model, reference(name)["input_ids"], N_NEW)

    ref_logits, ref_greedy = skewed("1x1", "tp")
    logits, greedy = skewed("2x4", strategy)
    assert rel_err(logits, ref_logits) < 1e-5
    np.testing.assert_array_equal(greedy, ref_greedy)


def test_bad_meshes_fail_before_compiling():
    with pytest.raises(LayoutError, match="3x1 needs 3 devices, which must divide the 8"):
        make_mesh("3x1")
    with pytest.raises(LayoutError, match="NODExGPU"):
        make_mesh("eight")
    cfg = load_config(FIXTURES / "qwen3_moe_a")  # 4 heads, 2 KV heads, 6 experts, expert FFN 24
    with pytest.raises(LayoutError, match=r"4 attention heads do not split over attention TP degree 8.*"
                                          r"6 experts do not split over EP degree 8"):
        # attention TP and EP over all 8 devices: both problems are named in one error
        check_layout(cfg, make_mesh("1x8"), Strategy("tp_attn_ep", ("node", "gpu"), (), (), ("node", "gpu")))
    with pytest.raises(LayoutError, match="6 experts do not split over EP degree 4"):
        check_layout(cfg, make_mesh("1x4"), STRATEGIES["dp_ep"])
