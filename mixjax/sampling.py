"""Token sampling on device: greedy, temperature, top-k, top-p, per row."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames=("draw", "filter"))
def sample(logits, keys, temperature, top_k, top_p, *, draw: bool = True, filter: bool = True):
    """logits [B, V] float32; keys [B] PRNG keys; temperature, top_p [B] float32; top_k [B] int32 (0 = off).

    A row with temperature 0 is greedy. Returns token ids [B] int32 and their log-probabilities [B].
    draw=False: no row samples (all greedy); filter=False: no sampled row uses top-k or top-p. The caller knows
    these on the host and passes them as static flags, which skips the vocabulary sort and the random draw when
    nothing needs them (for greedy rows over a 152k vocabulary they cost more than the model's decode step on an
    H200), without a lax.cond, whose predicate the GPU runtime reads back to the host in the middle of the step."""
    if draw:
        # Gumbel-max, as jax.random.categorical draws (argmax of gumbel noise + scaled logits), with greedy rows
        # taking the plain logits in the same pass: one argmax over the vocabulary instead of two
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        if filter:
            scaled = _top_k_top_p(scaled, top_k, top_p)
        noise = jax.vmap(lambda k: jax.random.gumbel(k, scaled.shape[1:], scaled.dtype))(keys)
        ids = jnp.argmax(jnp.where(temperature[:, None] > 0, noise + scaled, logits), axis=-1).astype(jnp.int32)
    else:
        ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    return ids, jnp.take_along_axis(logits, ids[:, None], axis=-1)[:, 0] - logz


def sampling_flags(rows) -> tuple[bool, bool]:
    """(draw, filter) for rows of (temperature, top_k, top_p): what `sample` must do for this batch."""
    draw = any(t > 0 for t, _, _ in rows)
    return draw, any(t > 0 and (k > 0 or p < 1) for t, k, p in rows)


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
