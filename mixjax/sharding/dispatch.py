"""Exact MoE dispatch and combine with static shapes, for every strategy (local view, inside shard_map).

Expert parallelism over `ep` ranks: rank r holds experts [r*E/ep, (r+1)*E/ep). A token goes to rank r once if any
of its top-k experts lives there, carrying its gate weights for that rank's experts. Each source rank packs one
buffer per destination rank:

    send_x [ep, C, D]   tokens (model dtype)
    send_g [ep, C, E/ep] gate weights (float32; zero for experts the token did not choose)

with capacity C = n, the number of tokens the rank holds. C = n means that no routing, however skewed, can
overflow a buffer: dispatch is exact by default. `capacity_factor` f gives C = ceil(f * n * k / ep) instead
(tokens past the capacity are dropped, as in capacity-limited training-style MoE); it is opt-in.

Bytes crossing the EP links per MoE layer and rank (each direction; tokens of `b` bytes per element):
    dispatch: ep * C * (D * b + 4 * E/ep)      combine: ep * C * D * b
of which (ep-1)/ep leave the rank. The planner reads these through `dispatch_bytes`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def dense_gates(ids, weights, num_experts: int):
    """[n, k] expert ids and weights -> [n, E] float32 gate matrix (zero where not chosen)."""
    onehot = jax.nn.one_hot(ids, num_experts, dtype=jnp.float32)
    return jnp.einsum("nke,nk->ne", onehot, weights.astype(jnp.float32))


def capacity(n: int, top_k: int, ep: int, capacity_factor: float | None) -> int:
    if capacity_factor is None:
        return n
    return max(1, min(n, math.ceil(capacity_factor * n * top_k / ep)))


def pack(x, gates, ep: int, cap: int):
    """Lay out tokens per destination rank. Returns send_x [ep, C, D], send_g [ep, C, E/ep], slot [n, ep]
    (the token's row in each destination's buffer, or -1 when it does not go there / did not fit)."""
    n, d = x.shape
    e_local = gates.shape[1] // ep
    g = gates.reshape(n, ep, e_local)
    goes = jnp.any(g != 0, axis=-1)  # [n, ep]
    slot = jnp.cumsum(goes, axis=0) - 1
    slot = jnp.where(goes & (slot < cap), slot, -1)
    rank = jnp.broadcast_to(jnp.arange(ep)[None, :], (n, ep))
    row = jnp.where(slot >= 0, slot, cap)  # out of range -> dropped by the scatter
    send_x = jnp.zeros((ep, cap, d), x.dtype).at[rank, row].set(
        jnp.broadcast_to(x[:, None, :], (n, ep, d)), mode="drop")
    send_g = jnp.zeros((ep, cap, e_local), jnp.float32).at[rank, row].set(g, mode="drop")
    return send_x, send_g, slot


def unpack(back, slot):
    """Sum each token's results from every rank it went to: back [ep, C, D], slot [n, ep] -> [n, D]."""
    ep, cap, d = back.shape
    rank = jnp.arange(ep)[None, :]
    rows = back[rank, jnp.maximum(slot, 0)]  # [n, ep, D]
    rows = jnp.where((slot >= 0)[..., None], rows.astype(jnp.float32), 0.0)
    return rows.sum(axis=1).astype(back.dtype)


def all_to_all(x, axes):
    """Block r of the leading dimension goes to rank r of `axes`; the result's block s came from rank s."""
    return lax.all_to_all(x, axes, 0, 0, tiled=True) if axes else x


def shard_rows(x, axes, sizes: dict[str, int]):
    """This device's 1/|axes| block of rows of x (replicated over `axes`), rows padded to a multiple."""
    if not axes:
        return x
    p = math.prod(sizes[a] for a in axes)
    n = x.shape[0]
    per = -(-n // p)
    x = jnp.pad(x, [(0, per * p - n)] + [(0, 0)] * (x.ndim - 1))
    idx = 0
    for a in axes:
        idx = idx * sizes[a] + lax.axis_index(a)
    return lax.dynamic_slice_in_dim(x, idx * per, per, axis=0)


def moe_unfused(x, gates, experts, par, top_k: int, routed=None):
    """Routed-expert output for tokens x [n, D] replicated over the attention TP group, given their gate
    matrix [n, E] (and optionally the router's (ids, weights) [n, k] it was made from). Returns [n, D], replicated
    the same way. `experts(x, gates_local)` computes this device's experts (and its slice of their FFN width)."""
    st = par.strategy
    sizes = dict(par.axis_sizes)
    if not st.moe_ep:  # pure TP: every device holds a slice of every expert, numbered as the router's
        y = experts(x, gates, impl=par.expert_impl, top_k=top_k, routed=routed)
        return lax.psum(y, st.moe_tp) if st.moe_tp else y
    # Axes over which tokens are replicated but experts differ: each device dispatches only its share of rows.
    split = tuple(a for a in st.attn_tp if a in st.moe_ep)
    n = x.shape[0]
    xs, gs = shard_rows(x, split, sizes), shard_rows(gates, split, sizes)
    ep = par.moe_ep_size
    cap = capacity(xs.shape[0], top_k, ep, par.capacity_factor)
    send_x, send_g, slot = pack(xs, gs, ep, cap)
    recv_x, recv_g = all_to_all(send_x, st.moe_ep), all_to_all(send_g, st.moe_ep)
    y = experts(recv_x.reshape(ep * cap, -1), recv_g.reshape(ep * cap, -1), impl=par.expert_impl, top_k=top_k)
    if st.moe_tp:
        y = lax.psum(y, st.moe_tp)
    out = unpack(all_to_all(y.reshape(ep, cap, -1), st.moe_ep), slot)
    if split:
        out = lax.all_gather(out, split, axis=0, tiled=True)[:n]
    return out


def dispatch_bytes(n_tokens: int, d_model: int, num_experts: int, top_k: int, ep: int,
                   bytes_per_elem: int, capacity_factor: float | None = None) -> dict[str, int]:
    """Bytes one rank sends per MoE layer through the EP all-to-all (padded, static-shape buffers)."""
    cap = capacity(n_tokens, top_k, ep, capacity_factor)
    e_local = num_experts // ep
    return {
        "capacity": cap,
        "dispatch": ep * cap * (d_model * bytes_per_elem + 4 * e_local),
        "combine": ep * cap * d_model * bytes_per_elem,
        "leaves_rank_fraction": (ep - 1) / ep,
    }
