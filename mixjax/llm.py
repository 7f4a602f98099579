"""The Python API for notebooks and scripts.

    import mixjax
    llm = mixjax.LLM("path/to/hf_checkpoint_dir", mesh="1x1", strategy="auto", dtype="float32")
    logits = llm.logits([[1, 5, 9, 2]])          # numpy [batch, seq, vocab]
    outs = llm.generate([[1, 5, 9, 2]], max_new_tokens=16, temperature=0.0)   # new-token-id lists

On several hosts, run the same script on every host with coordinator=, num_processes=, process_id= (or the
MIXJAX_COORDINATOR, MIXJAX_NUM_PROCESSES, MIXJAX_PROCESS_ID environment variables, or under srun / mpirun with
nothing): every process gets the same results (docs/MULTIHOST.md).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mixjax import distributed
from mixjax.models import load_config
from mixjax.models.base import NO_TOKEN
from mixjax.sampling import sample
from mixjax.sharding.mesh import LayoutError, check_layout, make_mesh
from mixjax.sharding.runner import ShardedModel, decode_loop
from mixjax.sharding.strategies import DEFAULT_STRATEGY, STRATEGIES, get_strategy
from mixjax.tokenizer import Tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def default_model_dir() -> Path:
    return Path(__file__).parent / "default_model"


def choose_strategy(cfg, mesh) -> tuple[str, str]:
    """Strategy for strategy="auto": the planner's choice when it is available, else the first strategy of the
    documented preference order (hybrid_fused, hybrid, tp, ep, dp_ep) that the mesh admits."""
    try:
        from mixjax.planner import auto_plan  # noqa: PLC0415 (optional until the planner lands)
    except ImportError:
        auto_plan = None
    if auto_plan is not None:
        return auto_plan(cfg, mesh)
    order = [DEFAULT_STRATEGY] + [s for s in ("hybrid", "tp", "ep", "dp_ep") if s != DEFAULT_STRATEGY]
    for name in order:
        try:
            check_layout(cfg, mesh, STRATEGIES[name])
            return name, f"first strategy in the default order {order} that this mesh admits"
        except LayoutError:
            continue
    raise LayoutError("no strategy can lay this model out on this mesh")


class LLM:
    def __init__(self, model: str | Path | None = None, mesh=None, strategy: str = "auto",
                 dtype: str = "float32", *, fused_chunks: int = 2, capacity_factor: float | None = None,
                 progress: bool = True, devices=None, coordinator: str | None = None,
                 num_processes: int | None = None, process_id: int | None = None,
                 failure_timeout: float | None = None, init_timeout: float | None = None):
        """mesh: "NODExGPU"; default 1x1 on one process, (processes) x (local devices) on several.
        coordinator, num_processes, process_id, failure_timeout, init_timeout: join a multi-host cluster
        (mixjax.distributed) first; also read from the MIXJAX_* environment variables, or detected under SLURM /
        Open MPI. Skipped when jax.distributed is already initialized."""
        self.model_dir = Path(model) if model is not None else default_model_dir()
        self.config = load_config(self.model_dir)
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        self.cluster = None
        if not jax.distributed.is_initialized():
            spec = distributed.resolve_spec(coordinator, num_processes, process_id, failure_timeout, init_timeout)
            if spec is not None:
                self.cluster = distributed.initialize(spec)
        if mesh is None:
            mesh = f"{jax.process_count()}x{jax.local_device_count()}" if jax.process_count() > 1 else "1x1"
        self.mesh = make_mesh(mesh, devices)
        self.plan_reason = "chosen by the caller"
        if strategy == "auto":
            strategy, self.plan_reason = choose_strategy(self.config, self.mesh)
        self.strategy = get_strategy(strategy)
        self.model = ShardedModel(self.config, self.mesh, self.strategy, dtype=DTYPES[dtype],
                                  fused_chunks=fused_chunks, capacity_factor=capacity_factor)
        self.model.load(self.model_dir, progress=progress)
        self.tokenizer = Tokenizer(self.model_dir) if (self.model_dir / "tokenizer.json").is_file() else None
        self._step_fns = {}

    # --- inputs ------------------------------------------------------------------------------------------------
    def _encode(self, prompts) -> tuple[list[list[int]], bool]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        as_text = isinstance(prompts[0], str)
        if as_text:
            if self.tokenizer is None:
                raise ValueError(f"{self.model_dir} has no tokenizer.json: pass token ids instead of strings")
            prompts = [self.tokenizer.encode(p) for p in prompts]
        out = []
        for p in prompts:
            ids = [int(t) for t in p]
            if not ids:
                raise ValueError("empty prompt")
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
            out.append(ids)
        return out, as_text

    def _batch(self, rows: int) -> int:
        dp = self.model.dp_size
        return -(-rows // dp) * dp

    # --- API ---------------------------------------------------------------------------------------------------
    def logits(self, prompts) -> np.ndarray:
        """Full forward pass: float32 logits [batch, seq, vocab] for prompts of equal length."""
        ids, _ = self._encode(prompts)
        t = len(ids[0])
        if any(len(p) != t for p in ids):
            raise ValueError("logits() needs prompts of equal length")
        self._check_length(t)
        b = self._batch(len(ids))
        tokens = np.full((b, t), NO_TOKEN, np.int32)  # rows that pad the batch to the data-parallel degree
        tokens[: len(ids)] = ids
        positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
        logits, _ = self.model.forward(jnp.asarray(tokens), jnp.asarray(positions), self.model.init_cache(b, t),
                                       fresh=True)  # whole prompts from position 0
        return distributed.to_host(logits)[: len(ids), :, : self.config.vocab_size]

    def _decode_steps_fn(self, k: int):
        """The jitted loop of k decode steps, each sampling the next token on device (keys fold_in(key, step))."""
        if k not in self._step_fns:
            V = self.config.vocab_size

            def steps(leaves, tok, pos, cache, keys, step0, temp, tk, tp):
                def pick(i, logits):
                    step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step0 + i)
                    return sample(logits[:, :V], step_keys, temp, tk, tp)[:1]

                (toks,), last, cache = decode_loop(self.model._forward, leaves, tok, pos, cache, k, pick)
                return last, cache, toks

            self._step_fns[k] = jax.jit(steps, donate_argnums=(3,))
        return self._step_fns[k]

    def generate(self, prompts, max_new_tokens: int = 16, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop_token_ids=None, steps_per_call: int = 8):
        """New tokens for each prompt (lists of ids, or strings when the prompts were strings).

        Stops a row at max_new_tokens or at a stop token (default: the checkpoint's EOS ids, if it has a
        tokenizer); the stop token is not returned. Decoding runs steps_per_call steps per device call (the
        host reads their tokens at once and checks the stops between calls; steps past every row's end are
        discarded)."""
        if steps_per_call < 1:
            raise ValueError("steps_per_call must be at least 1")
        ids, as_text = self._encode(prompts)
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if stop_token_ids is None:
            stop_token_ids = self.tokenizer.eos_ids if self.tokenizer else set()
        lengths = np.array([len(p) for p in ids])
        t = int(lengths.max())
        max_len = t + max_new_tokens
        self._check_length(max_len)
        b = self._batch(len(ids))
        tokens = np.full((b, t), NO_TOKEN, np.int32)  # padding: shorter prompts, rows up to the dp degree
        for i, p in enumerate(ids):
            tokens[i, : len(p)] = p
        lengths = np.concatenate([lengths, np.ones(b - len(ids), int)])
        positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
        cache = self.model.init_cache(b, max_len)
        logits, cache = self.model.forward(jnp.asarray(tokens), jnp.asarray(positions), cache, fresh=True)
        last = jnp.asarray(logits)[jnp.arange(b), jnp.asarray(lengths - 1), : self.config.vocab_size]
        keys = jax.random.split(jax.random.key(seed), b)
        temp = jnp.full((b,), temperature, jnp.float32)
        tk = jnp.full((b,), top_k, jnp.int32)
        tp = jnp.full((b,), top_p, jnp.float32)
        out = [[] for _ in range(b)]
        done = np.zeros(b, bool)
        done[len(ids):] = True

        def take(toks):  # one step's tokens [b] on the host
            for i in range(b):
                if not done[i]:
                    if int(toks[i]) in stop_token_ids:
                        done[i] = True
                    else:
                        out[i].append(int(toks[i]))
                        done[i] = len(out[i]) >= max_new_tokens

        nxt, _ = sample(last, jax.vmap(jax.random.fold_in, (0, None))(keys, 0), temp, tk, tp)  # token 0
        take(distributed.to_host(nxt))
        step, run = 1, self._decode_steps_fn(steps_per_call)
        lengths = jnp.asarray(lengths.astype(np.int32))
        while not done.all():
            # token `step` comes from feeding token step-1 at position length + step - 1; a row past its cache
            # end writes into its own last slot and its tokens are discarded
            nxt, cache, toks = run(self.model.leaves, nxt, lengths + (step - 1), cache, keys, jnp.int32(step),
                                   temp, tk, tp)
            for t in distributed.to_host(toks):  # [steps, rows]
                take(t)
            step += steps_per_call
        out = out[: len(ids)]
        return [self.tokenizer.decode(o) for o in out] if as_text else out

    def _check_length(self, n: int):
        limit = self.config.max_position_embeddings
        if n > limit:
            raise ValueError(f"{n} positions exceed the model's context limit of {limit}")
