"""mixjax: serve Mixture-of-Experts LLMs across GPUs and hosts in JAX (the MixServe design)."""

from mixjax.sharding import xla_flags as _xla_flags

_xla_flags.apply()  # before any JAX backend starts

__version__ = "0.1.0"

from mixjax.llm import LLM  # noqa: E402

__all__ = ["LLM", "__version__"]
