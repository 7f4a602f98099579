"""Analytic per-step cost model: roofline compute + alpha-beta collectives + memory fit.

Two modes (`impl`):
- "ideal": the algorithms as the paper describes them (touched experts only, exact-size all-to-all messages,
  logits for the last position only); used for the paper-setting tables.
- "mixjax": what this implementation's compiled step does: padded dispatch buffers as `dispatch_bytes` /
  `fused_bytes` count them, float32 gate buffers, and the expert implementation ShardedModel runs on the target
  platform (`expert_impl`, as mixjax.sharding.runner.resolve_expert_impl picks it: "grouped" on GPU, "dense"
  elsewhere). Dense: every local expert on every received row, attention over the whole cache (XLA). Grouped:
  only the touched (row, expert) pairs, in row blocks of one expert each (mixjax.kernels.grouped_experts), and
  flash attention for prompts (mixjax.kernels.flash_attention). Used by `auto_plan` and by validation against
  measured steps.

Hardware numbers come from a ClusterSpec: nameplate presets, or a calibration profile of the current devices
(mixjax.planner.calibrate), whose per-link, per-collective alpha/beta fits replace the link defaults.
All times are seconds for one step of the whole mesh; see docs/PLANNER.md for the equations.
"""

from __future__ import annotations

import dataclasses
import math

from mixjax.planner.presets import GiB, ClusterSpec
from mixjax.sharding.strategies import GPU, NODE, Strategy

MEM_USABLE = 0.90  # fraction of HBM the planner lets a plan use (runtime, fragmentation, workspace)


# ---------------------------------------------------------------- collectives (alpha-beta)
def all_reduce(S: float, p: int, alpha: float, beta: float) -> float:
    """Ring all-reduce of S bytes per rank on p ranks."""
    return 0.0 if p <= 1 else 2 * (p - 1) * alpha + 2 * (p - 1) / p * S / beta


def reduce_scatter(S: float, p: int, alpha: float, beta: float) -> float:
    """Ring reduce-scatter (or all-gather): S = full buffer bytes (input of RS, output of AG)."""
    return 0.0 if p <= 1 else (p - 1) * alpha + (p - 1) / p * S / beta


all_gather = reduce_scatter


def all_to_all(S: float, p: int, alpha: float, beta: float) -> float:
    """All-to-all: S = bytes each rank sends in total (its own share included)."""
    return 0.0 if p <= 1 else (p - 1) * alpha + (p - 1) / p * S / beta


def coefficients(kind: str, p: int) -> tuple[float, float]:
    """(A, B) with t = A alpha + B S / bw for collective `kind` on p ranks (S as in the functions above)."""
    if p <= 1:
        return 0.0, 0.0
    if kind == "all_reduce":
        return 2.0 * (p - 1), 2.0 * (p - 1) / p
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return float(p - 1), (p - 1) / p
    raise ValueError(f"unknown collective {kind!r}")


def _on_link(cl: ClusterSpec, link_name: str, kind: str, S: float, p: int) -> float:
    alpha, bw = cl.coll_params(link_name, kind)
    A, B = coefficients(kind, p)
    return A * alpha + B * S / bw


def coll_time(cl: ClusterSpec, kind: str, S: float, axes: tuple[str, ...], sizes: dict[str, int],
              hierarchical: bool = True) -> float:
    """Time of one collective of S bytes (conventions above) over mesh `axes`.

    One axis: that link's (alpha, bw) for this collective (calibrated fit, else the link numbers).
    Both axes (n nodes x g GPUs): the calibrated "world" fit when the profile was measured on this very mesh;
    else, with hierarchical=True, the two-level algorithm NCCL-style libraries use on rail-aligned clusters:
      all-reduce      RS_gpu(S) + AR_node(S/g) + AG_gpu(S)   (each NIC carries 1/g of the data)
      all-gather      AG_node(S/g) + AG_gpu(S)
      reduce-scatter  RS_gpu(S) + RS_node(S/g)
      all-to-all      max(intra part, inter part): (g-1) alpha_i + (g-1)/N S/bw_i  vs  (N-g) alpha_x + (N-g)/N S/bw_x
    and with hierarchical=False a flat ring over N ranks at the network's numbers (the first version's model)."""
    live = tuple(a for a in axes if sizes[a] > 1)
    if not live or S <= 0:
        return 0.0
    n, g = sizes[NODE], sizes[GPU]
    if live == (GPU,):
        return _on_link(cl, "intra", kind, S, g)
    if live == (NODE,):
        return _on_link(cl, "inter", kind, S, n)
    N = n * g
    if cl.coll_params("world", kind) is not None and cl.calib_mesh == (n, g):
        return _on_link(cl, "world", kind, S, N)
    if not hierarchical:
        return _on_link(cl, "inter", kind, S, N)
    if kind == "all_reduce":
        return (_on_link(cl, "intra", "reduce_scatter", S, g) + _on_link(cl, "inter", "all_reduce", S / g, n)
                + _on_link(cl, "intra", "all_gather", S, g))
    if kind == "all_gather":
        return _on_link(cl, "inter", "all_gather", S / g, n) + _on_link(cl, "intra", "all_gather", S, g)
    if kind == "reduce_scatter":
        return _on_link(cl, "intra", "reduce_scatter", S, g) + _on_link(cl, "inter", "reduce_scatter", S / g, n)
    if kind == "all_to_all":
        ai, bi = cl.coll_params("intra", "all_to_all")
        ax, bx = cl.coll_params("inter", "all_to_all")
        return max((g - 1) * ai + (g - 1) / N * S / bi, (N - g) * ax + (N - g) / N * S / bx)
    raise ValueError(f"unknown collective {kind!r}")


def link(axes: tuple[str, ...], cl: ClusterSpec, sizes: dict[str, int]) -> tuple[float, float]:
    """(alpha, beta) of the slowest link an axis group crosses: any group spanning >1 node uses the network."""
    if NODE in axes and sizes[NODE] > 1:
        return cl.inter_alpha, cl.inter_bw
    return cl.intra_alpha, cl.intra_bw


def fused_pipeline(intra: list[float], inter: list[float], chunks: int) -> float:
    """Chunked pipeline over two links: max(sum intra, sum inter) + one chunk of the other link (fill/drain).
    `intra`/`inter` are the per-chunk times of each collective."""
    si, sx = sum(intra) * chunks, sum(inter) * chunks
    return max(si, sx) + min(si, sx) / chunks


