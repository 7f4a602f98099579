"""Hand-written kernels (Pallas) for the steps where XLA's own output is far from the hardware limit."""


def triton_params(warps: int, stages: int, interpret: bool = False):
    """The Triton backend's compiler parameters for a pallas_call (None when interpreted: any backend runs it)."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=warps, num_stages=stages)


def pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides n and is at most cap (1 at least): a Triton block side for n."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b
