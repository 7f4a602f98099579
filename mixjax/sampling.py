"""Token sampling on device: greedy, temperature, top-k, top-p, per row."""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def sample(logits, keys, temperature, top_k, top_p):
    """logits [B, V] float32; keys [B] PRNG keys; temperature, top_p [B] float32; top_k [B] int32 (0 = off).

    A row with temperature 0 is greedy. Returns token ids [B] int32 and their log-probabilities [B].
    The vocabulary sort (top-k / top-p) and the random draw run only when some row needs them (lax.cond): for a
    batch of greedy rows over a 152k vocabulary they cost more than the model's decode step (H200, 2026-11-24)."""
    greedy = jnp.argmax(logits, axis=-1)
    sampled = temperature > 0

    def draw():
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        scaled = jax.lax.cond(jnp.any(sampled & ((top_k > 0) | (top_p < 1))), _top_k_top_p, lambda s, k, p: s,
                              scaled, top_k, top_p)
        return jax.vmap(jax.random.categorical)(keys, scaled).astype(greedy.dtype)

    drawn = jax.lax.cond(jnp.any(sampled), draw, lambda: greedy)
    ids = jnp.where(sampled, drawn, greedy).astype(jnp.int32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    return ids, jnp.take_along_axis(logits, ids[:, None], axis=-1)[:, 0] - logz


def _top_k_top_p(scaled, top_k, top_p):
    """Logits outside each row's top-k and top-p sets -> -inf."""
    # One sort serves top-k and top-p: masking the values below the k-th largest sends only a sorted array's tail
    # to -inf, so it stays sorted.
    desc = jnp.sort(scaled, axis=-1)[:, ::-1]
    v = scaled.shape[-1]
    kth = jnp.take_along_axis(desc, jnp.clip(top_k - 1, 0, v - 1)[:, None], axis=-1)
    use_k = top_k[:, None] > 0
    scaled = jnp.where(use_k & (scaled < kth), -jnp.inf, scaled)
    desc = jnp.where(use_k & (desc < kth), -jnp.inf, desc)
    # top-p: keep the smallest set of tokens whose probability mass reaches p (the top token always stays)
    probs_sorted = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
    cutoff_idx = jnp.sum(mass_before < top_p[:, None], axis=-1) - 1
    cutoff = jnp.take_along_axis(desc, cutoff_idx[:, None], axis=-1)
    return jnp.where(scaled < cutoff, -jnp.inf, scaled)