# ---------------------------------------------------------------- routing statistics
def touched_experts(E: int, k: int, tokens: float) -> float:
    """Expected distinct experts hit by `tokens` tokens with top-k of E under uniform routing."""
    return E * (1 - (1 - k / E) ** tokens) if tokens > 0 else 0.0


def distinct_ranks(E: int, k: int, ranks: int) -> float:
    """Expected number of distinct EP ranks (E/ranks experts each) one token's top-k experts live on."""
    if ranks <= 1:
        return 1.0
    per = E // ranks
    # P(no expert on a given rank) = C(E-per, k) / C(E, k)
    p_none = math.comb(E - per, k) / math.comb(E, k) if E - per >= k else 0.0
    return ranks * (1 - p_none)


def imbalance(assignments: float, ranks: int) -> float:
    """E[max load] / mean load over `ranks` EP ranks for `assignments` uniform token-expert assignments
    (normal approximation of the multinomial maximum: mean + sigma * sqrt(2 ln ranks))."""
    if ranks <= 1 or assignments <= 0:
        return 1.0
    mean = assignments / ranks
    sigma = math.sqrt(assignments * (1 / ranks) * (1 - 1 / ranks))
    return (mean + sigma * math.sqrt(2 * math.log(ranks))) / mean


# ---------------------------------------------------------------- model shapes
def _sizes(cfg) -> dict[str, float]:
    d = cfg.hidden_size
    if hasattr(cfg, "kv_lora_rank"):  # MLA
        h, qk = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        q = d * h * qk if cfg.q_lora_rank is None else d * cfg.q_lora_rank + cfg.q_lora_rank * h * qk
        attn = (q + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
                + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim) + h * cfg.v_head_dim * d)
        score_dim = qk + cfg.v_head_dim  # per head per (query, key) pair: QK^T + PV
    else:
        h, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        score_dim = 2 * hd
    return {
        "d": d, "attn": attn, "score_dim": score_dim, "heads": cfg.num_attention_heads,
        "dense_mlp": 3 * d * cfg.intermediate_size,
        "expert": 3 * d * cfg.moe_intermediate_size,
        "shared": 3 * d * cfg.moe_intermediate_size * (cfg.num_shared_experts or 0),
        "router": d * cfg.num_experts,
        "embed": cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2),
        "lm_head": cfg.vocab_size * d,
    }


def kv_bytes_per_token_layer_device(cfg, tp: int, b: float) -> float:
    """KV cache bytes per token per layer held by one device of an attention TP group of size tp."""
    if hasattr(cfg, "kv_lora_rank"):  # MLA latent is replicated across the TP group
        return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * b
    kv_local = max(1.0, cfg.num_key_value_heads / tp)  # KV heads are replicated when tp > kv heads
    return 2 * kv_local * cfg.head_dim * b


# ---------------------------------------------------------------- workload / plan
@dataclasses.dataclass(frozen=True)
class Workload:
    batch: int = 64
    prompt: int = 1024
    output: int = 256
    name: str = "custom"


WORKLOADS = {
    "prefill": Workload(batch=16, prompt=4096, output=64, name="prefill"),
    "decode": Workload(batch=64, prompt=1024, output=256, name="decode"),
}


@dataclasses.dataclass
class Plan:
    strategy: str
    nodes: int
    gpus: int
    feasible: bool
    reason: str  # why infeasible, "" when feasible
    ttft: float = math.inf
    itl: float = math.inf
    throughput: float = 0.0  # output tokens / s of the whole mesh
    mem_per_device: float = 0.0  # bytes
    breakdown: dict = dataclasses.field(default_factory=dict)

    @property
    def mesh(self) -> str:
        return f"{self.nodes}x{self.gpus}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mesh"] = self.mesh
        for k in ("ttft", "itl"):
            if not math.isfinite(d[k]):
                d[k] = None
        return d


class _FakeMesh:
    def __init__(self, nodes, gpus):
        self.shape = {NODE: nodes, GPU: gpus}


def layout_problem(cfg, nodes: int, gpus: int, strategy: Strategy) -> str:
    """Mesh-free check_layout: '' when the strategy can lay the model out on nodes x gpus, else the reason."""
    from mixjax.sharding.mesh import LayoutError, check_layout  # noqa: PLC0415

    try:
        check_layout(cfg, _FakeMesh(nodes, gpus), strategy)
    except LayoutError as e:
        return str(e)
    return ""


