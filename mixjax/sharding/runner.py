"""A model placed on a mesh by a strategy: weights and KV cache as global sharded arrays, and the forward step as
one jit-compiled `shard_map` whose body is the model's local-view code with explicit collectives."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mixjax.checkpoint import Checkpoint, is_param, load_params
from mixjax.models import load_config, model_class
from mixjax.sharding.mesh import check_layout, mesh_sizes
from mixjax.sharding.strategies import ParallelContext, Strategy, logical_to_mesh, spec_for


class ShardedModel:
    def __init__(self, cfg, mesh, strategy: Strategy, *, dtype=jnp.float32, fused_chunks: int = 2,
                 capacity_factor: float | None = None, expert_impl: str = "auto"):
        check_layout(cfg, mesh, strategy)
        self.cfg, self.mesh, self.strategy, self.dtype = cfg, mesh, strategy, jnp.dtype(dtype)
        self.expert_impl = resolve_expert_impl(expert_impl, mesh)
        self.par = ParallelContext(strategy, mesh_sizes(mesh), fused_chunks=fused_chunks,
                                   capacity_factor=capacity_factor, expert_impl=self.expert_impl)
        tp = self.par.attn_tp_size
        self.vocab_size = cfg.vocab_size
        self.vocab_padded = -(-cfg.vocab_size // tp) * tp
        cls = model_class(cfg)
        abstract = nnx.eval_shape(lambda: cls(cfg, tp=tp, vocab_padded=self.vocab_padded, dtype=self.dtype,
                                              rngs=nnx.Rngs(0)))
        self.graphdef, self.abstract_state = nnx.split(abstract)
        self.param_specs = jax.tree.map(lambda v: spec_for(v.get_metadata()["axes"], strategy),
                                        self.abstract_state, is_leaf=is_param)
        self.param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), self.param_specs)
        self.cache_layout = [abstract.cache_entries(i) for i in range(cfg.num_hidden_layers)]
        self._treedef = jax.tree.structure(self.abstract_state)
        self._leaf_specs = jax.tree.leaves(self.param_specs, is_leaf=lambda x: isinstance(x, P))
        self.state = None
        self.dp_size = self.par.size(strategy.attn_dp)
        rules = logical_to_mesh(strategy)
        self.token_spec = P(tuple(rules["batch"]) or None, None)
        self.logits_spec = P(tuple(rules["batch"]) or None, None, tuple(rules["vocab"]) or None)
        self.cache_specs = [{e.name: spec_for(e.axes(), strategy) for e in entries}
                            for entries in self.cache_layout]
        self._forward = jax.jit(self._build_forward(), donate_argnums=(3,))
        self._forward_last = jax.jit(self._build_forward(last=True), donate_argnums=(3,))
        # whole prompts (every row from position 0): separate programs only where they differ (GPU flash attention)
        gpu = self.par.pallas == "gpu"
        self._forward_fresh = jax.jit(self._build_forward(fresh=True), donate_argnums=(3,)) if gpu else self._forward
        self._forward_last_fresh = (jax.jit(self._build_forward(last=True, fresh=True), donate_argnums=(3,))
                                    if gpu else self._forward_last)

    # The jitted step takes the weights as a flat list of arrays: flattening an nnx.State in Python on every call
    # cost ~0.8 ms per step on an H200 (measured 2026-11-24), as much as the whole batch-1 decode step on the GPU.
    @property
    def state(self):
        return self._state

    @state.setter
    def state(self, state):
        self._state = state
        self.leaves = None
        if state is not None:
            leaves, treedef = jax.tree.flatten(state)
            if treedef != self._treedef:
                raise ValueError("weights do not have this model's structure")
            self.leaves = leaves

    # --- weights -----------------------------------------------------------------------------------------------
    def load(self, model_dir: str | Path, progress: bool = True) -> "ShardedModel":
        ckpt = Checkpoint(model_dir)
        self.state = load_params(ckpt, self.abstract_state, self.param_shardings, progress=progress)
        # what this process read (on several hosts: only its devices' slices) against the whole model
        self.load_stats = {"bytes_read": ckpt.bytes_read, "slices_read": ckpt.slices_read,
                           "model_bytes": self.param_bytes()}
        return self

    def param_bytes(self) -> int:
        """Bytes of all parameters at their loaded dtypes (the whole model, not one device's share)."""
        return sum(math.prod(v.shape) * jnp.dtype(v.get_value().dtype).itemsize
                   for v in jax.tree.leaves(self.abstract_state, is_leaf=is_param))

    def set_state(self, state) -> "ShardedModel":
        """Use weights from a model built in this process (e.g. training), resharded onto the mesh."""
        want = jax.tree.map(lambda v: tuple(v.shape), self.abstract_state, is_leaf=is_param)
        got = jax.tree.map(lambda v: tuple(v.shape), state, is_leaf=is_param)
        if want != got:
            raise ValueError("weights do not match this layout's shapes (a TP degree above the KV-head count "
                             "repeats KV heads: build the model with the same tp, or load from a checkpoint)")
        self.state = jax.device_put(state, self.param_shardings)
        return self

    # --- KV cache ----------------------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int):
        """Zeroed KV cache for `batch` rows of `max_len` positions, sharded like the strategy says."""
        if batch % self.dp_size:
            raise ValueError(f"batch {batch} must be a multiple of the data-parallel degree {self.dp_size}")

        def make():
            return [{e.name: jnp.zeros(e.shape(batch, max_len), self.dtype) for e in entries}
                    for entries in self.cache_layout]

        shardings = [{k: NamedSharding(self.mesh, s) for k, s in spec.items()} for spec in self.cache_specs]
        return jax.jit(make, out_shardings=shardings)()

    def cache_bytes(self, batch: int, max_len: int) -> int:
        return sum(batch * max_len * math.prod(e.feature_shape) * self.dtype.itemsize
                   for entries in self.cache_layout for e in entries)

    # --- forward -----------------------------------------------------------------------------------------------
    def _build_forward(self, last: bool = False, fresh: bool = False):
        graphdef, par = self.graphdef, self.par
        if fresh:
            par = dataclasses.replace(par, fresh_prompt=True)

        treedef = self._treedef

        def local(leaves, tokens, positions, cache, *last_idx):
            model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            return model(tokens, positions, cache, par, *last_idx)

        extra = (P(self.token_spec[0]),) if last else ()
        return jax.shard_map(local, mesh=self.mesh,
                             in_specs=(self._leaf_specs, self.token_spec, self.token_spec, self.cache_specs) + extra,
                             out_specs=(self.logits_spec, self.cache_specs), check_vma=False)

    def forward(self, tokens, positions, cache, *, fresh: bool = False):
        """tokens, positions [B, T] int32 -> (logits [B, T, vocab_padded] float32, new cache). Donates `cache`.
        fresh=True: every row starts at position 0 (a whole prompt); on GPU its attention then runs in cuDNN over
        the prompt's own keys, without reading the cache (a wrong promise gives wrong attention there)."""
        if self.state is None:
            raise RuntimeError("no weights: call load() or set_state() first")
        return (self._forward_fresh if fresh else self._forward)(self.leaves, tokens, positions, cache)

    def forward_last(self, tokens, positions, cache, last, *, fresh: bool = False):
        """As forward, but logits only at position last[b] of each row: [B, 1, vocab_padded] (prefill).
        fresh=True: every row starts at position 0 (a whole prompt or its first chunk); a wrong promise gives wrong
        attention on GPU."""
        if self.state is None:
            raise RuntimeError("no weights: call load() or set_state() first")
        fn = self._forward_last_fresh if fresh else self._forward_last
        return fn(self.leaves, tokens, positions, cache, last)

    def lower_forward(self, batch: int, seq: int, max_len: int, fresh: bool = False):
        """The lowered forward for given shapes (for HLO inspection and compile-time checks); fresh as in forward."""
        tok = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=NamedSharding(self.mesh, self.token_spec))
        cache = jax.eval_shape(lambda: self.init_cache(batch, max_len))
        state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                             self.abstract_state, self.param_shardings, is_leaf=is_param)
        return (self._forward_fresh if fresh else self._forward).lower(jax.tree.leaves(state), tok, tok, cache)


