"""Per-head RMSNorm and RoPE of a prompt's queries or keys in one pass (Pallas, Triton backend; `interpret=True`
runs it anywhere).

Qwen3 normalises each head of q and k (q_norm, k_norm) before rotating it. XLA makes two kernels of the pair: the
norm is a reduction, the rotation a concatenate, and XLA does not fuse a reduction into a concatenate. So q is read
and written twice: on an H200, 34 us per layer of a 4096-token Qwen3-30B-A3B prompt for ~15 us of bytes. Here one
program per tile of rows reads each head once, computes its statistics and rotates it: 19 us (docs/BENCHMARKS.md).

The arithmetic is the XLA path's, rounding included (models.layers.RMSNorm then apply_rope, in x's dtype): the
statistics in float32, the normalised row rounded to x's dtype before the weight multiplies it, cos and sin rounded
to x's dtype, and each product and sum of the rotation rounded as XLA rounds a bf16 op.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mixjax.kernels import pow2_divisor, triton_params

# rows x heads x head_dim per program: one row of q (32 heads of 128), 8 rows of k. With 8 warps, the fastest of 12
# tilings on an H200 at 4096 tokens (tools/check_norm_rope.py); 16384 elements with 4 warps took 27 us per layer.
ELEMENTS_PER_PROGRAM = 4096


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supported(heads: int, head_dim: int) -> bool:
    """Triton's blocks have power-of-two sides: heads and half the head dimension."""
    return _pow2(heads) and head_dim % 2 == 0 and _pow2(head_dim // 2) and head_dim >= 16


def _kernel(x_ref, w_ref, cos_ref, sin_ref, o_ref, *, eps: float, half: int):
    dt = o_ref.dtype
    f32 = jnp.float32
    rnd = lambda a: a.astype(dt).astype(f32)  # one bf16 op's rounding
    x1 = x_ref[:, :, :half].astype(f32)  # [R, H, D/2]
    x2 = x_ref[:, :, half:].astype(f32)
    ms = (jnp.sum(x1 * x1, axis=-1, keepdims=True) + jnp.sum(x2 * x2, axis=-1, keepdims=True)) / (2 * half)
    r = lax.rsqrt(ms + eps)
    y1 = rnd(w_ref[:half].astype(f32)[None, None, :] * rnd(x1 * r))  # RMSNorm: w * (x / rms) in x's dtype
    y2 = rnd(w_ref[half:].astype(f32)[None, None, :] * rnd(x2 * r))
    c = rnd(cos_ref[...])[:, None, :]  # [R, 1, D/2]
    s = rnd(sin_ref[...])[:, None, :]
    o_ref[:, :, :half] = (rnd(y1 * c) - rnd(y2 * s)).astype(dt)
    o_ref[:, :, half:] = (rnd(y2 * c) + rnd(y1 * s)).astype(dt)


@functools.partial(jax.jit, static_argnames=("eps", "heads", "first", "interpret", "warps", "elements"))
def norm_rope(x, w, cos, sin, *, eps: float, heads: int | None = None, first: int = 0, interpret: bool = False,
              warps: int = 8, elements: int = ELEMENTS_PER_PROGRAM):
    """apply_rope(RMSNorm(w, eps)(x[:, :, first:first + heads]), cos, sin) for x [B, T, H, D] (half-split rotation),
    w [D], cos and sin [B, T, D/2] float32; the result [B, T, heads, D] in x's dtype. heads (default: all H) and
    first pick q's or k's heads out of a fused q/k/v output without a copy; first must be a multiple of heads."""
    b, t, h_all, d = x.shape
    h = heads or h_all
    half = d // 2
    if not supported(h, d):
        raise ValueError(f"norm_rope: {h} heads of {d} (needs powers of two: heads and head_dim / 2)")
    if first % h or first + h > h_all:
        raise ValueError(f"norm_rope: heads {first}..{first + h} of {h_all} (first must be a multiple of heads)")
    n = b * t
    rows = pow2_divisor(n, max(1, elements // (h * d)))
    out = pl.pallas_call(
        functools.partial(_kernel, eps=eps, half=half),
        out_shape=jax.ShapeDtypeStruct((n, h, d), x.dtype),
        grid=(n // rows,),
        in_specs=[pl.BlockSpec((rows, h, d), lambda i: (i, first // h, 0)), pl.BlockSpec((d,), lambda i: (0,)),
                  pl.BlockSpec((rows, half), lambda i: (i, 0)), pl.BlockSpec((rows, half), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((rows, h, d), lambda i: (i, 0, 0)),
        compiler_params=triton_params(warps, 1, interpret), interpret=interpret, name="norm_rope",
    )(x.reshape(n, h_all, d), w, cos.reshape(n, half).astype(jnp.float32), sin.reshape(n, half).astype(jnp.float32))
    return out.reshape(b, t, h, d)
