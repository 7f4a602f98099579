"""The grouped expert kernels (Pallas, run interpreted on CPU) compute the same function as the dense path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_dirs, interpreted_model, reference, rel_err
from mixjax.kernels import grouped_experts
from mixjax.kernels.grouped_experts import (Blocks, choose_blocks, expert_layout, group_layout, grouped_swiglu,
                                            layout_kind, pair_layout)
from mixjax.sharding.mesh import make_mesh
from mixjax.sharding.runner import load_sharded, resolve_expert_impl
from mixjax.sharding.strategies import STRATEGIES


def dense_reference(x, gates, wg, wu, wd):
    g = np.einsum("nd,edf->enf", x, wg)
    u = np.einsum("nd,edf->enf", x, wu)
    h = g / (1 + np.exp(-g)) * u
    return np.einsum("end,ne->nd", np.einsum("enf,efd->end", h, wd), gates)


def small_problem(seed, n=19, e=8, k=2, d=64, f=64):
    """x [n, d], routed gates [n, e] (k per row) and expert weights for one kernel-level check."""
    rng = np.random.RandomState(seed)
    x = rng.randn(n, d).astype(np.float32)
    gates = routed_gates(rng, n, e, k)
    wg, wu = (rng.randn(e, d, f).astype(np.float32) * 0.2 for _ in range(2))
    wd = rng.randn(e, f, d).astype(np.float32) * 0.2
    return x, gates, wg, wu, wd


def routed_gates(rng, n, e, k, skew=False):
    gates = np.zeros((n, e), np.float32)
    for i in range(n):
        ids = np.arange(k) if skew else rng.choice(e, k, replace=False)  # skew: every row on experts 0..k-1
        gates[i, ids] = rng.rand(k) + 0.1
    return gates


@pytest.mark.parametrize("n,e,k,bm,skew", [(1, 8, 2, 16, False), (37, 8, 3, 16, False), (37, 8, 3, 16, True),
                                           (20, 4, 4, 32, False)])
def test_grouped_equals_dense(n, e, k, bm, skew):
    rng = np.random.RandomState(n + e)
    d, f = 32, 32
    x = rng.randn(n, d).astype(np.float32)
    gates = routed_gates(rng, n, e, k, skew)
    gates[0] = 0  # a padding row (routed nowhere) contributes nothing
    wg, wu = (rng.randn(e, d, f).astype(np.float32) * 0.2 for _ in range(2))
    wd = rng.randn(e, f, d).astype(np.float32) * 0.2
    out = grouped_swiglu(jnp.asarray(x), jnp.asarray(gates), wg, wu, wd, k=k, blk=Blocks(bm, 16, 16, 16),
                         interpret=True)
    want = dense_reference(x, gates, wg, wu, wd)
    assert rel_err(np.asarray(out), want) < 1e-5
    assert np.all(np.asarray(out)[0] == 0)


def test_layout_reads_only_touched_experts():
    """Each expert owns ceil(count / bm) blocks, untouched experts own none, and every pair lands in a block of
    its own expert."""
    rng = np.random.RandomState(0)
    n, e, k, bm = 5, 16, 2, 16
    gates = routed_gates(rng, n, e, k)
    lay = group_layout(jnp.asarray(gates), k, bm)
    block_expert, dest, weight, src_row = (np.asarray(a) for a in (lay.block_expert, lay.dest, lay.weight,
                                                                   lay.src_row))
    counts = (gates != 0).sum(0)
    used = block_expert[block_expert >= 0]
    assert sorted(set(used.tolist())) == sorted(np.nonzero(counts)[0].tolist())
    for ex in range(e):
        assert (used == ex).sum() == -(-counts[ex] // bm)
    for row in range(n):
        for j in range(k):
            expert = block_expert[dest[row, j] // bm]
            assert gates[row, expert] == weight[row, j]
            assert src_row[dest[row, j]] == row


def test_pair_layout_gives_each_pair_its_block():
    """Few pairs (decode of one or two tokens): block p holds pair p's row first, then zero rows, and is tagged
    with that pair's expert; pairs with weight 0 get no expert (-1) and no destination."""
    rng = np.random.RandomState(5)
    n, e, k, bm = 2, 16, 3, 16
    gates = routed_gates(rng, n, e, k)
    gates[1, np.nonzero(gates[1])[0][0]] = 0  # row 1 has only two pairs
    lay = pair_layout(jnp.asarray(gates), k, bm)
    block_expert, dest, weight, src_row = (np.asarray(a) for a in (lay.block_expert, lay.dest, lay.weight,
                                                                   lay.src_row))
    assert block_expert.shape == (n * k,) and src_row.shape == (n * k * bm,)
    assert (block_expert == -1).sum() == 1
    for row in range(n):
        for j in range(k):
            p = row * k + j
            assert src_row[p * bm] == row and np.all(src_row[p * bm + 1:(p + 1) * bm] == n)
            if weight[row, j] == 0:
                assert block_expert[p] == -1 and dest[row, j] == n * k * bm
            else:
                assert dest[row, j] == p * bm and gates[row, block_expert[p]] == weight[row, j]


