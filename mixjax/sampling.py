"""Token sampling on device: greedy, temperature, top-k, top-p, per row."""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def sample(logits, keys, temperature, top_k, top_p):
    """logits [B, V] float32; keys [B] PRNG keys; temperature, top_p [B] float32; top_k [B] int32 (0 = off).

    A row with temperature 0 is greedy. Returns token ids [B] int32 and their log-probabilities [B]."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1)
    t = jnp.maximum(temperature, 1e-6)[:, None]
    scaled = logits / t
    # One sort serves top-k and top-p: masking the values below the k-th largest sends only a sorted array's tail
    # to -inf, so it stays sorted.
    desc = jnp.sort(scaled, axis=-1)[:, ::-1]
    v = logits.shape[-1]
    kth = jnp.take_along_axis(desc, jnp.clip(top_k - 1, 0, v - 1)[:, None], axis=-1)
    use_k = top_k[:, None] > 0
    scaled = jnp.where(use_k & (scaled < kth), -jnp.inf, scaled)
    desc = jnp.where(use_k & (desc < kth), -jnp.inf, desc)
    # top-p: keep the smallest set of tokens whose probability mass reaches p (the top token always stays)
    probs_sorted = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
    cutoff_idx = jnp.sum(mass_before < top_p[:, None], axis=-1) - 1
    cutoff = jnp.take_along_axis(desc, cutoff_idx[:, None], axis=-1)
    scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled)
    ids = jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
    return ids, jnp.take_along_axis(logprobs, ids[:, None], axis=-1)[:, 0]
