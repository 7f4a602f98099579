"""Fused AR-A2A: the MixServe hybrid's intra-node reduction overlapped with its inter-node all-to-all.

Unfused hybrid, per MoE layer: all-reduce the attention output over `gpu` (every GPU then holds all of the node's
tokens), and every GPU sends the whole node's tokens over its NIC in the all-to-all over `node`.

Fused, per chunk of the node's tokens:
    dispatch: reduce-scatter over gpu  -> each GPU holds 1/g of the chunk, fully reduced
              residual add, norm, router on that 1/g slice
              all-to-all over node       -> each NIC carries 1/g of the traffic
              all-gather over gpu        -> the TP-split experts see all tokens sent to this node
    combine:  reduce-scatter over gpu (expert partial sums) -> all-to-all back over node
              -> residual add -> all-gather over gpu (the next layer's input, replicated over gpu)
The chunk loop is a Python loop, so it is unrolled in the compiled program: chunk i's all-to-all over `node` has
no data dependency on chunk i+1's reduce-scatter over `gpu`, and XLA's scheduler may run them together (on GPU
with the flags in `mixjax.sharding.xla_flags`). A `lax.scan` would serialise them.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from mixjax.sharding.dispatch import all_to_all, capacity, dense_gates, pack, unpack

GPU, NODE = "gpu", "node"


def fused_moe_residual(x, attn_partial, *, norm, route, experts, shared, num_experts, top_k, par, live=None):
    """x + h + MoE(norm(h)) with h = x + sum_gpu(attn_partial), for x [n, D] replicated over gpu.

    norm(u) -> u; route(u) -> (ids, weights); experts(x, gates_local) -> partial sums over gpu;
    shared: None or a module with .partial(u) (a TP-split dense MLP, e.g. DeepSeek's shared experts).
    live: [n] bool, False for rows that carry no token (their routing weights are zeroed: they go to no expert).
    """
    sizes = dict(par.axis_sizes)
    g, ep = sizes[GPU], sizes[NODE]
    n, d = x.shape
    chunks = max(1, min(par.fused_chunks, n // g))
    per_chunk = g * -(-n // (g * chunks))  # rows per chunk, a multiple of g
    total = per_chunk * chunks
    x = jnp.pad(x, [(0, total - n), (0, 0)])
    attn_partial = jnp.pad(attn_partial, [(0, total - n), (0, 0)])
    live = jnp.pad(jnp.ones(n, bool) if live is None else live, (0, total - n))  # the padding rows: no token
    slice_rows = per_chunk // g
    me = lax.axis_index(GPU)
    cap = capacity(slice_rows, top_k, ep, par.capacity_factor)

    outs = []
    for c in range(chunks):  # unrolled on purpose (see module docstring)
        rows = slice(c * per_chunk, (c + 1) * per_chunk)
        s = lax.psum_scatter(attn_partial[rows], GPU, scatter_dimension=0, tiled=True)  # [n_c/g, D]
        h = lax.dynamic_slice_in_dim(x[rows], me * slice_rows, slice_rows, axis=0) + s
        u = norm(h)
        ids, w = route(u)
        w = jnp.where(lax.dynamic_slice_in_dim(live[rows], me * slice_rows, slice_rows)[:, None], w, 0)
        send_x, send_g, slot = pack(u, dense_gates(ids, w, num_experts), ep, cap)
        recv_x, recv_g = all_to_all(send_x, (NODE,)), all_to_all(send_g, (NODE,))
        all_x = lax.all_gather(recv_x.reshape(ep * cap, d), GPU, axis=0, tiled=True)
        all_g = lax.all_gather(recv_g.reshape(ep * cap, -1), GPU, axis=0, tiled=True)
        y = lax.psum_scatter(experts(all_x, all_g, impl=par.expert_impl, top_k=top_k), GPU, scatter_dimension=0, tiled=True)  # this GPU's rows
        moe = unpack(all_to_all(y.reshape(ep, cap, d), (NODE,)), slot)
        if shared is not None:
            full_u = lax.all_gather(u, GPU, axis=0, tiled=True)
            moe = moe + lax.psum_scatter(shared.partial(full_u), GPU, scatter_dimension=0, tiled=True)
        outs.append(lax.all_gather(h + moe, GPU, axis=0, tiled=True))
    return jnp.concatenate(outs, axis=0)[:n]


def fused_bytes(n_tokens: int, d_model: int, num_experts: int, top_k: int, nodes: int, gpus: int,
                bytes_per_elem: int, capacity_factor: float | None = None) -> dict[str, int]:
    """Bytes one GPU moves per MoE layer in the fused path: intra-node (gpu) and inter-node (node) links."""
    slice_rows = math.ceil(n_tokens / gpus)
    cap = capacity(slice_rows, top_k, nodes, capacity_factor)
    tok = d_model * bytes_per_elem
    a2a = nodes * cap * (2 * tok + 4 * num_experts // nodes)
    intra = (n_tokens * tok  # reduce-scatter of the attention partial sums
             + 2 * gpus * nodes * cap * tok  # all-gather of dispatched tokens, reduce-scatter of expert sums
             + n_tokens * tok)  # all-gather of the layer output
    return {"capacity": cap, "inter_node": a2a, "intra_node": intra}
