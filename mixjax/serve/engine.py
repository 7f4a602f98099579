"""The serving engine: a preallocated, sharded KV cache with a fixed number of slots, jit-compiled bucketed prefill
and a decode step over all slots, and continuous batching driven by one background thread.

Every step of the loop: drop cancelled requests (their slots are free at once), admit waiting requests into free
slots (prefill into a small separate cache, then copy that row into the slot of the big cache; several
waiting prompts that fit one bucket in one prefill call), then run one decode step for all slots together. While
requests decode, the prefill work admitted before each decode call is limited (`max_prefill_tokens`): the rest of a
burst, or of a long prompt's chunks, follows after single decode steps.
Sampling (greedy, temperature, top-k, top-p, per-request seed) runs on device; stop tokens, stop strings and
max_tokens are checked on the host after each step.

Multi-step decode (`decode_steps=K > 1`): one dispatch runs K decode steps in a device-side loop, each feeding its
sampled tokens to the next, and the host reads K tokens per row at once. The host's per-step work (dispatch, reading
results back, per-request bookkeeping) is paid once per K tokens; tokens reach clients in bursts of K, and a request
that stops inside a burst wastes the rest of its row's steps (their tokens are discarded).
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mixjax.models.base import NO_TOKEN
from mixjax.sampling import sample, sampling_flags
from mixjax.sharding.runner import decode_loop
from mixjax.serve.metrics import Metrics
from mixjax.tokenizer import DecodeStream

log = logging.getLogger("mixjax.serve")

TOP_LOGPROBS = 5  # alternatives computed on device when a request asks (0..5)
# (draw, filter, want_top) combinations of the sampling program; draw=False makes filter irrelevant
PICK_VARIANTS = [(d, f, t) for d, f in ((False, False), (True, False), (True, True)) for t in (False, True)]


class QueueFull(Exception):
    """The waiting queue is full: the request is rejected (HTTP 429)."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; n = the chosen token's logprob plus n alternatives


_ids = itertools.count()


class Request:
    """One generation. The engine calls `sink(event)` from its thread with dicts:
    {"type": "token", "text": delta, "ids": [...], "logprobs": [...], "top": [...]}, then exactly one of
    {"type": "done", "finish_reason": "stop"|"length"|"cancelled", ...usage} or {"type": "error", "message": ...}."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[dict], None]):
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.sink = sink
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
        self.cancelled = False
        self.finished = False
        self.slot: int | None = None
        self.out_ids: list[int] = []
        self.out_logprobs: list[float] = []
        self.emitted_text = ""  # text already sent
        self.detok = None  # the output's text, decoded as it grows (a DecodeStream, made at the first flush)
        self.pending_ids: list[int] = []  # tokens not yet sent (held back while text is incomplete)
        self.pending_lp: list[float] = []
        self.pending_top: list = []
        self.stop_ids: set[int] | None = None  # token ids that end it (set by the engine at its first token)
        self.pos = 0  # position of the next token fed to decode
        self.last_token = 0
        self.t_submit = time.monotonic()
        self.t_last: float | None = None

    def emit(self, ev: dict):
        try:
            self.sink(ev)
        except Exception:  # a closed event loop (client gone) must not hurt the engine
            pass


@dataclass
class _Inflight:
    """A dispatched decode call whose outputs have not been read: device arrays ([k, slots, ...] for k steps), the
    request of each row, and the number of steps."""

    out: tuple
    members: dict
    k: int = 1


@dataclass
class _Partial:
    """A long prompt prefilled over several iterations (chunks of the largest bucket, in the one-prompt small cache)
    while other requests decode: its request, its reserved slot, and the positions prefilled so far."""

    req: Request
    slot: int
    p0: int = 0


# Row counts of the grouped prefill programs (Engine's prefill_rows): waiting prompts of one bucket are prefilled
# together, as many as the largest holds, each group by the smallest program that holds it. On accelerators also 16
# rows (`default_prefill_rows`): a burst of 128 prompts of 128-512 tokens then takes 8 calls instead of 32. H200, bench
# model, bursts of 128, 4 runs each (docs/BENCHMARKS.md, fourteenth session): TTFT p50 111-306 ms with 4 rows, 94-149
# with 4 and 16; 16 alone made the Poisson load's small groups run all 16 rows (TTFT p50 25 -> 29 ms).
PREFILL_ROWS = (4,)
LONG_PREFILL_ROWS = 16
SHORT_BUCKETS = (32, 128, 512)  # prefill lengths compiled by default
# Rows of the K-step decode programs compiled besides the engine's slots (Engine's decode_rows). One row: a lone
# request takes the batch-1 kernels (the gemv products), which only a one-row call can. H200, Qwen3-30B-A3B shapes,
# 4 layers, a call of 8 steps (tools/probe_padding.py, 2026-12-02): one live row in 8 rows 4.62 ms (5.05 before its
# idle rows carried NO_TOKEN), alone in a one-row call 3.15 ms.
DECODE_ROWS = (1, 8, 32, 128)
LONG_BUCKET = 2048  # also compiled on accelerators (see default_buckets)
# Prefill work admitted between two decode calls while requests are decoding (Engine's max_prefill_tokens): the tokens
# of the prefill programs run, padding included (a group of prompts: its program's rows x its bucket). Without a
# limit, a burst of prompts is prefilled all at once and every running request waits for all of it. 8192: one 4-row
# group of 2048-token prompts, or one 16-row group of 512; as vLLM's default token budget per step for online serving.
MAX_PREFILL_TOKENS = 8192


def default_prefill_rows(accelerator: bool) -> list[int]:
    """The grouped prefill's row counts by default: PREFILL_ROWS, and on an accelerator also LONG_PREFILL_ROWS (on a
    CPU a call's time grows with its rows, so that larger groups gain nothing there and cost a compile)."""
    return sorted({*PREFILL_ROWS, *((LONG_PREFILL_ROWS,) if accelerator else ())})


def default_buckets(max_seq_len: int, accelerator: bool) -> list[int]:
    """The prefill lengths compiled when none are given: SHORT_BUCKETS below max_seq_len, and on an accelerator also
    LONG_BUCKET (capped at max_seq_len). A prompt longer than the largest bucket is prefilled in chunks of it, each
    chunk after the first attending to the cache (the flash kernel, not cuDNN's). On an H200 (Qwen3-30B-A3B shapes, 4
    layers, 2026-12-01) the admission of a 2000-token prompt (prefill, first token, copy into its slot) took 11.3 ms
    in chunks of 512 and 5.75 ms in one pass of 2048 (medians of 9; warm-up 21 s either way). The long bucket costs
    two more compiled programs. On the CPU the short ones only (compile time)."""
    buckets = [b for b in SHORT_BUCKETS if b < max_seq_len] or [max_seq_len]
    if accelerator and max_seq_len > SHORT_BUCKETS[-1]:
        buckets.append(min(LONG_BUCKET, max_seq_len))
    return buckets