def decode_loop(forward, leaves, tokens, positions, cache, k: int, pick, unroll: int = 1):
    """k decode steps in one device-side loop, to be traced inside a jit (the engine's and LLM.generate's multi-step
    decode). Step i feeds `tokens` [B] at positions + i through `forward` (a ShardedModel's jitted step) and
    `pick(i, logits [B, vocab_padded])` returns a tuple of per-row arrays whose first is the next tokens. Returns
    (that tuple stacked over the steps, [k, B, ...]; the last step's tokens; the cache). A row whose token is
    NO_TOKEN (negative: an idle row) stays so for all k steps: no expert computes it."""

    def body(carry, i):
        tok, cache = carry
        logits, cache = forward(leaves, tok[:, None], (positions + i)[:, None], cache)
        out = pick(i, logits[:, 0])
        return (jnp.where(tok < 0, tok, out[0]), cache), out

    (last, cache), outs = jax.lax.scan(body, (tokens, cache), jnp.arange(k, dtype=jnp.int32), unroll=unroll)
    return outs, last, cache


EXPERT_IMPLS = ("dense", "grouped", "grouped-interpret")


def resolve_expert_impl(impl: str, mesh) -> str:
    """"auto" (or $MIXJAX_EXPERTS): the grouped Pallas kernels on GPU, where reading only the touched experts
    matters; the dense einsum elsewhere (on CPU the tiny models run faster densely than interpreted kernels)."""
    if impl == "auto":
        impl = os.environ.get("MIXJAX_EXPERTS", "auto")
    if impl == "auto":
        impl = "grouped" if mesh.devices.flat[0].platform == "gpu" else "dense"
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"unknown expert implementation {impl!r}; choose one of {EXPERT_IMPLS} or 'auto'")
    return impl


def load_sharded(model_dir, mesh, strategy: Strategy, dtype=jnp.float32, progress=True, **kw) -> ShardedModel:
    return ShardedModel(load_config(model_dir), mesh, strategy, dtype=dtype, **kw).load(model_dir, progress)
