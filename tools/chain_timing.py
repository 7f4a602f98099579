"""Device time of one kernel call, for the kernel probes: R calls chained in one jit (each call's input depends on
the previous call's output, so XLA can neither drop nor reorder them), the program's median time over `iters` runs,
divided by R."""
import jax
from mixjax.bench.experts import timeit


def chained(kern, r: int):
    """A jitted program of r calls kern(x, *rest), each x nudged by the previous call's first output element."""
    @jax.jit
    def chain(x, *rest):
        for _ in range(r):
            y = kern(x, *rest)
            x = x.at[:1, :1].add(y[:1, :1].astype(x.dtype))
        return x
    return chain


def seconds_per_call(kern, r: int, *args, iters: int = 8) -> float:
    return timeit(chained(kern, r), *args, iters=iters) / r