class Engine:
    """With `cluster` (a mixjax.distributed.Cluster of several processes), every process builds the same Engine:
    process 0 runs the loop and sends each step's plan to the others before running it; the others call `follow()`,
    which runs the same compiled calls with the same inputs, plan by plan, until process 0 stops."""

    def __init__(self, sm, tokenizer=None, *, max_batch: int = 8, max_seq_len: int = 2048,
                 prefill_buckets=None, max_queue: int = 64, eos_ids=None, metrics: Metrics | None = None,
                 cluster=None, pipeline: bool = True, decode_steps: int = 1, prefill_rows=None,
                 decode_rows=None, max_prefill_tokens: int | None = MAX_PREFILL_TOKENS):
        self.sm = sm
        if int(decode_steps) < 1:
            raise ValueError(f"decode_steps must be >= 1, got {decode_steps}")
        if max_prefill_tokens is not None and int(max_prefill_tokens) < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1 (or None: no limit), got {max_prefill_tokens}")
        accelerator = sm.mesh.devices.flat[0].platform != "cpu"
        if prefill_rows is None:
            prefill_rows = default_prefill_rows(accelerator)
        counts = [int(r) for r in ([prefill_rows] if np.ndim(prefill_rows) == 0 else prefill_rows)]
        if not counts or min(counts) < 1:
            raise ValueError(f"prefill_rows must be >= 1, got {prefill_rows}")
        # While requests are decoding, the prompts admitted before the next decode call are the longest run of the
        # waiting ones (in arrival order) whose prefill work (`_prefill_work`) fits this; at least one. The others
        # wait, and the decode calls run one step each until they are all in (`_step`'s single): running requests then
        # pause for one such part of a burst at a time, not for all of it. A prompt whose chunks alone exceed it goes
        # in that much at a time (`_advance_partial`). None: no limit.
        self.max_prefill_tokens = None if max_prefill_tokens is None else int(max_prefill_tokens)
        self._partial: _Partial | None = None  # a long prompt whose chunks are spread over decode calls
        self.decode_steps = int(decode_steps)
        # Pipelined decode: step n+1 is dispatched (its tokens taken on the device from step n's output) before
        # step n's tokens are read on the host, so the host's dispatch work overlaps the device's step.
        self.pipeline = pipeline
        self._inflight: _Inflight | None = None
        self.cluster = cluster if cluster is not None and cluster.num_processes > 1 else None
        self.failed: str | None = None  # set when the engine can no longer run (multi-host failure)
        self.tok = tokenizer
        self.vocab = sm.vocab_size
        dp = sm.dp_size
        self.slots = -(-max_batch // dp) * dp
        # Waiting prompts that fit one bucket are prefilled together, as many as the largest of group_rows holds
        # (`_groups`), by the grouped program of the fewest rows that holds them (one prompt alone: the one-prompt
        # program). No more prompts than slots are admitted at once, so no program has more rows than that.
        self.group_rows = sorted({min(r, self.slots) for r in counts} - {1})
        # A K-step decode call runs the first R slots only, R the smallest of these that holds every member (slots
        # are handed out lowest first): a few requests in a large engine do not pay for all its rows. With data
        # parallelism the slots are split across devices, and every call runs all of them.
        if decode_rows is None:
            decode_rows = [r for r in DECODE_ROWS if r < self.slots]
        self.decode_rows = sorted({int(r) for r in decode_rows if 0 < int(r) < self.slots} | {self.slots}) \
            if dp == 1 else [self.slots]
        limit = sm.cfg.max_position_embeddings
        self.max_seq_len = min(max_seq_len, limit)
        if prefill_buckets is None:
            prefill_buckets = default_buckets(self.max_seq_len, accelerator)
        self.buckets = sorted({min(int(b), self.max_seq_len) for b in prefill_buckets})
        self.max_queue = max_queue
        self.eos_ids = set(eos_ids if eos_ids is not None else (tokenizer.eos_ids if tokenizer else ()))
        self.metrics = metrics or Metrics()
        self.metrics.slots_total = self.slots

        self._lock = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: dict[int, Request] = {}
        self._stop = False
        self._accepting = True
        self._thread: threading.Thread | None = None

        # host copies of the per-slot sampling parameters
        n = self.slots
        self._h_temp = np.zeros(n, np.float32)
        self._h_topk = np.zeros(n, np.int32)
        self._h_topp = np.ones(n, np.float32)
        self._h_seed = np.zeros(n, np.uint32)

        self._build()
        self.cache = sm.init_cache(self.slots, self.max_seq_len)
        self.small = self._prompt_cache()
        self.small_groups = {r: self._group_cache(r) for r in self.group_rows}
        self.cache_shardings = jax.tree.map(lambda x: x.sharding, self.cache)
        self._copy = jax.jit(self._copy_fn, donate_argnums=0, out_shardings=self.cache_shardings)

    # --- compiled functions ------------------------------------------------------------------------------------
    def _build(self):
        fwd, V = self.sm._forward, self.vocab
        # several processes: the sampled tokens must be readable on process 0, so they leave the step replicated
        rep = jax.sharding.NamedSharding(self.sm.mesh, jax.sharding.PartitionSpec()) if self.cluster else None

        def pick(logits, seeds, steps, temp, topk, topp, *, draw=True, filter=True, want_top=True):
            keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds, steps)
            ids, lp = sample(logits, keys, temp, topk, topp, draw=draw, filter=filter)
            k = min(TOP_LOGPROBS, V)
            if want_top:  # the alternatives, only when a request in the batch asked for them
                top_lp, top_ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), k)
            else:
                top_lp, top_ids = jnp.zeros((logits.shape[0], k), jnp.float32), jnp.zeros((logits.shape[0], k))
            out = ids, lp, top_ids.astype(jnp.int32), top_lp
            return out if rep is None else tuple(jax.lax.with_sharding_constraint(x, rep) for x in out)

        # A prefill returns the logits of its prompts' last positions; their first tokens are sampled by the
        # sampling program their requests need (`_first_tokens`), as decode steps are: a greedy request without
        # logprobs does not pay for the vocabulary's sort and top-k (50-140 ms on a 2-core CPU at a 151,936-token
        # vocabulary, one to four rows), and a long prompt's earlier chunks sample nothing.
        def prefill(state, tokens, positions, cache, last_idx, *, fwd_last):
            """One prompt (row 0 of each data-parallel shard) from position positions[:, 0]: [1, V] logits."""
            at = jnp.full((tokens.shape[0],), last_idx, jnp.int32)
            logits, cache = fwd_last(state, tokens, positions, cache, at)
            return logits[0, :, :V], cache

        def prefill_group(state, tokens, positions, cache, last_idx, *, fwd_last, rows):
            """`rows` prompts from position 0 in one call: prompt i in row i of each data-parallel shard's block of
            rows (rows i, rows + i, ...); its logits [rows, V] are shard 0's row i."""
            logits, cache = fwd_last(state, tokens, positions, cache, last_idx)
            return logits[:rows, 0, :V], cache

        def decode(state, prev_ids, use_prev, tokens, positions, cache):
            tokens = jnp.where(use_prev != 0, prev_ids, tokens)  # rows continuing from the previous step's sample
            logits, cache = fwd(state, tokens[:, None], positions[:, None], cache)
            return logits[:, 0, :V], cache

        def decode_steps(state, prev_ids, use_prev, tokens, positions, steps, seeds, temp, topk, topp, cache, *,
                         k, flags, rows):
            """k decode steps in one device-side loop of the first `rows` slots (the per-row arguments have `rows`
            rows; prev_ids and the cache all slots), step i at positions + i, each sampling the next tokens with the
            same keys as k single steps would (seed, step + i). Returns ([k, rows] ids, logprobs, [k, rows, 5] top
            ids and logprobs), every slot's last ids (the others' unchanged), and the cache."""
            n = prev_ids.shape[0]
            tokens = jnp.where(use_prev != 0, prev_ids[:rows], tokens)
            part = cache if rows == n else jax.tree.map(lambda c: c[:rows], cache)
            outs, last, part = decode_loop(fwd, state, tokens, positions, part, k, lambda i, logits: pick(
                logits[:, :V], seeds, steps + i, temp, topk, topp, draw=flags[0], filter=flags[1], want_top=flags[2]))
            if rows < n:  # the rows back into the (donated) cache, in place
                cache = jax.tree.map(lambda c, p: jax.lax.dynamic_update_slice_in_dim(c, p, 0, axis=0), cache, part)
                last = prev_ids.at[:rows].set(last)
            else:
                cache = part
            if rep is not None:  # as pick's own outputs: readable on process 0
                outs = tuple(jax.lax.with_sharding_constraint(x, rep) for x in outs)
            return outs, last, cache

        # a prompt's first chunk (every row from position 0) and later chunks: two programs where they differ
        self._prefill = jax.jit(functools.partial(prefill, fwd_last=self.sm._forward_last), donate_argnums=(3,))
        self._prefill_fresh = self._prefill if self.sm._forward_last_fresh is self.sm._forward_last else jax.jit(
            functools.partial(prefill, fwd_last=self.sm._forward_last_fresh), donate_argnums=(3,))
        self._prefill_group = {r: jax.jit(functools.partial(prefill_group, fwd_last=self.sm._forward_last_fresh,
                                                            rows=r), donate_argnums=(3,)) for r in self.group_rows}
        self._decode = jax.jit(decode, donate_argnums=(5,))
        # Sampling is a separate small program per (draw, filter, want_top), chosen on the host for the batch: no
        # lax.cond inside the step (the GPU runtime would read its predicate back to the host mid-step).
        self._picks = {f: jax.jit(functools.partial(pick, draw=f[0], filter=f[1], want_top=f[2]))
                       for f in PICK_VARIANTS}
        # multi-step decode: one program per sampling variant (the loop cannot choose one without a host read-back)
        # and number of rows
        self._multi = {} if self.decode_steps == 1 else {
            (f, r): jax.jit(functools.partial(decode_steps, k=self.decode_steps, flags=f, rows=r), donate_argnums=(10,))
            for f in PICK_VARIANTS for r in self.decode_rows}

    @staticmethod
    def _copy_fn(big, small, slots, rows):
        """Rows `rows` of the small cache into slots `slots` of the big one, in one program (a grouped prefill's rows
        all at once); a slot past the big cache's last is not written. Only the first positions are copied where the
        small cache holds fewer (the grouped prefill's, one bucket long; later positions are written before they are
        read)."""
        def one(b, s):
            keep = tuple(slice(0, min(bs, ss)) for bs, ss in zip(b.shape[1:], s.shape[1:]))
            return b.at[(slots,) + keep].set(s[(rows,) + keep], mode="drop", unique_indices=True)
        return jax.tree.map(one, big, small)

    def _group_slots(self, slots: list[int], r: int):
        """The slot and row arguments of `_copy` for a grouped prefill of r rows whose rows 0, 1, .. go to these
        slots (the unused rows to distinct slots past the last, which the copy drops)."""
        to = np.arange(self.slots, self.slots + r, dtype=np.int32)
        to[: len(slots)] = slots
        return to, np.arange(r, dtype=np.int32)

    def _prompt_cache(self):
        """The small cache of one prompt's prefill: a row per data-parallel shard, room for a long prompt's chunks
        (max_seq_len + the largest bucket positions)."""
        return self.sm.init_cache(self.sm.dp_size, self.max_seq_len + self.buckets[-1])

    def _group_cache(self, r: int):
        """The small cache of the r-row grouped prefill: r rows per data-parallel shard, as many positions as the
        largest bucket (a grouped prompt fits one bucket: no chunks)."""
        return self.sm.init_cache(self.sm.dp_size * r, self.buckets[-1])

    def _group_program_rows(self, n: int) -> int:
        """The rows of the grouped prefill program that runs a group of n > 1 prompts: the fewest that hold them."""
        return next(r for r in self.group_rows if r >= n)

    def warmup(self, variants=None):
        """Compile every shape the loop uses (each prefill bucket, the slot copy, the decode step, and the K-step
        decode program of each sampling variant). `variants` limits the K-step programs compiled here to those
        (draw, filter, want_top) combinations (a benchmark of greedy requests needs one); the others then compile
        on first use."""
        t0 = time.monotonic()
        dp = self.sm.dp_size
        for b in self.buckets:
            for prog in {self._prefill_fresh, self._prefill}:
                logits, self.small = prog(self.sm.leaves, np.zeros((dp, b), np.int32),
                                          np.broadcast_to(np.arange(b, dtype=np.int32), (dp, b)), self.small,
                                          np.int32(0))
            group_outs = {}
            for r in self.group_rows:
                tokens, positions, last, group_sampling = self._group_inputs([], b, r)
                group_logits, self.small_groups[r] = self._prefill_group[r](self.sm.leaves, tokens, positions,
                                                                            self.small_groups[r], last)
                group_outs[r] = group_logits, group_sampling
        for f in PICK_VARIANTS:  # the first tokens' sampling programs: one prompt's logits and each group's
            np.asarray(self._picks[f](logits, *self._one_row_sampling(0, 1.0, 0, 1.0))[0])
            for group_logits, group_sampling in group_outs.values():
                np.asarray(self._picks[f](group_logits, *group_sampling)[0])
        self.cache = self._copy(self.cache, self.small, np.zeros(1, np.int32), np.zeros(1, np.int32))
        for r in self.group_rows:
            self.cache = self._copy(self.cache, self.small_groups[r], *self._group_slots([], r))
        z = np.zeros(self.slots, np.int32)  # (not _step: on a cluster every process warms up by itself)
        self._last_ids = z
        for _ in range(2):  # the second call sees the first one's device-resident ids, as every later step does
            logits, self.cache = self._decode(self.sm.leaves, self._last_ids, z, z, z, self.cache)
            outs = [self._picks[f](logits, self._h_seed, z, self._h_temp, self._h_topk, self._h_topp)
                    for f in PICK_VARIANTS]
            self._last_ids = outs[-1][0]
        for (f, r), prog in self._multi.items():  # every sampling variant and row count of the K-step program
            if variants is not None and f not in variants:
                continue
            _, self._last_ids, self.cache = prog(self.sm.leaves, self._last_ids, z[:r], z[:r], z[:r], z[:r],
                                                 self._h_seed[:r], self._h_temp[:r], self._h_topk[:r],
                                                 self._h_topp[:r], self.cache)
        jax.block_until_ready(self.cache)
        return time.monotonic() - t0

    # --- public API (any thread) -------------------------------------------------------------------------------
    def start(self):
        self._thread = threading.Thread(target=self._loop, name="mixjax-engine", daemon=True)
        self._thread.start()

    def submit(self, req: Request) -> Request:
        with self._lock:
            if self.failed is not None:
                raise EngineStopped(f"engine unhealthy: {self.failed}")
            if not self._accepting:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                self.metrics.requests_rejected += 1
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting): try again later")
            self._waiting.append(req)
            self.metrics.queue_length = len(self._waiting)
            self._lock.notify()
        return req

    def cancel(self, req: Request):
        """Free the request's slot (on the next loop iteration, at most one step away)."""
        if not req.finished:
            req.cancelled = True
            with self._lock:
                self._lock.notify()

    def stop(self, cancel: bool = True, timeout: float = 30.0):
        """Stop taking requests; cancel (or, with cancel=False, finish) the ones in flight; end the loop."""
        with self._lock:
            self._accepting = False
            if cancel:
                for r in list(self._waiting) + list(self._active.values()) + self._prefilling():
                    r.cancelled = True
            self._lock.notify()
        deadline = time.monotonic() + timeout
        while not cancel and (self._waiting or self._active or self._partial) and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, deadline - time.monotonic()))

    def generate(self, prompt_ids, params: SamplingParams) -> tuple[list[int], str, str]:
        """Blocking helper: (token ids, text, finish_reason)."""
        import queue

        q: queue.Queue = queue.Queue()
        self.submit(Request(prompt_ids, params, q.put))
        ids, text = [], ""
        while True:
            ev = q.get()
            if ev["type"] == "token":
                ids += ev["ids"]
                text += ev["text"]
            elif ev["type"] == "error":
                raise RuntimeError(ev["message"])
            else:
                return ids, text, ev["finish_reason"]

    def mark_failed(self, message: str):
        """The engine cannot go on (e.g. another process of a multi-host cluster died): refuse new requests, fail
        the waiting and running ones. Called from any thread; the engine thread may be stuck in a collective."""
        with self._lock:
            self.failed = message
            self._accepting = False
            reqs = list(self._waiting) + list(self._active.values()) + self._prefilling()
        self.metrics.healthy = 0
        for r in reqs:
            if not r.finished:
                r.finished = True
                self.metrics.requests_failed += 1
                r.emit({"type": "error", "message": f"engine unhealthy: {message}"})

    def _prefilling(self) -> list[Request]:
        """The request whose long prompt is being prefilled over several iterations, if any."""
        p = self._partial
        return [] if p is None else [p.req]

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests holding a slot: decoding, or a long prompt being prefilled in chunks."""
        return len(self._active) + (self._partial is not None)

    # --- the loop (engine thread) ------------------------------------------------------------------------------
    def _loop(self):
        try:
            self._run_loop()
        finally:
            if self.cluster is not None and self.failed is None:
                try:
                    self.cluster.channel.send("stop")  # the other processes leave follow()
                except Exception as e:
                    log.error("could not send the stop plan to the other processes: %s", e)

    def _run_loop(self):
        while True:
            with self._lock:
                if self._stop:
                    break
                if not self._waiting and not self._active and self._partial is None:
                    self._lock.wait(0.1)
                    continue
            try:
                self._iteration()
            except Exception as e:  # a failed decode step: fail the requests in it, start from a fresh cache
                log.error("engine step failed: %s\n%s", e, traceback.format_exc())
                if self.cluster is not None:  # the other processes cannot follow a recovery: stop the cluster
                    self.cluster.watchdog.fail_after_check(f"engine step failed on process 0: {e}")
                    return
                self._inflight = None
                for slot, r in list(self._active.items()):
                    self._finish(r, error=f"engine step failed: {e}")
                try:
                    self.cache = self.sm.init_cache(self.slots, self.max_seq_len)
                except Exception:
                    log.error("could not re-create the KV cache:\n%s", traceback.format_exc())
        for r in list(self._active.values()) + self._prefilling():
            self._finish(r, reason="cancelled")
        self._partial = None
        with self._lock:
            rest = list(self._waiting)
            self._waiting.clear()
        for r in rest:
            self._finish(r, reason="cancelled")

    def _iteration(self):
        for r in [r for r in self._active.values() if r.cancelled]:
            self._finish(r, reason="cancelled")
        if self._partial is not None and self._partial.req.cancelled:
            self._finish(self._partial.req, reason="cancelled")
            self._partial = None
        budget = self.max_prefill_tokens if self._active else None  # no request decoding: no one waits for prefills
        if self._partial is not None:
            self._advance_partial(budget)
            if budget is not None:  # this call's prefill work is spent: decode one step, then go on
                self.metrics.prefill_deferrals += 1
                return self._decode_iteration(single=True)
        free = [s for s in range(self.slots) if s not in self._active]
        batch = []
        while free:
            with self._lock:
                if not self._waiting:
                    break
                req = self._waiting.popleft()
                self.metrics.queue_length = len(self._waiting)
            if req.cancelled:
                self._finish(req, reason="cancelled")
                continue
            L = len(req.prompt_ids)
            if not 0 < L < self.max_seq_len:  # a bad request fails alone
                msg = f"prompt of {L} tokens does not fit the context limit of {self.max_seq_len}"
                log.error("prefill failed for request %d: %s", req.id, msg)
                self._finish(req, error=f"prefill failed: {msg}")
                continue
            batch.append((req, free.pop(0)))
        held_back = False  # prompts (or a long prompt's chunks) wait for the budget: the next decode call runs one step
        if batch and budget is not None:
            lengths = [len(r.prompt_ids) for r, _ in batch]
            n = self._admissible(lengths, budget)
            if n < len(batch):  # the rest wait at the queue's head, in their order, for the calls after the next decode
                with self._lock:
                    self._waiting.extendleft(r for r, _ in reversed(batch[n:]))
                    self.metrics.queue_length = len(self._waiting)
                batch, held_back = batch[:n], True
            if n == 1 and self._prefill_work(lengths[:1]) > budget:
                # a long prompt over the budget: its chunks go in a budget's worth at a time, between decode calls
                self._partial = _Partial(*batch[0])
                self._advance_partial(budget)
                held_back, batch = True, []
        if batch:
            self._admit(batch)
        self.metrics.prefill_deferrals += held_back
        self._decode_iteration(single=held_back)

    def _decode_iteration(self, single: bool = False):
        self._update_gauges()
        if self._active:
            self._step(single)
        self._update_gauges()

    def _advance_partial(self, budget: int | None):
        """Prefill the partial prompt's next chunks, as many as the budget holds (at least one; None: all). After its
        last chunk: copy it into its slot, sample its first token and start its request."""
        p, bmax = self._partial, self.buckets[-1]
        r, ids = p.req, p.req.prompt_ids
        args = (ids, p.slot, np.uint32(r.seed), np.float32(r.params.temperature), np.int32(r.params.top_k),
                np.float32(r.params.top_p))
        try:
            spent = 0
            while p.p0 < len(ids):  # the last chunk runs in the call that finishes: its logits need not be kept
                b = self._chunk_bucket(len(ids) - p.p0)
                if budget is not None and spent and spent + b > budget:
                    return
                if self.cluster is not None:  # the other processes run the same chunk (and finish) from this plan
                    self.cluster.channel.send("chunk", self._chunk_plan(p, last=p.p0 + bmax >= len(ids)))
                logits = self._prefill_chunk(ids, p.p0)
                spent += b
                p.p0 += bmax
            out = self._finish_prefill(logits, *args, want_top=bool(r.params.logprobs))
        except Exception as e:  # as _admit: the request fails alone, the small cache is made anew
            if self.cluster is not None:
                raise  # the other processes cannot follow a recovery: the loop stops the cluster
            log.error("prefill failed for request %d: %s\n%s", r.id, e, traceback.format_exc())
            self._partial = None
            self._finish(r, error=f"prefill failed: {e}")
            self.small = self._prompt_cache()
            return
        self._partial = None
        self._start(r, args, out)

    @staticmethod
    def _chunk_plan(p: _Partial, last: bool) -> dict[str, np.ndarray]:
        """The step plan of a long prompt's chunk from position p.p0 (`follow`): the prompt, and for its last chunk
        the slot and the first token's sampling arguments."""
        r = p.req
        return {"ids": np.asarray(r.prompt_ids, np.int32), "p0": np.array([p.p0], np.int32),
                "last": np.array([last], np.int32), "slot": np.array([p.slot], np.int32),
                "seeds": np.array([r.seed], np.uint32), "temp": np.array([r.params.temperature], np.float32),
                "topk": np.array([r.params.top_k], np.int32), "topp": np.array([r.params.top_p], np.float32),
                "logprobs": np.array([bool(r.params.logprobs)], np.int32)}

    def _admit(self, batch: list[tuple[Request, int]]):
        """Prefill each (request, slot) and hand the request its first token."""
        if self.cluster is not None:
            self.cluster.channel.send("admit", {
                "slots": np.array([s for _, s in batch], np.int32),
                "lengths": np.array([len(r.prompt_ids) for r, _ in batch], np.int32),
                "ids": np.array([t for r, _ in batch for t in r.prompt_ids], np.int32),
                "seeds": np.array([r.seed for r, _ in batch], np.uint32),
                "temp": np.array([r.params.temperature for r, _ in batch], np.float32),
                "topk": np.array([r.params.top_k for r, _ in batch], np.int32),
                "topp": np.array([r.params.top_p for r, _ in batch], np.float32),
                "logprobs": np.array([bool(r.params.logprobs) for r, _ in batch], np.int32)})
        for group in self._groups([len(r.prompt_ids) for r, _ in batch]):
            items = [batch[i] for i in group]
            # (ids, slot, seed, temperature, top_k, top_p) of each: the prefill's sampling and then the slot's
            args = [(r.prompt_ids, slot, np.uint32(r.seed), np.float32(r.params.temperature), np.int32(r.params.top_k),
                     np.float32(r.params.top_p)) for r, slot in items]
            try:
                outs = self._run_admit_group(args, want_top=any(r.params.logprobs for r, _ in items))
            except Exception as e:  # a bad request fails alone (or with the prompts prefilled beside it)
                if self.cluster is not None:
                    raise  # the other processes cannot follow a recovery: the loop stops the cluster
                for req, _ in items:
                    log.error("prefill failed for request %d: %s\n%s", req.id, e, traceback.format_exc())
                    self._finish(req, error=f"prefill failed: {e}")
                # the small caches were donated: make new ones
                self.small = self._prompt_cache()
                self.small_groups = {r: self._group_cache(r) for r in self.group_rows}
                continue
            for (req, _), a, out in zip(items, args, outs):
                self._start(req, a, out)

    def _start(self, req: Request, args, out):
        """A prefilled request into its slot: args (ids, slot, seed, temperature, top_k, top_p), out its first
        token (id, logprob, top ids, top logprobs)."""
        _, slot, seed, temp, topk, topp = args
        tok, lp, top_ids, top_lp = out
        req.slot = slot
        self._active[slot] = req
        self._h_temp[slot], self._h_topk[slot], self._h_topp[slot], self._h_seed[slot] = temp, topk, topp, seed
        L = len(req.prompt_ids)
        req.pos = L
        now = time.monotonic()
        self.metrics.ttft.observe(now - req.t_submit)
        self.metrics.prompt_tokens += L
        req.t_last = now
        self._on_token(req, int(tok), float(lp), top_ids, top_lp)

    def _groups(self, lengths: list[int]) -> list[list[int]]:
        """The admission order of prompts of these lengths, as groups of indices prefilled in one call each: prompts
        that fit one bucket, by bucket, as many per group as the largest grouped program holds; longer ones (prefilled
        in chunks) alone. A function of the lengths only: every process of a cluster forms the same groups."""
        bmax = self.buckets[-1]
        r = max(self.group_rows, default=1)  # prompts per group, at most
        by_bucket: dict[int, list[int]] = {}
        alone = []
        for i, n in enumerate(lengths):
            if r > 1 and n <= bmax:
                by_bucket.setdefault(next(b for b in self.buckets if b >= n), []).append(i)
            else:
                alone.append([i])
        return [idx[j:j + r] for idx in by_bucket.values() for j in range(0, len(idx), r)] + alone

    def _prefill_work(self, lengths: list[int]) -> int:
        """The tokens of the prefill programs that admit prompts of these lengths, padding included: each group's
        (`_groups`) program rows x its bucket; a prompt alone, its bucket, or its chunks (of the largest bucket, the
        last one of the bucket that holds it)."""
        bmax, work = self.buckets[-1], 0
        for group in self._groups(lengths):
            n = max(lengths[i] for i in group)
            head = (n - 1) // bmax * bmax  # the chunks before the last
            rows = self._group_program_rows(len(group)) if len(group) > 1 else 1
            work += head + rows * self._chunk_bucket(n - head)
        return work

    def _admissible(self, lengths: list[int], budget: int) -> int:
        """How many of the prompts of these lengths (in arrival order) to admit now: the most whose prefill work
        fits the budget, at least one (a prompt larger than the budget goes alone). The work only grows with more
        prompts, so that a bisection finds the count."""
        lo, hi = 1, len(lengths)  # lo fits (or is the one that must go), hi + 1 does not
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._prefill_work(lengths[:mid]) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _group_inputs(self, items, b: int, r: int):
        """The r-row grouped prefill's host inputs for up to r prompts of at most b tokens (unused rows: a row of
        NO_TOKEN, which nothing reads): tokens, positions, last positions, and the first tokens' sampling arguments
        after the logits (seeds, steps, temperature, top_k, top_p; as `_one_row_sampling`)."""
        dp = self.sm.dp_size
        tokens = np.full((dp * r, b), NO_TOKEN, np.int32)
        last = np.zeros(dp * r, np.int32)
        seeds, temp = np.zeros(r, np.uint32), np.ones(r, np.float32)
        topk, topp = np.zeros(r, np.int32), np.ones(r, np.float32)
        for i, (ids, _slot, seed, t, k, p) in enumerate(items):
            tokens[i::r, : len(ids)] = ids  # row i of every data-parallel shard's block of r rows
            last[i::r] = len(ids) - 1
            seeds[i], temp[i], topk[i], topp[i] = seed, t, k, p
        positions = np.broadcast_to(np.arange(b, dtype=np.int32), (dp * r, b))
        return tokens, positions, last, (seeds, np.zeros(r, np.int32), temp, topk, topp)

    @staticmethod
    def _one_row_sampling(seed, temp, topk, topp):
        """The sampling arguments after the logits (seeds, steps, temperature, top_k, top_p) of one prompt."""
        return (np.array([seed], np.uint32), np.zeros(1, np.int32), np.array([temp], np.float32),
                np.array([topk], np.int32), np.array([topp], np.float32))

    def _first_tokens(self, logits, items, sampling, want_top: bool):
        """Sample the first tokens of admitted prompts from their last logits, with the sampling program that the
        requests' parameters need (`sampling_flags`; want_top: some request asked for logprobs). items: the
        prompts' (ids, slot, seed, temperature, top_k, top_p); sampling: (seeds, steps, temperature, top_k, top_p)
        of the logits' rows (rows past the items' are not read). Every process of a cluster runs it."""
        draw, filt = sampling_flags([(t, k, p) for _ids, _slot, _seed, t, k, p in items])
        return self._picks[(draw, filt, bool(want_top))](logits, *sampling)

    def _run_admit_group(self, items, fetch: bool = True, want_top: bool = False):
        """Admit the prompts of one group (`_groups`): items are (ids, slot, seed, temperature, top_k, top_p);
        want_top: some of them asked for logprobs. Returns each one's first token (id, logprob, top ids, top
        logprobs), or None when not fetched."""
        if len(items) == 1:
            out = self._run_admit(*items[0], fetch=fetch, want_top=want_top)
            return [out] if fetch else None
        b = next(x for x in self.buckets if x >= max(len(it[0]) for it in items))
        r = self._group_program_rows(len(items))
        tokens, positions, last, sampling = self._group_inputs(items, b, r)
        logits, self.small_groups[r] = self._prefill_group[r](self.sm.leaves, tokens, positions, self.small_groups[r],
                                                              last)
        self.cache = self._copy(self.cache, self.small_groups[r], *self._group_slots([it[1] for it in items], r))
        out = self._first_tokens(logits, items, sampling, want_top)
        if not fetch:
            return None
        out = jax.device_get(out)  # every copy asked for, then one wait (np.asarray on each: four of each)
        return [tuple(x[i] for x in out) for i in range(len(items))]

    def _run_admit(self, ids, slot: int, seed, temp, topk, topp, fetch: bool = True, want_top: bool = False):
        """The compiled calls of one admission: bucketed (chunked) prefill into the small cache, the copy of its
        row into `slot` of the big cache, and the first token's sampling. Returns the first token's (id, logprob,
        top ids, top logprobs)."""
        for p0 in range(0, len(ids), self.buckets[-1]):
            logits = self._prefill_chunk(ids, p0)
        return self._finish_prefill(logits, ids, slot, seed, temp, topk, topp, fetch=fetch, want_top=want_top)

    def _chunk_bucket(self, rem: int) -> int:
        """The bucket of a prompt's chunk with rem tokens left: the largest while more are left, else the smallest
        that holds them."""
        bmax = self.buckets[-1]
        return bmax if rem > bmax else next(x for x in self.buckets if x >= rem)

    def _prefill_chunk(self, ids, p0: int):
        """Prefill the chunk of the prompt `ids` from position p0 (a multiple of the largest bucket) into the small
        cache; returns its last position's logits."""
        dp = self.sm.dp_size
        rem = len(ids) - p0
        b = self._chunk_bucket(rem)
        chunk = ids[p0: p0 + b]
        tokens = np.full((dp, b), NO_TOKEN, np.int32)  # the bucket's padding: no expert computes it
        tokens[:, : len(chunk)] = chunk
        positions = np.broadcast_to(p0 + np.arange(b, dtype=np.int32), (dp, b))
        last_idx = np.int32(min(rem, b) - 1)
        prog = self._prefill_fresh if p0 == 0 else self._prefill
        logits, self.small = prog(self.sm.leaves, tokens, positions, self.small, last_idx)
        return logits

    def _finish_prefill(self, logits, ids, slot: int, seed, temp, topk, topp, fetch: bool = True,
                        want_top: bool = False):
        """After a prompt's last chunk: its row of the small cache into `slot`, its first token sampled."""
        self.cache = self._copy(self.cache, self.small, np.full(1, slot, np.int32), np.zeros(1, np.int32))
        out = self._first_tokens(logits, [(ids, slot, seed, temp, topk, topp)],
                                 self._one_row_sampling(seed, temp, topk, topp), want_top)
        return tuple(x[0] for x in jax.device_get(out)) if fetch else None

    def _run_decode(self, use_prev, tokens, positions, steps, seeds, temp, topk, topp, flags, k: int = 1):
        """k decode steps (1, or the engine's decode_steps), each followed by sampling. Rows with use_prev take their
        token from the previous call's last sampled ids, which stay on the device (every process of a cluster keeps
        its own copy), instead of from `tokens`. flags [3] int: (some row samples, some sampled row uses
        top-k/top-p, some request wants logprobs). A K-step call runs as many rows as its per-row arguments have
        (one of decode_rows); a single step all slots. Returns device arrays, [k, rows, ...] when k > 1."""
        f = tuple(bool(x) for x in flags)
        if k > 1:
            out, self._last_ids, self.cache = self._multi[(f, len(tokens))](
                self.sm.leaves, self._last_ids, use_prev, tokens, positions, steps, seeds, temp, topk, topp, self.cache)
            return out
        logits, self.cache = self._decode(self.sm.leaves, self._last_ids, use_prev, tokens, positions, self.cache)
        out = self._picks[f](logits, seeds, steps, temp, topk, topp)
        self._last_ids = out[0]
        return out  # [slots, ...]: _collect adds the step axis on the host

    def _dispatch_decode(self, prev: _Inflight | None, single: bool = False) -> _Inflight | None:
        """Start a decode call for the active requests. A request that is in `prev` (not yet read) continues from
        its last token on the device, prev.k positions further; one that `prev` is sure to finish (length limits)
        is left out. If `prev` ends a request another way (a stop token or string, a cancel), the call's row for it
        is wasted work and its output is dropped. The call runs decode_steps steps when some member can use at
        least half of them and not `single`, else one; a row's steps past its own limits are discarded on collection (positions past
        the cache's end write into that row's last slot, which no live request reads)."""
        n = self.slots
        # idle rows carry no token: the rows of a call that hold no request read no expert
        tokens, positions, steps = np.full(n, NO_TOKEN, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32)
        use_prev = np.zeros(n, np.int32)  # int32: step plans carry int32/uint32/float32 arrays only
        members, room = {}, 0
        for s, r in self._active.items():
            if prev is not None and prev.members.get(s) is r:
                ahead = prev.k
                if r.pos + ahead >= self.max_seq_len or len(r.out_ids) + ahead >= r.params.max_tokens:
                    continue
                use_prev[s], positions[s], steps[s] = 1, r.pos + ahead, len(r.out_ids) + ahead
            else:
                tokens[s], positions[s], steps[s] = r.last_token, r.pos, len(r.out_ids)
            members[s] = r
            room = max(room, min(self.max_seq_len - positions[s], r.params.max_tokens - steps[s]))
        if not members:
            return None
        # K steps when some member can use at least half of them: its tail of single steps would cost more than
        # the discarded steps of one K-step call (H200, 48-token requests at batch 1: 7 single steps at the end
        # made the mean interval 0.82 ms against 0.56 ms per device step)
        # One step (single) while prompts are held back by the prefill budget: they are admitted before the next call.
        k = self.decode_steps if 2 * room >= self.decode_steps and not single else 1
        rows = [(r.params.temperature, r.params.top_k, r.params.top_p) for r in members.values()]
        flags = np.array([*sampling_flags(rows), any(r.params.logprobs for r in members.values())], np.int32)
        # a K-step call: the fewest rows that hold every member (decode_rows)
        m = n if k == 1 else next(x for x in self.decode_rows if x > max(members))
        args = [a[:m] for a in (use_prev, tokens, positions, steps, self._h_seed, self._h_temp, self._h_topk,
                                self._h_topp)]
        if self.cluster is not None:
            self.cluster.channel.send("decode", {
                **dict(zip(("use_prev", "tokens", "positions", "steps", "seeds", "temp", "topk", "topp"), args)),
                "flags": flags, "k": np.array([k], np.int32)})
        out = self._run_decode(*args, flags, k)
        # Ask for the tokens now: the copy to the host is then queued behind this call, not behind the next one,
        # which is dispatched before this call's tokens are read. Read later without it, they arrived only after
        # the next call had finished too, and the device sat idle while the host read them and dispatched again
        # (H200, batch 1, 8 steps per call: ~0.9 ms idle per call, 2026-12-01).
        for x in out:
            x.copy_to_host_async()
        return _Inflight(out, members, k)

    def _step(self, single: bool = False):
        """Dispatch the next decode call (one step if single, else as `_dispatch_decode` decides) and collect the
        previous one."""
        prev, self._inflight = self._inflight, None
        if prev is None or self.pipeline:
            self._inflight = self._dispatch_decode(prev, single)
        if prev is None and not self.pipeline:
            prev, self._inflight = self._inflight, None
        if prev is not None:
            self._collect(prev)

    def _collect(self, step: _Inflight):
        """Read a call's sampled tokens on the host and hand them to their requests, step by step, while each
        request is still running."""
        ids, lps, top_ids, top_lp = jax.device_get(step.out)  # one batched transfer, not four
        if step.k == 1:
            ids, lps, top_ids, top_lp = ids[None], lps[None], top_ids[None], top_lp[None]
        # Python numbers at once: indexing the arrays token by token made numpy scalars (128 rows x 8 steps on a
        # 2-core CPU: ~4 ms of the engine thread per call, with one histogram update per token)
        ids, lps = ids.tolist(), lps.tolist()
        now = time.monotonic()
        itl = self.metrics.itl
        for s, r in step.members.items():
            # A call's tokens for a request go out as one event, not one per token: each event costs the HTTP
            # side a wake-up of its event loop, a JSON chunk and a write (128 slots, 8 steps per call, on the
            # stand-in engine of tools/probe_http_front.py on a 2-core CPU: 14.5k tokens/s reached the client one
            # event per token, 35k one per call). A request with stop strings is still flushed token by token, so
            # that it ends exactly at the token that completes one.
            each = bool(r.params.stop)
            top = r.params.logprobs is not None
            gap = None if r.t_last is None else now - r.t_last  # before the call's first token; the others: 0
            n = 0
            for i in range(step.k):
                if self._active.get(s) is not r:
                    break  # ended while the call ran, or by an earlier token of this call: the rest is discarded
                r.pos += 1
                n += 1
                r.t_last = now
                if r.cancelled:
                    if r.pending_ids:
                        self._flush(r, final=False)
                    self._finish(r, reason="cancelled")
                else:
                    self._on_token(r, ids[i][s], lps[i][s], top_ids[i, s] if top else None,
                                   top_lp[i, s] if top else None, flush=each)
            if n:  # the intervals between this request's tokens: one per token
                if gap is not None:
                    itl.observe(gap)
                if n > 1:
                    itl.observe(0.0, n - 1)
            if not each and not r.finished and r.pending_ids:
                self._flush(r, final=False)

    # --- the other processes of a cluster ------------------------------------------------------------------------
    def follow(self):
        """Run process 0's step plans, in order, until it sends "stop" (processes other than 0 of a cluster)."""
        if self.cluster is None or self.cluster.is_leader:
            raise RuntimeError("follow() is for processes other than 0 of a multi-process cluster")
        from mixjax.distributed import DistributedError  # noqa: PLC0415

        ch = self.cluster.channel
        while True:
            kind, a = ch.receive()
            if kind == "stop":
                return
            if kind == "admit":
                lengths = a["lengths"].tolist()
                starts = np.concatenate([[0], np.cumsum(lengths)]).astype(int)
                items = [(a["ids"][starts[i]: starts[i + 1]], slot, a["seeds"][i], a["temp"][i], a["topk"][i],
                          a["topp"][i]) for i, slot in enumerate(a["slots"].tolist())]
                for group in self._groups(lengths):  # the groups process 0 forms from the same lengths
                    self._run_admit_group([items[i] for i in group], fetch=False,
                                          want_top=bool(a["logprobs"][group].any()))
            elif kind == "chunk":  # a long prompt prefilled over several iterations (`_advance_partial`)
                ids = a["ids"]
                logits = self._prefill_chunk(ids, int(a["p0"][0]))
                if a["last"][0]:
                    self._finish_prefill(logits, ids, int(a["slot"][0]), a["seeds"][0], a["temp"][0], a["topk"][0],
                                         a["topp"][0], fetch=False, want_top=bool(a["logprobs"][0]))
            elif kind == "decode":
                self._run_decode(a["use_prev"], a["tokens"], a["positions"], a["steps"], a["seeds"], a["temp"],
                                 a["topk"], a["topp"], a["flags"], int(a["k"][0]))
            else:
                raise DistributedError(f"received an unknown step plan {kind!r} from process 0")

    # --- per-token bookkeeping ---------------------------------------------------------------------------------
    def _on_token(self, r: Request, tok: int, lp: float, top_ids, top_lp, flush: bool = True):
        """A request's next token: stop on a stop token or a length limit; flush: send the text now (else the
        caller flushes after the call's last token for the request). top_ids, top_lp: the alternatives, read only
        for a request that asked for logprobs."""
        p = r.params
        self.metrics.generation_tokens += 1
        if r.stop_ids is None:
            r.stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
        if tok in r.stop_ids:
            self._flush(r, final=True)
            return self._finish(r, reason="stop")
        r.out_ids.append(tok)
        r.out_logprobs.append(lp)
        r.last_token = tok
        r.pending_ids.append(tok)
        r.pending_lp.append(lp)
        # the alternatives are read only for a request that asked for logprobs
        r.pending_top.append(list(zip(top_ids.tolist(), top_lp.tolist())) if p.logprobs is not None else [])
        if flush and self._flush(r, final=False):
            return self._finish(r, reason="stop")
        if len(r.out_ids) >= p.max_tokens or r.pos >= self.max_seq_len:
            self._flush(r, final=True)
            return self._finish(r, reason="length")

    def _flush(self, r: Request, final: bool) -> bool:
        """Send the text that is safe to send; True when a stop string ended the request."""
        stops = r.params.stop
        if self.tok is None:
            full = ""
        else:
            if r.detok is None:
                r.detok = DecodeStream(self.tok)
            full = r.detok.decode(r.out_ids)  # = self.tok.decode(r.out_ids), without decoding all of it each time
        hit = False
        if stops and full:
            found = [i for i in (full.find(s, max(0, len(r.emitted_text) - max(map(len, stops)))) for s in stops)
                     if i >= 0]
            if found:
                full, hit, final = full[: min(found)], True, True
        if final or hit:
            safe = full
        else:
            safe = full[:-1] if full.endswith("\ufffd") else full  # an incomplete UTF-8 sequence
            if stops:  # hold back what could be the start of a stop string
                hold = max(len(s) for s in stops) - 1
                safe = safe[: max(len(r.emitted_text), len(safe) - hold)]
        delta = safe[len(r.emitted_text):] if safe.startswith(r.emitted_text) else ""
        if (delta or r.pending_ids) and (delta or final or self.tok is None):
            r.emit({"type": "token", "text": delta, "ids": r.pending_ids, "logprobs": r.pending_lp,
                    "top": r.pending_top})
            r.emitted_text += delta
            r.pending_ids, r.pending_lp, r.pending_top = [], [], []
        return hit

    def _finish(self, r: Request, reason: str | None = None, error: str | None = None):
        if r.finished:
            return
        r.finished = True
        if r.slot is not None and self._active.get(r.slot) is r:
            del self._active[r.slot]
        if error is not None:
            self.metrics.requests_failed += 1
            r.emit({"type": "error", "message": error})
        else:
            self.metrics.finished[reason] = self.metrics.finished.get(reason, 0) + 1
            r.emit({"type": "done", "finish_reason": reason, "prompt_tokens": len(r.prompt_ids),
                    "completion_tokens": len(r.out_ids)})

    def _update_gauges(self):
        m = self.metrics
        p = self._partial
        m.running = self.running
        m.queue_length = len(self._waiting)
        # a prompt being prefilled in chunks holds its slot and the positions prefilled so far
        m.kv_used = sum(r.pos for r in self._active.values()) + (p.p0 if p is not None else 0)
        m.kv_capacity = self.slots * self.max_seq_len