@pytest.mark.parametrize("n,k,kind", [(1, 8, "pair"), (2, 8, "pair"), (3, 8, "expert"), (17, 2, "sorted")])
def test_router_pairs_equal_gate_matrix(n, k, kind):
    """Passing the router's (ids, weights) (which skips a top-k) gives the gate matrix's result, with each of the
    three layouts; each equals the dense reference."""
    rng = np.random.RandomState(n)
    e, d, f = 32, 32, 32
    x = rng.randn(n, d).astype(np.float32)
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(n)]).astype(np.int32)
    w = (rng.rand(n, k) + 0.1).astype(np.float32)
    gates = np.zeros((n, e), np.float32)
    np.put_along_axis(gates, ids, w, axis=1)
    wg, wu = (rng.randn(e, d, f).astype(np.float32) * 0.2 for _ in range(2))
    wd = rng.randn(e, f, d).astype(np.float32) * 0.2
    run = lambda routed: np.asarray(grouped_swiglu(jnp.asarray(x), jnp.asarray(gates), wg, wu, wd, k=k,
                                                   blk=Blocks(16, 16, 16, 16), interpret=True, routed=routed))
    via_router, via_gates = run((jnp.asarray(ids), jnp.asarray(w))), run(None)
    want = dense_reference(x, gates, wg, wu, wd)
    assert layout_kind(n, k, 16) == kind
    assert rel_err(via_router, want) < 1e-5 and rel_err(via_gates, want) < 1e-5