def step_cost(cfg, cl: ClusterSpec, strategy: Strategy, nodes: int, gpus: int, tokens: int, seqs: int,
              ctx: float, phase: str, wbytes: float, abytes: float = 2, chunks: int = 0,
              expert_bytes_touched: bool = True, hierarchical: bool = True, overlap: float = 0.0) -> dict:
    """Ideal-mode time of one forward step of all layers. `tokens` total tokens in the step, `seqs` sequences,
    `ctx` mean context length attended to (decode: cache length; prefill: prompt length, causal).
    hierarchical: two-level collectives over node x gpu (else a flat ring at network speed);
    overlap: fraction of min(compute, communication) hidden per MoE layer (0: none, as XLA runs a single batch;
    a sensitivity knob for two-batch-overlap style engines, applied to every strategy alike)."""
    sizes = {NODE: nodes, GPU: gpus}
    N = nodes * gpus

    def sz(axes):
        return math.prod(sizes[a] for a in axes) if axes else 1

    def ct(kind, S, axes):
        return coll_time(cl, kind, S, axes, sizes, hierarchical)

    a, dp, t, e = sz(strategy.attn_tp), sz(strategy.attn_dp), sz(strategy.moe_tp), sz(strategy.moe_ep)
    s = _sizes(cfg)
    d, E, k = s["d"], cfg.num_experts, cfg.num_experts_per_tok
    L = cfg.num_hidden_layers
    n_moe = sum(1 for i in range(L) if cfg.is_moe_layer(i))
    n_dense = L - n_moe
    T_attn = tokens / dp  # tokens processed by one attention group
    seqs_attn = seqs / dp
    flops, hbm = cl.peak_flops, cl.hbm_bw

    def roof(fl, by):
        return max(fl / flops, by / hbm)

    # attention (+ router, norms) per layer per device
    kv_tok = kv_bytes_per_token_layer_device(cfg, a, abytes)
    attn_fl = 2 * s["attn"] / a * T_attn
    if phase == "prefill":
        per_seq_q = tokens / max(seqs, 1)
        attn_fl += 2 * (s["heads"] / a) * s["score_dim"] * per_seq_q * ctx / 2 * seqs_attn  # causal half
        attn_by = s["attn"] / a * wbytes + T_attn * kv_tok
    else:
        attn_fl += 2 * (s["heads"] / a) * s["score_dim"] * ctx * T_attn
        attn_by = s["attn"] / a * wbytes + seqs_attn * ctx * kv_tok
    t_attn = roof(attn_fl, attn_by)

    # dense MLP layers (TP over the attention group)
    t_dense = roof(2 * s["dense_mlp"] / a * T_attn, s["dense_mlp"] / a * wbytes)

    # MoE layer: shared experts (TP over attention group) + routed experts
    t_shared = roof(2 * s["shared"] / a * T_attn, s["shared"] / a * wbytes) if s["shared"] else 0.0
    assign = tokens * k  # token-expert assignments in the whole MoE group (t * e = N devices)
    imb = imbalance(assign, e)
    rank_assign = assign / e * imb
    touched_local = touched_experts(E, k, tokens) / e
    exp_fl = 2 * s["expert"] / t * rank_assign
    exp_by = (touched_local if expert_bytes_touched else E / e) * s["expert"] / t * wbytes
    t_experts = roof(exp_fl, exp_by)
    t_experts_balanced = roof(exp_fl / imb, exp_by)
    t_router = roof(2 * s["router"] * T_attn, s["router"] * wbytes)

    # collectives per layer
    tok = d * abytes
    ar_attn = ct("all_reduce", T_attn * tok, strategy.attn_tp)  # row-parallel output projection / dense MLP
    dst_rank = distinct_ranks(E, k, e)
    moe_comm = {}
    inter_bytes = intra_bytes = 0.0  # bytes one GPU sends per MoE layer over each link (for reporting)
    g_, n_ = gpus, nodes
    if strategy.name == "tp":
        moe_comm["all_reduce"] = ct("all_reduce", tokens * tok, strategy.moe_tp)
        S = tokens * tok
        if nodes == 1:
            intra_bytes = 2 * 2 * (N - 1) / N * S  # attention + MoE all-reduce
        elif hierarchical:
            intra_bytes = 2 * 2 * (g_ - 1) / g_ * S
            inter_bytes = 2 * 2 * (n_ - 1) / n_ * S / g_
        else:
            inter_bytes = 2 * 2 * (N - 1) / N * S
    elif strategy.name in ("ep", "dp_ep"):
        per_rank = tokens / N
        S = per_rank * dst_rank * tok
        moe_comm["a2a_dispatch"] = ct("all_to_all", S, strategy.moe_ep)
        moe_comm["a2a_combine"] = ct("all_to_all", S, strategy.moe_ep)
        if a > 1:  # re-replicate the attention group's tokens
            moe_comm["all_gather_gpu"] = ct("all_gather", T_attn * tok, (GPU,))
        if nodes > 1:
            inter_bytes = 2 * (N - g_) / N * S
            intra_bytes = 2 * (g_ - 1) / N * S
        else:
            intra_bytes = 2 * (N - 1) / N * S
        intra_bytes += 2 * (a - 1) / a * T_attn * tok if a > 1 else 0
    elif strategy.name in ("hybrid", "hybrid_fused"):
        # attention group = one node (a = gpus), expert group over nodes (e = nodes)
        if not strategy.fused:
            S = T_attn * dst_rank * tok  # every GPU of the node sends all the node's tokens
            moe_comm["a2a_dispatch"] = ct("all_to_all", S, (NODE,))
            moe_comm["a2a_combine"] = ct("all_to_all", S, (NODE,))
            moe_comm["all_reduce_gpu"] = ct("all_reduce", T_attn * tok, (GPU,))
            inter_bytes = 2 * (nodes - 1) / nodes * S
            intra_bytes = 2 * 2 * (gpus - 1) / gpus * T_attn * tok
        else:
            S = T_attn / gpus * dst_rank * tok  # each GPU sends its 1/g slice
            G = T_attn * dst_rank * tok  # dispatched rows gathered inside the node
            best = None
            # chunks=0: let the model pick the chunk count (1, 2, 4 or 8) with the lowest predicted time
            for c in ([chunks] if chunks else [1, 2, 4, 8]):
                intra = [ct("reduce_scatter", T_attn * tok / c, (GPU,)), ct("all_gather", G / c, (GPU,)),
                         ct("reduce_scatter", G / c, (GPU,)), ct("all_gather", T_attn * tok / c, (GPU,))]
                inter = [ct("all_to_all", S / c, (NODE,))] * 2
                tc = fused_pipeline(intra, inter, c)
                if best is None or tc < best[0]:
                    best = (tc, c, sum(intra) * c, sum(inter) * c)
            moe_comm["fused_rs_a2a_ag"] = best[0]
            moe_comm["(chunks)"] = best[1]
            moe_comm["(intra_sum)"] = best[2]
            moe_comm["(inter_sum)"] = best[3]
            inter_bytes = 2 * (nodes - 1) / nodes * S
            intra_bytes = (gpus - 1) / gpus * (2 * T_attn * tok + 2 * G)
    else:
        raise ValueError(f"no cost model for strategy {strategy.name!r}")
    # with the fused path the attention all-reduce is replaced by its reduce-scatter (already counted)
    moe_attn_comm = 0.0 if strategy.fused else ar_attn
    t_moe_comm = sum(v for kk, v in moe_comm.items() if not kk.startswith("("))

    moe_compute = t_attn + t_router + t_shared + t_experts
    moe_comm_all = moe_attn_comm + t_moe_comm
    moe_layer = moe_compute + moe_comm_all - overlap * min(moe_compute, moe_comm_all)
    dense_layer = t_attn + t_dense + 2 * ar_attn
    lm_tokens = seqs_attn  # logits for the last position of each sequence
    t_head = roof(2 * s["lm_head"] / a * lm_tokens, s["lm_head"] / a * wbytes)
    total = n_moe * moe_layer + n_dense * dense_layer + t_head
    return {
        "total": total,
        "per_moe_layer": moe_layer,
        "attention": t_attn, "experts": t_experts, "experts_if_balanced": t_experts_balanced,
        "shared_experts": t_shared, "router": t_router, "attn_allreduce": moe_attn_comm,
        "moe_comm": t_moe_comm, "moe_comm_parts": moe_comm, "dense_layer": dense_layer if n_dense else 0.0,
        "lm_head": t_head, "ep_imbalance": imb, "touched_experts_per_rank": touched_local,
        "inter_bytes_per_gpu_per_layer": inter_bytes, "intra_bytes_per_gpu_per_layer": intra_bytes,
        "degrees": {"attn_tp": a, "attn_dp": dp, "moe_tp": t, "moe_ep": e},
    }


