"""Analytic per-step cost model (uncalibrated): roofline compute + alpha-beta collectives + memory fit.

All times are seconds for one decoder step of the whole mesh; see docs/PLANNER.md for the equations.
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
              expert_bytes_touched: bool = True) -> dict:
    """Time of one forward step of all layers. `tokens` total tokens in the step, `seqs` sequences, `ctx` mean
    context length attended to (decode: cache length; prefill: prompt length, causal)."""
    sizes = {NODE: nodes, GPU: gpus}
    N = nodes * gpus

    def sz(axes):
        return math.prod(sizes[a] for a in axes) if axes else 1

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
    al_a, be_a = link(strategy.attn_tp, cl, sizes)
    ar_attn = all_reduce(T_attn * tok, a, al_a, be_a)  # row-parallel output projection (attention / dense MLP)
    dst_rank = distinct_ranks(E, k, e)
    moe_comm = {}
    inter_bytes = intra_bytes = 0.0  # bytes one GPU sends per MoE layer over each link (for reporting)
    if strategy.name == "tp":
        moe_comm["all_reduce"] = all_reduce(tokens * tok, N, al_a, be_a)
        b = 2 * (N - 1) / N * tokens * tok * 2  # attention + MoE all-reduce
        if nodes > 1:
            inter_bytes = b
        else:
            intra_bytes = b
    elif strategy.name in ("ep", "dp_ep"):
        per_rank = tokens / N
        S = per_rank * dst_rank * tok
        al_e, be_e = link(strategy.moe_ep, cl, sizes)
        moe_comm["a2a_dispatch"] = all_to_all(S, N, al_e, be_e)
        moe_comm["a2a_combine"] = all_to_all(S, N, al_e, be_e)
        if a > 1:  # re-replicate the attention group's tokens
            moe_comm["all_gather_gpu"] = all_gather(T_attn * tok, a, cl.intra_alpha, cl.intra_bw)
        vol = 2 * (N - 1) / N * S
        if nodes > 1:
            inter_bytes = vol
        else:
            intra_bytes = vol
        intra_bytes += 2 * (a - 1) / a * T_attn * tok if a > 1 else 0
    elif strategy.name in ("hybrid", "hybrid_fused"):
        # attention group = one node (a = gpus), expert group over nodes (e = nodes)
        al_n, be_n = cl.inter_alpha, cl.inter_bw
        al_g, be_g = cl.intra_alpha, cl.intra_bw
        if not strategy.fused:
            S = T_attn * dst_rank * tok  # every GPU of the node sends all the node's tokens
            moe_comm["a2a_dispatch"] = all_to_all(S, nodes, al_n, be_n)
            moe_comm["a2a_combine"] = all_to_all(S, nodes, al_n, be_n)
            moe_comm["all_reduce_gpu"] = all_reduce(T_attn * tok, gpus, al_g, be_g)
            inter_bytes = 2 * (nodes - 1) / nodes * S
            intra_bytes = 2 * 2 * (gpus - 1) / gpus * T_attn * tok
        else:
            S = T_attn / gpus * dst_rank * tok  # each GPU sends its 1/g slice
            G = T_attn * dst_rank * tok  # dispatched rows gathered inside the node
            best = None
            # chunks=0: let the model pick the chunk count (1, 2, 4 or 8) with the lowest predicted time
            for c in ([chunks] if chunks else [1, 2, 4, 8]):
                intra = [reduce_scatter(T_attn * tok / c, gpus, al_g, be_g), all_gather(G / c, gpus, al_g, be_g),
                         reduce_scatter(G / c, gpus, al_g, be_g), all_gather(T_attn * tok / c, gpus, al_g, be_g)]
                inter = [all_to_all(S / c, nodes, al_n, be_n)] * 2
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

    moe_layer = t_attn + t_router + t_shared + t_experts + moe_attn_comm + t_moe_comm
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
             wbytes: float = 2.0, abytes: float = 2.0, chunks: int = 0) -> Plan:
    plan = Plan(strategy.name, nodes, gpus, feasible=False, reason="")
    problem = layout_problem(cfg, nodes, gpus, strategy)
    mem = memory_per_device(cfg, strategy, nodes, gpus, wl, wbytes, abytes)
    plan.mem_per_device = mem["total"]
    if problem:
        plan.reason = "layout: " + problem
        return plan
    pre = step_cost(cfg, cl, strategy, nodes, gpus, wl.batch * wl.prompt, wl.batch, wl.prompt, "prefill",
                    wbytes, abytes, chunks)
    dec = step_cost(cfg, cl, strategy, nodes, gpus, wl.batch, wl.batch, wl.prompt + wl.output / 2, "decode",
                    wbytes, abytes, chunks)
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