def test_expert_layout_gives_each_touched_expert_one_block_of_all_rows():
    """3-16 rows: block e is expert e's if some row picked it (else -1), and pair (r, j) reads row r of its expert's
    block; a pair of weight 0 has no destination. Through the kernels it equals the sorted layout bit for bit (each
    output row depends on its own input row only) and the dense reference."""
    rng = np.random.RandomState(9)
    n, e, k, bm, d = 5, 16, 4, 16, 32
    gates = routed_gates(rng, n, e, k)
    gates[2, np.nonzero(gates[2])[0][0]] = 0  # row 2 has three pairs
    lay = expert_layout(jnp.asarray(gates), k, bm)
    block_expert, dest, weight = (np.asarray(a) for a in (lay.block_expert, lay.dest, lay.weight))
    touched = (gates != 0).any(0)
    assert np.array_equal(block_expert, np.where(touched, np.arange(e), -1))
    for row in range(n):
        for j in range(k):
            if weight[row, j] == 0:
                assert dest[row, j] == e * bm
            else:
                assert dest[row, j] % bm == row and gates[row, dest[row, j] // bm] == weight[row, j]
    assert (weight == 0).sum() == 1
    x = rng.randn(n, d).astype(np.float32)
    wg, wu = (rng.randn(e, d, d).astype(np.float32) * 0.2 for _ in range(2))
    wd = rng.randn(e, d, d).astype(np.float32) * 0.2

    def run(expert):
        old, grouped_experts.EXPERT_LAYOUT = grouped_experts.EXPERT_LAYOUT, expert
        try:  # a fresh trace: the switch is read when the layer is traced
            return np.asarray(jax.jit(lambda *a: grouped_swiglu.__wrapped__(
                *a, k=k, blk=Blocks(bm, 16, 16, 16), interpret=True))(jnp.asarray(x), jnp.asarray(gates), wg, wu, wd))
        finally:
            grouped_experts.EXPERT_LAYOUT = old
    by_expert, by_sort = run(True), run(False)
    assert np.array_equal(by_expert, by_sort)
    assert rel_err(by_expert, dense_reference(x, gates, wg, wu, wd)) < 1e-5


def test_tile_choice_follows_rows_per_expert():
    decode, prefill = choose_blocks(8, 128, 2048, 768), choose_blocks(65536, 128, 2048, 768)
    assert (decode.bm, decode.group) == (16, 0) and (prefill.bm, prefill.group) == (128, 1)  # prefill: group order
    batch32 = choose_blocks(32 * 8, 128, 2048, 768, rows=32)  # decode of 32 rows: one 32-row block per expert
    assert (batch32.bm, batch32.group) == (32, 0) and layout_kind(32, 8, batch32.bm) == "expert"
    assert layout_kind(33, 8, choose_blocks(33 * 8, 128, 2048, 768, rows=33).bm) == "sorted"
    assert choose_blocks(8, 8, 32, 4) is None  # F slice of 4 cannot make a tensor-core tile: dense path
    # every tile divides the shape it tiles, for each regime (decode, 512 / 2048 / 8192-token prefill)
    for pairs in (8, 256, 4096, 16384, 65536):
        blk = choose_blocks(pairs, 128, 2048, 768)
        down = blk.down
        assert 2048 % blk.bk == 0 and 768 % blk.bf == 0 and 768 % down.bf == 0 and 2048 % down.bd == 0


def test_down_kernel_with_its_own_tiles_equals_dense():
    """Kernel B (down projection) with a contraction tile, warps and stages other than kernel A's."""
    x, gates, wg, wu, wd = small_problem(3)
    blk = Blocks(16, 32, 16, 32, warps=4, stages=3, b_bk=64, b_warps=8, b_stages=2)
    assert (blk.down.bf, blk.down.bd, blk.down.warps, blk.down.stages) == (64, 32, 8, 2)
    out = grouped_swiglu(jnp.asarray(x), jnp.asarray(gates), wg, wu, wd, k=2, blk=blk, interpret=True)
    assert rel_err(np.asarray(out), dense_reference(x, gates, wg, wu, wd)) < 1e-5


def test_one_row_matmul_on_gpu_path_equals_einsum(monkeypatch):
    """On GPU a one-row product is computed on two rows (XLA would rewrite a vector-matrix product as multiply +
    reduce); forced here on CPU, it gives the one-row result."""
    from mixjax.models import layers

    rng = np.random.RandomState(4)
    w = jnp.asarray(rng.randn(48, 40).astype(np.float32))
    for shape in [(1, 1, 48), (1, 48), (3, 1, 48)]:
        x = jnp.asarray(rng.randn(*shape).astype(np.float32))
        want = np.einsum("...i,io->...o", np.asarray(x), np.asarray(w))
        monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
        got = layers.matmul(x, w)
        monkeypatch.undo()
        assert got.shape == want.shape and rel_err(np.asarray(got), want) < 1e-5


def test_unknown_expert_impl_is_rejected():
    with pytest.raises(ValueError, match="unknown expert implementation 'fast'"):
        resolve_expert_impl("fast", make_mesh("1x1"))


@pytest.mark.parametrize("mesh,strategy,copies,kind", [("1x1", "tp", 1, "expert"), ("1x1", "tp", 3, "sorted"),
                                                         ("2x4", "ep", 1, None)])
def test_sharded_model_with_grouped_experts_matches_reference(mesh, strategy, copies, kind):
    """The prompts (2 x 7 tokens: 14 rows, the expert layout; three copies of them: 42 rows, the sorted layout)
    through the grouped kernels give the reference's logits."""
    path = next(p for p in fixture_dirs() if p.name == "qwen3_moe_shard")
    ref = reference("qwen3_moe_shard")
    model = load_sharded(path, make_mesh(mesh), STRATEGIES[strategy], progress=False,
                         expert_impl="grouped-interpret")
    tokens = np.tile(ref["input_ids"].astype(np.int32), (copies, 1))
    b, t = tokens.shape
    cfg = model.cfg
    if kind:
        blk = choose_blocks(b * t * cfg.num_experts_per_tok, cfg.num_experts, cfg.hidden_size,
                            cfg.moe_intermediate_size, rows=b * t)
        assert layout_kind(b * t, cfg.num_experts_per_tok, blk.bm) == kind
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    logits, _ = model.forward(jnp.asarray(tokens), jnp.asarray(pos), model.init_cache(b, t))
    want = np.tile(ref["logits"], (copies, 1, 1))
    assert rel_err(np.asarray(logits)[..., : model.vocab_size], want) < 1e-4


@pytest.mark.parametrize("b,t,h,kv,d,s,start", [(2, 20, 4, 2, 16, 64, 0), (1, 16, 8, 2, 32, 48, 17)])
def test_flash_attention_equals_attend(b, t, h, kv, d, s, start):
    """Prefill attention kernel: GQA, a prompt that is not a whole number of tiles, a chunk starting mid-cache."""
    from mixjax.kernels.flash_attention import flash_attention, tiles_for
    from mixjax.models.layers import attend, causal_mask

    rng = np.random.RandomState(t)
    q = jnp.asarray(rng.randn(b, t, h, d), jnp.float32)
    k, v = (jnp.asarray(rng.randn(b, kv, s, d), jnp.float32) for _ in range(2))
    pos = jnp.asarray(np.broadcast_to(np.arange(start, start + t, dtype=np.int32), (b, t)))
    want = attend(q, k, v, causal_mask(pos, s), d ** -0.5, heads_major=True)
    got = flash_attention(q, k, v, pos, scale=d ** -0.5, tiles=tiles_for(t, s, d), interpret=True)
    assert rel_err(got, want) < 1e-5


def test_prefill_with_flash_attention_matches_reference():
    """qwen3_moe_a (head_dim 16) through the Pallas path: a 16-slot cache makes the prompt take flash attention."""
    model, ref, tokens, pos = interpreted_model("qwen3_moe_a")
    logits, _ = model.forward(jnp.asarray(tokens), jnp.asarray(pos), model.init_cache(tokens.shape[0], 16))
    assert rel_err(np.asarray(logits)[..., : model.vocab_size], ref["logits"]) < 1e-4


@pytest.mark.parametrize("fixture,mesh,strategy,rows", [("qwen3_moe_a", "1x1", "tp", 2), ("qwen3_moe_a", "2x4", "hybrid", 2),
                                                         ("qwen3_moe_a", "1x1", "tp", 1)])
def test_decode_with_pallas_attention_matches_reference(fixture, mesh, strategy, rows):
    """One token at a time through the Pallas path (decode attention kernel with the q/k norms and RoPE, the
    router kernel, pair-layout experts), after a prefill of the first half: every step's logits equal the
    reference's at that position."""
    model, ref, tokens, pos = interpreted_model(fixture, mesh, strategy)
    tokens, pos = tokens[:rows], pos[:rows]
    b, t = tokens.shape
    half = t // 2
    _, cache = model.forward(jnp.asarray(tokens[:, :half]), jnp.asarray(pos[:, :half]), model.init_cache(b, 32))
    for i in range(half, t):
        logits, cache = model.forward(jnp.asarray(tokens[:, i:i + 1]), jnp.asarray(pos[:, i:i + 1]), cache)
        assert rel_err(np.asarray(logits)[:, 0, : model.vocab_size], ref["logits"][:rows, i]) < 1e-4, i


def test_grouped_launch_orders_equal_dense():
    """Launching all output tiles of G row blocks together (Blocks.group) visits every (block, tile) once. Every row
    on all 4 experts: 19 rows each, two 16-row blocks per expert, blocks 0-7 used of the static 9. G = 5: the last
    group (blocks 5-8) is short and holds used blocks; G = 1 and 3 as well."""
    x, gates, wg, wu, wd = small_problem(5, e=4, k=4)
    want = dense_reference(x, gates, wg, wu, wd)
    lay = group_layout(jnp.asarray(gates), 4, 16)
    assert lay.block_expert.shape[0] == 9 and (np.asarray(lay.block_expert) >= 0).sum() == 8
    for group in (1, 3, 5):
        blk = Blocks(16, 32, 16, 16, group=group)
        out = grouped_swiglu(jnp.asarray(x), jnp.asarray(gates), wg, wu, wd, k=4, blk=blk, interpret=True)
        assert rel_err(np.asarray(out), want) < 1e-5, group


@pytest.mark.parametrize("impl", ["dense", "grouped-interpret"])
def test_no_token_rows_reach_no_expert(impl):
    """Rows that carry no token (NO_TOKEN: a prompt's padding, an idle decode row) get routing weight zero: the MoE
    block gives them exactly zero, which on the grouped path means no expert pair is computed for them, and the
    live rows' output is what it is without the mask."""
    from jax.sharding import PartitionSpec as P
    from flax import nnx

    path = next(p for p in fixture_dirs() if p.name == "qwen3_moe_a")
    model = load_sharded(path, make_mesh("1x1"), STRATEGIES["tp"], progress=False, expert_impl=impl)
    moe = nnx.merge(model.graphdef, model.state).layers[0].ffn
    run = jax.jit(jax.shard_map(lambda x, live: moe(x, model.par, live), mesh=model.mesh, in_specs=(P(), P()),
                                out_specs=P(), check_vma=False))
    x = jnp.asarray(np.random.RandomState(0).randn(2, 5, moe.experts.gate.shape[1]), jnp.float32)
    live = np.ones((2, 5), bool)
    live[0, 3:] = live[1, :] = False
    every = np.asarray(run(x, jnp.ones((2, 5), bool)))
    masked = np.asarray(run(x, jnp.asarray(live)))
    assert np.all(masked[~live] == 0)
    assert rel_err(masked[live], every[live]) < 1e-6


@pytest.mark.parametrize("mesh,strategy", [("2x4", "hybrid_fused"), ("2x4", "ep")])
def test_padding_of_no_token_leaves_live_logits_unchanged(mesh, strategy):
    """A batch padded with NO_TOKEN (a longer bucket, an idle row) gives the live positions the reference's logits,
    through expert parallelism (padding rows are sent nowhere) and the fused pipeline (its own row padding too)."""
    from mixjax.models.base import NO_TOKEN

    path = next(p for p in fixture_dirs() if p.name == "qwen3_moe_shard")
    ref = reference("qwen3_moe_shard")
    model = load_sharded(path, make_mesh(mesh), STRATEGIES[strategy], progress=False)
    b, t = ref["input_ids"].shape
    tokens = np.full((b + 2, t + 3), NO_TOKEN, np.int32)  # two rows: the data-parallel degree divides b + 2
    tokens[:b, :t] = ref["input_ids"]
    pos = np.broadcast_to(np.arange(t + 3, dtype=np.int32), tokens.shape)
    logits, _ = model.forward(jnp.asarray(tokens), jnp.asarray(pos), model.init_cache(b + 2, t + 3))
    assert rel_err(np.asarray(logits)[:b, :t, : model.vocab_size], ref["logits"]) < 1e-4


def with_and_without_one_token(monkeypatch, run):
    """run() with the one-token MoE path (asserting that every MoE layer took it) and again without it, the forward
    traced again (jax.clear_caches: else the second call reuses the first's compiled program and the comparison
    cannot fail). Returns (with, without)."""
    from mixjax.models import base

    used = []
    one_token = base.MoE.one_token

    def spy(self, *args, **kw):
        out = one_token(self, *args, **kw)
        used.append(out is not None)
        return out

    monkeypatch.setattr(base.MoE, "one_token", spy)
    fused = run()
    assert used and all(used)
    monkeypatch.setattr(base.MoE, "one_token", lambda *args, **kw: None)
    jax.clear_caches()
    return fused, run()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_token_moe_equals_the_unfused_layer(monkeypatch, dtype):
    """A batch-1 decode step's MoE half in five kernels (MoE.one_token: the router's product computes the residual
    sum and its norm and writes the normed row, kernels A and B read it and the router's outputs in place) gives the
    logits of the layer's unfused path, for a token and for a row without one (NO_TOKEN: no expert computes it): to
    float32 rounding in float32 (2e-7 of the largest logit), to bf16 rounding in bf16 (XLA may keep excess
    precision where a kernel rounds to bf16, so the two paths' roundings can fall differently)."""
    from mixjax.models import base

    path = next(p for p in fixture_dirs() if p.name == "qwen3_moe_shard")
    model = load_sharded(path, make_mesh("1x1"), STRATEGIES["tp"], dtype=dtype, progress=False,
                         expert_impl="grouped-interpret")
    prompt = jnp.asarray(reference("qwen3_moe_shard")["input_ids"][:1, :6].astype(np.int32))
    _, cache = model.forward(prompt, jnp.arange(6, dtype=jnp.int32)[None], model.init_cache(1, 8))
    steps = [(jnp.asarray([[int(prompt[0, 2])]], jnp.int32), jnp.asarray([[6]], jnp.int32)),
             (jnp.asarray([[base.NO_TOKEN]], jnp.int32), jnp.asarray([[7]], jnp.int32))]
    run = lambda tok, pos: np.asarray(model.forward(tok, pos, jax.tree.map(jnp.copy, cache))[0], np.float32)
    fused, unfused = with_and_without_one_token(monkeypatch, lambda: [run(tok, pos) for tok, pos in steps])
    for a, b in zip(fused, unfused):  # bf16: within two units in the last place of the largest logit
        assert rel_err(a, b) < (1e-6 if dtype == jnp.float32 else 1.6e-2)


def test_one_token_moe_under_tensor_parallelism_equals_the_unfused_layer(monkeypatch):
    """The one-token path with the experts' FFN width split over a TP group of 2 (each device's kernels A and B on
    its half, summed by the psum after them, as moe_unfused does) and the attention's heads split likewise: the
    decode logits equal the unfused layer's to float32 rounding. A random model: no fixture's FFN slice tiles at
    TP 2."""
    from flax import nnx
    from mixjax.models.qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from mixjax.sharding.runner import ShardedModel

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                         num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=(),
                         rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling=None, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = ShardedModel(cfg, make_mesh("1x2"), STRATEGIES["tp"], dtype=jnp.float32, expert_impl="grouped-interpret")
    model.set_state(nnx.state(Qwen3MoeForCausalLM(cfg, tp=2, dtype=jnp.float32, rngs=nnx.Rngs(0))))
    _, cache = model.forward(jnp.asarray([[3, 17, 42, 5]], jnp.int32), jnp.arange(4, dtype=jnp.int32)[None],
                             model.init_cache(1, 16))
    tok, pos = jnp.asarray([[9]], jnp.int32), jnp.asarray([[4]], jnp.int32)
    fused, unfused = with_and_without_one_token(
        monkeypatch, lambda: np.asarray(model.forward(tok, pos, jax.tree.map(jnp.copy, cache))[0]))
    assert rel_err(fused, unfused) < 1e-6