# ---------------------------------------------------------------- mixjax mode: what the compiled step does
def _mm_rate(cl: ClusterSpec, width: float) -> float:
    """FLOP/s of a matmul whose narrowest dimension is `width`: peak * w / (w + w_half) (calibrated w_half)."""
    h = cl.mm_half_width
    return cl.peak_flops if h <= 0 else cl.peak_flops * width / (width + h)



EXPERT_IMPLS = ("dense", "grouped", "grouped-interpret")


def resolve_expert_impl(expert_impl: str | None, cl: ClusterSpec) -> str:
    """The expert implementation mixjax runs on `cl`: None / "auto" -> what ShardedModel's "auto" picks on the
    cluster's platform (mixjax.sharding.runner.resolve_expert_impl): "grouped" on GPU, "dense" elsewhere."""
    if expert_impl in (None, "auto"):
        return "grouped" if cl.platform == "gpu" else "dense"
    if expert_impl not in EXPERT_IMPLS:
        raise ValueError(f"unknown expert implementation {expert_impl!r}; choose one of {EXPERT_IMPLS} or 'auto'")
    return expert_impl


def expected_blocks(tokens: float, p: float, bm: int) -> float:
    """E[ceil(c / bm)] for c ~ Binomial(tokens, p): the row blocks of `bm` rows one expert owns in the grouped
    layout when each of `tokens` tokens picks it with probability p (uniform routing: p = k / E)."""
    n = int(round(tokens))
    if n <= 0 or p <= 0:
        return 0.0
    if p >= 1:
        return float(-(-n // bm))
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    lo, hi = max(1, int(mean - 12 * sd) - 1), min(n, int(mean + 12 * sd) + 1)
    lp, lq, lg = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    return sum(math.exp(lg - math.lgamma(c + 1) - math.lgamma(n - c + 1) + c * lp + (n - c) * lq) * -(-c // bm)
               for c in range(lo, hi + 1))


def grouped_expert_cost(d: int, f_l: float, e_l: float, num_experts: int, top_k: int, rows: int, tokens: float,
                        wbytes: float, abytes: float) -> dict | None:
    """Work of `grouped_swiglu` (mixjax.kernels.grouped_experts) on one device: `rows` input rows (the static
    shape: received buffer) of which `tokens` are real tokens, `e_l` local experts of FFN width `f_l`.
    None when `choose_blocks` refuses the shape (mixjax then runs the dense path).

    Block size BM from choose_blocks(rows * k, ...) as the kernel picks it; expected row blocks per expert
    E[ceil(c / BM)], c ~ Binomial(tokens, k / E); padded rows = BM * blocks. Kernel A (gate/up) and kernel B
    (down) read each touched expert's weight tiles once per row block of that expert (L2 reuse between blocks
    not counted) and do 2 * 3 d F_l FLOPs per padded row, matmuls BM rows wide. With at most PAIR_BLOCKS_MAX
    pairs each pair is its own block (`pair_layout`, no sort or scatters); while the rows fit one block each touched
    expert gets one block of all of them (`expert_layout`, no sort, x read in place). Around them: the layout step
    (top-k of the float32 gates, counts, a sort of the pairs, scatters; the gather of x into the padded buffer
    of the static size M) and the combine (a gather of [rows, k, d] expert outputs, float32, and a weighted
    sum)."""
    from mixjax.kernels.grouped_experts import choose_blocks, layout_kind  # noqa: PLC0415

    if f_l != int(f_l) or e_l != int(e_l):
        return None
    e_l, f_l = int(e_l), int(f_l)
    k = min(top_k, e_l)
    pairs_static = rows * k
    blk = choose_blocks(pairs_static, e_l, d, f_l, rows=rows)
    if blk is None:
        return None
    bm = blk.bm
    p = top_k / num_experts  # probability that a token picks a given expert
    touched = e_l * (1 - (1 - p) ** tokens) if tokens > 0 else 0.0
    ab, wb, f32, i32 = abytes, wbytes, 4, 4
    kind = layout_kind(rows, k, bm)
    if kind == "pair":  # pair_layout: a block per pair, no sort (two tokens' shared expert: twice)
        blocks = tokens * top_k * e_l / num_experts
        m_static = pairs_static * bm
        layout = rows * d * ab + m_static * d * ab  # x gathered into the padded buffer
    elif kind == "expert":  # expert_layout: a block per touched expert, every block reading x itself (padded)
        blocks = touched
        m_static = e_l * bm
        layout = rows * k * (2 * i32 + f32) + e_l * i32 + bm * d * ab
    else:
        blocks = e_l * expected_blocks(tokens, p, bm)
        m_static = (-(-pairs_static // bm) + min(e_l, pairs_static)) * bm  # rows of the padded buffer (static)
        layout = (rows * e_l * f32 + rows * k * (f32 + i32)  # top-k over the gate matrix
                  + 10 * pairs_static * i32 + m_static * i32  # counts, sort, ranks, destination / source scatters
                  + rows * d * ab + m_static * d * ab)  # x gathered into the padded [M, d] buffer
    padded = bm * blocks
    kernels = (blocks * 3 * d * f_l * wb  # weight tiles, once per row block
               + padded * d * ab  # x rows (kernel A)
               + 2 * padded * f_l * ab  # h written by A, read by B
               + padded * d * ab)  # y written by B (x's dtype)
    combine = rows * k * (d * ab + 2 * d * f32 + i32 + f32) + rows * d * ab
    return {"bm": bm, "blocks": blocks, "padded_rows": padded, "touched": touched,
            "pairs": tokens * top_k * e_l / num_experts, "flops": 2 * 3 * d * f_l * padded,
            "mm_width": min(bm, d, f_l), "weight_bytes": blocks * 3 * d * f_l * wb,
            "layout_bytes": layout, "kernel_bytes": kernels, "combine_bytes": combine}


def grouped_rate(cl: ClusterSpec, bm: int) -> tuple[float, float] | None:
    """(FLOP/s, bytes/s) the grouped expert kernels achieved in calibration at row-block size `bm` (the nearest
    measured BM, by ratio, when `bm` itself was not probed), or None when the profile has no such probe (nameplate
    presets, CPU profiles, profiles older than the probe)."""
    rates = cl.grouped_rates
    if not rates:
        return None
    near = min(rates, key=lambda b: (abs(math.log(b / bm)), b))
    return rates[near]


def flash_attention_work(seq: int, cache_len: int, start: int, head_dim: int, fresh: bool) -> dict | None:
    """Keys the prompt attends to in mixjax.kernels.flash_attention's tiling, or None when it does not tile
    (XLA's attention then runs). Query tile i (BQ queries, the last padded) walks the keys in blocks of BK up to
    its last position: keys_i = BK * min(last_i // BK + 1, ceil(S / BK)); S = the cache (Triton kernel) or, for a
    prompt starting at position 0 on GPU (`fresh`: cuDNN on the chunk's own K/V), the prompt itself."""
    from mixjax.kernels.flash_attention import tiles_for  # noqa: PLC0415

    tiles = tiles_for(seq, cache_len, head_dim)
    if tiles is None:
        return None
    bq, bk = tiles[0], tiles[1]
    s_len = seq if fresh else cache_len
    p0 = 0 if fresh else start
    nb = -(-s_len // bk)
    tile_keys = [bk * min((p0 + min((i + 1) * bq, seq) - 1) // bk + 1, nb) for i in range(-(-seq // bq))]
    return {"bq": bq, "bk": bk, "query_rows": bq * len(tile_keys), "key_rows": bq * sum(tile_keys),
            "keys_read": min(s_len, max(tile_keys)), "fresh": fresh}


def impl_step_cost(cfg, cl: ClusterSpec, strategy: Strategy, nodes: int, gpus: int, batch: int, seq: int,
                   cache_len: int, wbytes: float, abytes: float = 2, chunks: int = 2, kernels: int | None = None,
                   hierarchical: bool = True, fused_overlap: bool = True, expert_impl: str | None = None,
                   start: int | None = None, logits: str = "all") -> dict:
    """Time of one `ShardedModel.forward` of `batch` sequences x `seq` new tokens with a KV cache of `cache_len`
    slots, as mixjax implements it (see the module docstring). Compute per block is a roofline over the FLOPs
    and the bytes the block's arrays occupy, counting the passes the implementation makes over its large
    intermediates; collectives use the padded buffer sizes of mixjax.sharding.dispatch / fused.
    `kernels`: kernels the compiled step launches (from its HLO), charged cl.op_overhead each, plus one
    cl.step_overhead per call; None (no compiled program at hand): neither is charged.
    expert_impl: "dense", "grouped" (or "grouped-interpret"), or None / "auto": the platform's default.
    start: position of the first new token (default cache_len - seq, as validation and the benchmarks place it).
    logits: "all" (ShardedModel.forward: every position) or "last" (forward_last, the server's prefill)."""
    sizes = {NODE: nodes, GPU: gpus}

    def sz(axes):
        return math.prod(sizes[x] for x in axes) if axes else 1

    a, dp, mt, ep = sz(strategy.attn_tp), sz(strategy.attn_dp), sz(strategy.moe_tp), sz(strategy.moe_ep)
    if batch % dp:
        raise ValueError(f"batch {batch} must be a multiple of the data-parallel degree {dp}")
    B = batch // dp
    n = B * seq  # tokens one device holds in attention
    d, E, F = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    V_l = -(-cfg.vocab_size // a)
    ab, wb, f32 = abytes, wbytes, 4
    L = cfg.num_hidden_layers
    n_moe = sum(1 for i in range(L) if cfg.is_moe_layer(i))
    flops_rate, bw = cl.peak_flops, cl.hbm_bw
    impl = resolve_expert_impl(expert_impl, cl)
    pallas = {"grouped": "gpu", "grouped-interpret": "interpret"}.get(impl)  # as ParallelContext.pallas
    p0 = cache_len - seq if start is None else start
    if logits not in ("all", "last"):
        raise ValueError(f"logits must be 'all' or 'last', not {logits!r}")

    relayout_bw = cl.relayout_bw or bw

    def new_parts():
        return {"compute": {}, "comm": {}}

    def comp(parts, name, mm=(), fl=0.0, by=0.0, relayout=0.0):
        """Roofline of one block: matmuls `mm` [(flops, narrowest dimension)] at the width-dependent rate, other
        FLOPs at peak; streamed bytes at hbm_bw, re-laid-out bytes (read + write) at relayout_bw."""
        t_fl = fl / flops_rate + sum(f / _mm_rate(cl, w) for f, w in mm)
        t_by = by / bw + relayout / relayout_bw
        parts["compute"][name] = parts["compute"].get(name, 0.0) + max(t_fl, t_by)

    def coll(parts, name, kind, axes, S):
        t = coll_time(cl, kind, S, axes, sizes, hierarchical)
        parts["comm"][name] = parts["comm"].get(name, 0.0) + t
        return t

    def experts(parts, rows, e_l, f_l, weight_copy=True):
        # gate / up: one [rows, D] x [D, E_l * F_l] product each; down: E_l batched [rows, F_l] x [F_l, D]
        # Two groups of kernels that run one after the other, each its own roofline (a single roofline over both
        # hid the combine's memory time under the products' FLOPs): the products (weights, x, the gate/up and h
        # intermediates, y written), then the gate-weighted sum over the experts, a contraction over the leading
        # axis of y that XLA runs as a re-laying pass (y read and written at relayout_bw, then read)
        mm = [(2 * rows * d * f_l * e_l * 2, min(rows, d, e_l * f_l)), (2 * rows * f_l * d * e_l, min(rows, f_l, d))]
        y = e_l * rows * d * f32  # per-expert outputs [E_l, rows, D] f32
        by = (3 * e_l * d * f_l * wb + rows * d * ab
              + e_l * rows * f_l * (2 * 2 * f32 + 2 * ab)  # gate/up (f32) written and read, h written and read
              + y)  # y written
        # XLA:CPU copies the gate and up weights [E_l, D, F_l] into [E_l F_l, D] for the products every step (a
        # transposing copy of each, seen in the compiled CPU programs of every strategy)
        # (once per layer: the fused path's chunks share the copy)
        w_relayout = 2 * 2 * e_l * d * f_l * wb if cl.platform == "cpu" and weight_copy else 0.0
        comp(parts, "expert_weight_relayout", relayout=w_relayout)
        comp(parts, "experts", mm, fl=2 * e_l * rows * d, by=by)
        comp(parts, "experts_combine", by=y + rows * e_l * f32 + rows * d * ab, relayout=2 * y)

    def moe_experts(parts, rows, tokens, e_l, f_l, weight_copy=True):
        """The routed experts on `rows` input rows carrying `tokens` real tokens: grouped or dense."""
        g = grouped_expert_cost(d, f_l, e_l, E, cfg.num_experts_per_tok, rows, tokens, wb, ab) if pallas else None
        if g is None:
            experts(parts, rows, e_l, f_l, weight_copy)
            return
        comp(parts, "expert_layout", by=g["layout_bytes"])
        rate = grouped_rate(cl, g["bm"])
        if rate:  # the kernels' achieved matmul rate and bandwidth at this BM, measured by calibrate's probe
            t_g = max(g["flops"] / rate[0], g["kernel_bytes"] / rate[1])
            parts["compute"]["grouped_experts"] = parts["compute"].get("grouped_experts", 0.0) + t_g
            parts["grouped_rate"] = {"bm": g["bm"], "flops": rate[0], "bw": rate[1]}
        else:
            comp(parts, "grouped_experts", [(g["flops"], g["mm_width"])], by=g["kernel_bytes"])
        comp(parts, "expert_combine", by=g["combine_bytes"])
        parts["grouped"] = {k: g[k] for k in ("bm", "blocks", "padded_rows", "touched", "pairs")}

    def attention(parts):
        if hasattr(cfg, "kv_lora_rank"):
            from mixjax.models.deepseek_v3 import ABSORB_MAX_TOKENS  # noqa: PLC0415

            sz_ = _sizes(cfg)
            h_l = cfg.num_attention_heads / a
            qk, vd, lora = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
            rope = cfg.qk_rope_head_dim
            if seq <= ABSORB_MAX_TOKENS:  # few new tokens: attention in the latent space (MLA._attend_latent)
                # the projections' FLOPs include kv_b_proj once per new token, which is what folding its key half
                # into the queries and applying its value half to the weighted latent cost; the cache is read as
                # [S, kv_lora + rope] by the score and the value products, never expanded
                mm = [(2 * n * sz_["attn"] / a, min(n, lora, h_l * qk))]
                fl = 2 * n * h_l * cache_len * (2 * lora + rope)
                by = (sz_["attn"] / a * wb + 2 * B * cache_len * (lora + rope) * ab
                      + 4 * B * h_l * seq * cache_len * f32)
                comp(parts, "attention", mm, fl=fl, by=by)
                return
            # long prompts: the latent is expanded to every head's K and V
            from mixjax.kernels.flash_attention import mla_cudnn_supported, mla_supported  # noqa: PLC0415

            nope = cfg.qk_nope_head_dim
            fresh = pallas == "gpu" and p0 == 0 and mla_cudnn_supported(qk, vd, ab)  # MLA._attend_cudnn's case
            if fresh or (pallas and mla_supported(nope, rope, vd, cache_len, gpu=pallas == "gpu")):
                # cuDNN on the prompt's own keys (v padded to q/k's head dim) or the Triton flash kernel over the
                # cache: causal (query, key) pairs only, no score matrix in memory
                s_len = seq if fresh else cache_len
                pairs = seq * (0 if fresh else p0) + seq * (seq + 1) / 2
                v_eff = qk if fresh else vd
                mm = [(2 * n * sz_["attn"] / a, min(n, lora, h_l * qk)),
                      (2 * B * s_len * lora * h_l * (nope + vd), min(lora, h_l * vd)),
                      (2 * B * h_l * pairs * (qk + v_eff), qk)]
                expanded = B * s_len * h_l * (nope + vd) * ab
                copies = B * s_len * h_l * (qk + v_eff) * ab if fresh else 0.0  # K concatenated, V padded
                by = (sz_["attn"] / a * wb + B * s_len * (lora + rope) * ab + 2 * expanded + 2 * copies
                      + B * seq * h_l * qk * ab)
                parts["attention_path"] = "cudnn" if fresh else "flash"
                comp(parts, "attention", mm, by=by)
                return
            mm = [(2 * n * sz_["attn"] / a, min(n, lora, h_l * qk)),
                  (2 * B * cache_len * lora * h_l * (cfg.qk_nope_head_dim + vd), min(lora, h_l * vd))]
            fl = 2 * n * h_l * cache_len * (qk + vd)
            by = (sz_["attn"] / a * wb + B * cache_len * (lora + cfg.qk_rope_head_dim) * ab
                  + B * cache_len * h_l * (qk + vd) * ab + 4 * B * h_l * seq * cache_len * f32)
            relayout = 2 * B * cache_len * h_l * (qk + vd) * ab
            parts["attention_path"] = "xla"
        else:
            from mixjax.models.base import kv_heads_stored  # noqa: PLC0415

            hd, h_l = cfg.head_dim, cfg.num_attention_heads / a
            kv_l = kv_heads_stored(cfg.num_key_value_heads, cfg.num_attention_heads, a) / a
            mm = [(2 * n * d * h_l * hd * 2, min(n, d, h_l * hd)), (2 * n * d * kv_l * hd * 2, min(n, d, kv_l * hd))]
            proj_by = (2 * d * h_l * hd + 2 * d * kv_l * hd) * wb + 2 * n * (d + 2 * h_l * hd + 4 * kv_l * hd) * ab
            # the new K and V rows go into the heads-major cache [B, kv, S, D]: [B, T, kv, D] -> [B, kv, T, D] is
            # a copy when T > 1 and kv > 1 (a bitcast otherwise)
            relayout = 2 * 2 * n * kv_l * hd * ab if seq > 1 and kv_l > 1 else 0.0
            fresh = pallas == "gpu" and ab == 2 and hd in (64, 128) and p0 == 0  # prefill_attention's cuDNN case
            fa = flash_attention_work(seq, cache_len, p0, hd, fresh) if pallas and seq > 1 else None
            if fa:  # flash attention: causal FLOPs per query tile, no score matrix in memory
                # matmul width: the Triton kernel's tiles are BQ x BK; cuDNN's fused kernel is taken as head_dim wide
                width = hd if fresh else min(fa["bq"], fa["bk"], hd)
                mm.append((2 * 2 * B * h_l * fa["key_rows"] * hd, width))
                # K and V up to the last visible key, once per (row, KV head): the query tiles and the heads of a
                # group read the same blocks (L2)
                by = proj_by + 2 * B * kv_l * fa["keys_read"] * hd * ab
                parts["attention_path"] = "cudnn" if fresh else "flash"
                comp(parts, "attention", mm, by=by, relayout=relayout)
                return
            fl = 2 * 2 * n * h_l * cache_len * hd  # QK^T and PV over every cache slot (masked)
            cache = B * cache_len * kv_l * hd * ab  # K (or V) on this device
            by = (2 * cache  # K and V read by the dots
                  + 4 * B * h_l * seq * cache_len * f32)  # scores: written, masked/softmaxed, read
            # The dots read the heads-major cache as it is, except that XLA:CPU copies K into [B, kv, D, S] for
            # the score dot when a device holds one KV head (seen in the compiled CPU programs)
            if cl.platform == "cpu" and kv_l == 1:
                relayout += 2 * cache
            parts["attention_path"] = "xla"
            # projections, then the score / softmax / PV kernels: one roofline each, run one after the other
            comp(parts, "attention", mm, by=proj_by)
            comp(parts, "attention_scores", fl=fl, by=by, relayout=relayout)
            return
        comp(parts, "attention", mm, fl=fl, by=by, relayout=relayout)

    def layer(moe: bool):
        parts = new_parts()
        attention(parts)
        comp(parts, "norms_residual", by=8 * n * d * ab)
        if not moe:  # dense MLP, TP over the attention group
            I_l = cfg.intermediate_size / a
            comp(parts, "dense_mlp", [(2 * n * 3 * d * I_l, min(n, d, I_l))],
                 by=3 * d * I_l * wb + n * (d + 3 * I_l) * ab * 2)
            coll(parts, "attn_allreduce", "all_reduce", strategy.attn_tp, n * d * ab)
            coll(parts, "mlp_allreduce", "all_reduce", strategy.attn_tp, n * d * ab)
            return parts
        shared_w = (cfg.num_shared_experts or 0) * F
        if not strategy.fused:
            coll(parts, "attn_allreduce", "all_reduce", strategy.attn_tp, n * d * ab)
            comp(parts, "router", [(2 * n * d * E, min(n, d, E))], by=d * E * wb + 4 * n * E * f32)
            if not strategy.moe_ep:  # pure TP: every device holds every expert, F split
                moe_experts(parts, n, n, E, F / mt)
                coll(parts, "moe_allreduce", "all_reduce", strategy.moe_tp, n * d * ab)
            else:
                split = tuple(x for x in strategy.attn_tp if x in strategy.moe_ep)
                ps = sz(split)
                cap = -(-n // ps)  # rows this device dispatches; capacity = rows (exact dispatch)
                e_l = E / ep
                buf_x, buf_g = ep * cap * d * ab, ep * cap * e_l * f32
                comp(parts, "dispatch_pack", by=3 * (buf_x + buf_g) + n * ep * d * ab)
                coll(parts, "dispatch_a2a", "all_to_all", strategy.moe_ep, buf_x)
                coll(parts, "gates_a2a", "all_to_all", strategy.moe_ep, buf_g)
                moe_experts(parts, ep * cap, ep * n / ps, e_l, F / mt)
                if strategy.moe_tp:
                    coll(parts, "expert_tp_allreduce", "all_reduce", strategy.moe_tp, ep * cap * d * ab)
                coll(parts, "combine_a2a", "all_to_all", strategy.moe_ep, buf_x)
                comp(parts, "combine_unpack", by=3 * buf_x + n * ep * d * f32)
                if split:
                    coll(parts, "regather", "all_gather", split, ps * cap * d * ab)
            if shared_w:
                comp(parts, "shared_experts", [(2 * n * 3 * d * shared_w / a, min(n, d, shared_w / a))],
                     by=3 * d * shared_w / a * wb)
                coll(parts, "shared_allreduce", "all_reduce", strategy.attn_tp, n * d * ab)
            return parts
        # fused: per chunk RS(gpu) -> router on 1/g -> A2A(node) -> AG(gpu) -> experts -> RS(gpu) -> A2A(node)
        # -> AG(gpu); the chunks are unrolled, so chunk i's node traffic may overlap chunk i+1's gpu traffic
        g, nn = gpus, nodes
        c = max(1, min(chunks, n // g))
        per_chunk = g * -(-n // (g * c))
        rows = per_chunk // g
        e_l = E / nn
        buf_x, buf_g = nn * rows * d * ab, nn * rows * e_l * f32

        def ct(kind, S, axis):
            return coll_time(cl, kind, S, (axis,), sizes, hierarchical)

        # one chunk's collectives, in the order fused_moe_residual issues them (all chunks are equal)
        intra = [ct("reduce_scatter", per_chunk * d * ab, GPU), ct("all_gather", g * buf_x, GPU),
                 ct("all_gather", g * buf_g, GPU), ct("reduce_scatter", g * buf_x, GPU)]
        inter = [ct("all_to_all", buf_x, NODE), ct("all_to_all", buf_g, NODE), ct("all_to_all", buf_x, NODE)]
        if shared_w:
            intra += [ct("all_gather", per_chunk * d * ab, GPU), ct("reduce_scatter", per_chunk * d * ab, GPU)]
        intra.append(ct("all_gather", per_chunk * d * ab, GPU))
        if fused_overlap and c > 1:
            parts["comm"]["fused_pipeline"] = fused_pipeline(intra, inter, c)
        else:
            parts["comm"]["fused_pipeline"] = c * (sum(intra) + sum(inter))
        parts["comm"]["(chunks)"] = c
        for i in range(c):
            comp(parts, "router", [(2 * rows * d * E, min(rows, d, E))], by=d * E * wb + 4 * rows * E * f32)
            comp(parts, "dispatch_pack", by=3 * (buf_x + buf_g) + rows * nn * d * ab)
            moe_experts(parts, g * nn * rows, g * nn * rows, e_l, F / g, weight_copy=i == 0)
            comp(parts, "combine_unpack", by=3 * buf_x + rows * nn * d * f32)
            if shared_w:
                sw = shared_w / g
                comp(parts, "shared_experts", [(2 * per_chunk * 3 * d * sw, min(per_chunk, d, sw))],
                     by=3 * d * sw * wb)
        comp(parts, "norms_residual", by=2 * n * d * ab)  # concatenating the chunks
        return parts

    def total(parts):
        return sum(parts["compute"].values()) + sum(v for k, v in parts["comm"].items() if not k.startswith("("))

    moe_parts = layer(True) if n_moe else new_parts()
    dense_parts = layer(False) if L - n_moe else new_parts()
    top = new_parts()
    comp(top, "embed", by=2 * n * d * ab)
    coll(top, "embed_allreduce", "all_reduce", strategy.attn_tp, n * d * ab)
    n_head = B if logits == "last" else n  # rows reaching the LM head
    comp(top, "lm_head", [(2 * n_head * d * V_l, min(n_head, d, V_l))],
         by=d * V_l * wb + n_head * V_l * f32 + n_head * d * ab)
    overhead = 0.0 if kernels is None else cl.step_overhead + kernels * cl.op_overhead
    t_moe, t_dense, t_top = total(moe_parts), total(dense_parts), total(top)
    tot = n_moe * t_moe + (L - n_moe) * t_dense + t_top + overhead
    comm = (n_moe * sum(v for k, v in moe_parts["comm"].items() if not k.startswith("("))
            + (L - n_moe) * sum(dense_parts["comm"].values()) + sum(top["comm"].values()))
    return {"total": tot, "per_moe_layer": t_moe, "dense_layer": t_dense, "top": t_top, "overhead": overhead,
            "comm": comm, "compute": tot - comm - overhead, "kernels": kernels,
            "moe_layer_parts": moe_parts, "dense_layer_parts": dense_parts, "top_parts": top,
            "expert_impl": impl, "logits": logits,
            "degrees": {"attn_tp": a, "attn_dp": dp, "moe_tp": mt, "moe_ep": ep}}


def memory_per_device(cfg, strategy: Strategy, nodes: int, gpus: int, wl: Workload, wbytes: float,
                      abytes: float = 2) -> dict:
    sizes = {NODE: nodes, GPU: gpus}

    def sz(axes):
        return math.prod(sizes[a] for a in axes) if axes else 1

    a, dp, t, e = sz(strategy.attn_tp), sz(strategy.attn_dp), sz(strategy.moe_tp), sz(strategy.moe_ep)
    s = _sizes(cfg)
    L = cfg.num_hidden_layers
    n_moe = sum(1 for i in range(L) if cfg.is_moe_layer(i))
    w_rep = (L * s["attn"] + (L - n_moe) * s["dense_mlp"] + n_moe * (s["shared"] + s["router"]) + s["embed"]) / a
    w_exp = n_moe * cfg.num_experts * s["expert"] / (t * e)
    weights = (w_rep + w_exp) * wbytes
    ctx = wl.prompt + wl.output
    kv = L * kv_bytes_per_token_layer_device(cfg, a, abytes) * ctx * math.ceil(wl.batch / dp)
    # activations: the prefill step's live hidden states (a few copies of [tokens, hidden] and the widest
    # intermediate) on one device; a rough allowance, not a trace of the allocator
    T_local = wl.batch * wl.prompt / dp
    widest = max(cfg.intermediate_size / a, cfg.moe_intermediate_size * cfg.num_experts_per_tok / t)
    act = T_local * (6 * cfg.hidden_size + 2 * widest) * abytes
    return {"weights": weights, "kv_cache": kv, "activations": act, "total": weights + kv + act}


def evaluate(cfg, cl: ClusterSpec, strategy: Strategy, nodes: int, gpus: int, wl: Workload,
             wbytes: float = 2.0, abytes: float = 2.0, chunks: int = 0, impl: str = "ideal",
             expert_impl: str | None = None, **model_kw) -> Plan:
    """Score one plan. impl="ideal" (paper algorithms) or "mixjax" (this implementation; chunks=0 -> the
    implementation's default of 2; expert_impl: None -> the cluster platform's default, see
    resolve_expert_impl; ignored in ideal mode). The mixjax-mode TTFT is the server's prefill: the prompt from
    position 0, logits for the last position only (ShardedModel.forward_last). model_kw go to step_cost /
    impl_step_cost (hierarchical, overlap...)."""
    plan = Plan(strategy.name, nodes, gpus, feasible=False, reason="")
    problem = layout_problem(cfg, nodes, gpus, strategy)
    mem = memory_per_device(cfg, strategy, nodes, gpus, wl, wbytes, abytes)
    plan.mem_per_device = mem["total"]
    if problem:
        plan.reason = "layout: " + problem
        return plan
    if impl == "mixjax":
        dp = math.prod({NODE: nodes, GPU: gpus}[x] for x in strategy.attn_dp) if strategy.attn_dp else 1
        if wl.batch % dp:
            plan.reason = f"layout: batch {wl.batch} is not a multiple of the data-parallel degree {dp}"
            return plan
        ctx = wl.prompt + wl.output
        pre = impl_step_cost(cfg, cl, strategy, nodes, gpus, wl.batch, wl.prompt, ctx, wbytes, abytes,
                             chunks or 2, expert_impl=expert_impl, start=0, logits="last", **model_kw)
        dec = impl_step_cost(cfg, cl, strategy, nodes, gpus, wl.batch, 1, ctx, wbytes, abytes, chunks or 2,
                             expert_impl=expert_impl, **model_kw)
    elif impl == "ideal":
        pre = step_cost(cfg, cl, strategy, nodes, gpus, wl.batch * wl.prompt, wl.batch, wl.prompt, "prefill",
                        wbytes, abytes, chunks, **model_kw)
        dec = step_cost(cfg, cl, strategy, nodes, gpus, wl.batch, wl.batch, wl.prompt + wl.output / 2, "decode",
                        wbytes, abytes, chunks, **model_kw)
    else:
        raise ValueError(f"impl must be 'ideal' or 'mixjax', not {impl!r}")
    plan.ttft, plan.itl = pre["total"], dec["total"]
    plan.throughput = wl.batch * wl.output / (plan.ttft + wl.output * plan.itl)
    plan.breakdown = {"prefill": pre, "decode": dec, "memory": mem}
    usable = MEM_USABLE * cl.hbm_bytes
    if mem["total"] > usable:
        plan.reason = (f"memory: needs {mem['total'] / GiB:.1f} GiB per device (weights "
                       f"{mem['weights'] / GiB:.1f}, KV {mem['kv_cache'] / GiB:.1f}, activations "
                       f"{mem['activations'] / GiB:.1f}) > {usable / GiB:.1f} GiB usable HBM")
        return plan
    plan.feasible = True
    return plan
