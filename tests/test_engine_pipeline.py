"""The pipelined decode loop (step n+1 dispatched from step n's tokens on the device) and the multi-step loop (K
decode steps per dispatch, in one device-side loop) give exactly the tokens of the step-by-step loop: seeded
sampling, greedy, stop tokens, length limits (max_tokens and the context limit), and requests joining mid-stream."""

import threading
import time
from pathlib import Path

import numpy as np
import pytest

import mixjax
from mixjax.serve.engine import Engine, Request, SamplingParams, _Inflight
from mixjax.serve.metrics import Metrics
from mixjax.sharding.mesh import make_mesh
from mixjax.sharding.runner import load_sharded
from mixjax.sharding.strategies import STRATEGIES

MODEL = Path(mixjax.__file__).parent / "default_model"


@pytest.fixture(scope="module")
def model():
    return load_sharded(MODEL, make_mesh("1x1"), STRATEGIES["tp"], progress=False)


def run(model, pipeline: bool, jobs, decode_steps: int = 1, prefill_rows=4, groups: list | None = None,
        first_picks: list | None = None, event_sizes: dict | None = None, decode_rows=None, rows_run: list | None = None):
    """The jobs' results; all submitted before the loop starts, so the first admission takes three at once.
    groups: collects the shape of each grouped prefill call's tokens. first_picks: collects, for each admission's
    sampling of first tokens, (sampling variant, ids, logprobs, the full sampler's ids and logprobs on the same
    logits and keys). event_sizes: collects, for each job, the number of tokens in each of its token events.
    rows_run: collects the rows of each K-step decode call."""
    eng = Engine(model, None, max_batch=3, max_seq_len=96, prefill_buckets=[16], pipeline=pipeline,
                 decode_steps=decode_steps, prefill_rows=prefill_rows, decode_rows=decode_rows)
    eng.warmup()
    if rows_run is not None:
        run_decode = eng._run_decode
        eng._run_decode = lambda *a: (rows_run.append(len(a[1])) if a[-1] > 1 else None) or run_decode(*a)
    if groups is not None:
        def recording(program):
            return lambda *a: groups.append(a[1].shape) or program(*a)
        eng._prefill_group = {r: recording(program) for r, program in eng._prefill_group.items()}
    if first_picks is not None:
        picks, prefill_logits = dict(eng._picks), []

        def keeping_logits(program):  # a prefill program whose logits the recording pick knows as a prefill's
            def run_program(*a):
                logits, cache = program(*a)
                prefill_logits.append(logits)
                return logits, cache
            return run_program
        eng._prefill, eng._prefill_fresh = keeping_logits(eng._prefill), keeping_logits(eng._prefill_fresh)
        eng._prefill_group = {r: keeping_logits(program) for r, program in eng._prefill_group.items()}

        def recording(f):
            def pick(logits, *args):
                out = picks[f](logits, *args)
                if any(logits is x for x in prefill_logits):
                    full = picks[(True, True, True)](logits, *args)
                    first_picks.append((f, *(np.asarray(x) for x in (out[0], out[1], full[0], full[1]))))
                return out
            return pick
        eng._picks = {f: recording(f) for f in picks}
    done, results = threading.Event(), {}

    def sink_for(i):
        toks, lps = [], []

        def sink(ev):
            if ev["type"] == "token":
                if event_sizes is not None:
                    event_sizes.setdefault(i, []).append(len(ev["ids"]))
                toks.extend(ev["ids"])
                lps.extend(ev["logprobs"])
            elif ev["type"] in ("done", "error"):
                results[i] = (toks, ev.get("finish_reason"), ev.get("message"), lps)
                if len(results) == len(jobs):
                    done.set()
        return sink

    for i, (prompt, params) in enumerate(jobs):  # 6 requests, 3 slots: three join as others leave
        eng.submit(Request(prompt, params, sink_for(i)))
    eng.start()
    assert done.wait(120)
    eng.stop()
    return [results[i] for i in range(len(jobs))]


@pytest.fixture(scope="module")
def jobs_and_reference(model):
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, 500, size=n).tolist() for n in (5, 9, 3, 12, 7, 80)]
    greedy_first = run(model, False, [(prompts[0], SamplingParams(max_tokens=20, temperature=0.0))])[0][0]
    stop_tok = greedy_first[5]  # a token greedy decoding reaches mid-sequence: the request stops there
    jobs = [
        (prompts[0], SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[stop_tok])),
        (prompts[1], SamplingParams(max_tokens=17, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)),
        (prompts[2], SamplingParams(max_tokens=1, temperature=0.0)),
        (prompts[3], SamplingParams(max_tokens=25, temperature=1.2, top_k=20, seed=3, ignore_eos=True, logprobs=2)),
        (prompts[4], SamplingParams(max_tokens=11, temperature=0.0, ignore_eos=True)),
        # runs into the context limit (96 positions) after 17 tokens, inside a multi-step call
        (prompts[5], SamplingParams(max_tokens=40, temperature=0.7, seed=5, ignore_eos=True)),
    ]
    step_by_step = run(model, False, jobs)
    assert step_by_step[0][1] == "stop" and len(step_by_step[0][0]) == greedy_first.index(stop_tok)
    assert [len(r[0]) for r in step_by_step[1:]] == [17, 1, 25, 11, 17]  # 96 - 80 positions + the prefill token
    assert step_by_step[5][1] == "length"
    return jobs, step_by_step


def same(a, b):
    """Identical tokens, finish reasons and errors; logprobs equal to float32 rounding (the multi-step program
    is compiled as one loop, so XLA may fuse the sampling's arithmetic differently)."""
    assert [r[:3] for r in a] == [r[:3] for r in b]
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(ra[3], rb[3], rtol=1e-5, atol=1e-5)


def test_pipelined_loop_equals_step_by_step(model, jobs_and_reference):
    jobs, step_by_step = jobs_and_reference
    same(run(model, True, jobs), step_by_step)


@pytest.mark.parametrize("pipeline", [True, False])
def test_multi_step_loop_equals_step_by_step(model, jobs_and_reference, pipeline):
    """Also: a call's tokens for a request reach it as one event (the first token, from the prefill, alone)."""
    jobs, step_by_step = jobs_and_reference
    sizes = {}
    same(run(model, pipeline, jobs, decode_steps=4, event_sizes=sizes), step_by_step)
    for i, (toks, *_rest) in enumerate(step_by_step):
        assert sum(sizes[i]) == len(toks) and sizes[i][0] == 1 and all(1 <= n <= 4 for n in sizes[i][1:])
    assert sizes[1] == [1, 4, 4, 4, 4]  # 17 tokens of a request that runs to its limit: 1 + 4 calls of 4


def test_decode_calls_on_fewer_rows_equal_step_by_step(model, jobs_and_reference):
    """K-step calls that run only the first 2 of the 3 slots when slot 2 is not busy (decode_rows) give the same
    tokens; calls of 2 rows and of all 3 both run."""
    jobs, step_by_step = jobs_and_reference
    rows = []
    same(run(model, True, jobs, decode_steps=4, decode_rows=[2], rows_run=rows), step_by_step)
    assert set(rows) == {2, 3}


def test_prompts_prefilled_one_by_one_equal_grouped(model, jobs_and_reference):
    """The first three prompts (5, 9 and 3 tokens: one bucket) are admitted in one prefill call, by the grouped
    program of the fewest rows that holds them: asked for programs of 2 and 8 rows, the engine of 3 slots makes
    them 2 and 3 rows (never more rows than slots), and the group takes the 3. One prompt per call gives the same
    tokens. The 80-token prompt is prefilled alone, in chunks, either way."""
    jobs, step_by_step = jobs_and_reference
    groups = []
    same(run(model, False, jobs, prefill_rows=[2, 8], groups=groups), step_by_step)
    assert groups and groups[0] == (3, 16)
    same(run(model, False, jobs, prefill_rows=1), step_by_step)


def test_first_tokens_sampled_by_the_program_their_requests_need(model, jobs_and_reference):
    """A prompt's first token is sampled by the sampling program that its requests need (as decode steps are): the
    vocabulary's sort only where a sampled request uses top-k / top-p, the top logprobs only where one asked for them.
    Each gives the first tokens and logprobs of the full sampler on the same logits and keys."""
    jobs, step_by_step = jobs_and_reference
    first_picks = []
    same(run(model, False, jobs, first_picks=first_picks), step_by_step)
    # admissions in order: jobs 0-2 grouped (greedy, top-p sampled, greedy), then 3 (top-k, logprobs), 4 (greedy),
    # 5 (sampled, no filter), as slots free up
    variants = [f for f, *_ in first_picks]
    assert variants == [(True, True, False), (True, True, True), (False, False, False), (True, False, False)]
    n_items = [3, 1, 1, 1]  # prompts per admission: the group of three, then one at a time
    for (f, ids, lps, full_ids, full_lps), n in zip(first_picks, n_items):
        np.testing.assert_array_equal(ids[:n], full_ids[:n])
        np.testing.assert_allclose(lps[:n], full_lps[:n], rtol=1e-5, atol=1e-5)
    first_ids = [*first_picks[0][1][:3], first_picks[1][1][0], first_picks[2][1][0]]  # jobs 0-4's first tokens
    assert [r[0][0] for r in step_by_step[:5]] == [int(i) for i in first_ids]


def test_prefill_groups_by_bucket():
    """Prompts that fit one bucket are grouped by bucket, as many as the largest grouped program holds; longer ones
    go alone, and all go alone without grouped programs."""
    eng = Engine.__new__(Engine)
    eng.buckets, eng.group_rows = [16, 64], [2]
    assert eng._groups([5, 70, 20, 9, 16, 3, 64]) == [[0, 3], [4, 5], [2, 6], [1]]
    eng.group_rows = []
    assert eng._groups([5, 70, 20]) == [[0], [1], [2]]


def test_prefill_row_counts():
    """The grouped prefill's programs: 4 rows, and on accelerators also 16; a group goes to the fewest rows that
    hold it. --prefill-rows takes a list of counts and rejects one that is not a positive integer."""
    from mixjax.serve.__main__ import engine_options, parse_args
    from mixjax.serve.engine import default_prefill_rows

    assert default_prefill_rows(False) == [4] and default_prefill_rows(True) == [4, 16]
    eng = Engine.__new__(Engine)
    eng.group_rows = [4, 16]
    assert [eng._group_program_rows(n) for n in (2, 4, 5, 16)] == [4, 4, 16, 16]
    options = lambda *argv: engine_options(parse_args(["--model", "m", *argv]))
    assert options()["prefill_rows"] is None and options("--prefill-rows", "4,16")["prefill_rows"] == [4, 16]
    for bad in ("0", "4,x"):
        with pytest.raises(ValueError, match="--prefill-rows must be positive integers separated by commas"):
            options("--prefill-rows", bad)


def test_decode_steps_must_be_positive(model):
    with pytest.raises(ValueError, match="decode_steps must be >= 1"):
        Engine(model, None, max_batch=1, max_seq_len=32, decode_steps=0)
    with pytest.raises(ValueError, match="prefill_rows must be >= 1"):
        Engine(model, None, max_batch=1, max_seq_len=32, prefill_rows=0)


def test_default_prefill_buckets():
    """Short buckets below the context limit everywhere; on an accelerator also the long one (a long prompt's single
    pass instead of chunks of 512), capped at the context limit."""
    from mixjax.serve.engine import default_buckets

    assert default_buckets(2048, accelerator=False) == [32, 128, 512]
    assert default_buckets(2048, accelerator=True) == [32, 128, 512, 2048]
    assert default_buckets(1024, accelerator=True) == [32, 128, 512, 1024]
    assert default_buckets(8192, accelerator=True) == [32, 128, 512, 2048]
    assert default_buckets(300, accelerator=True) == [32, 128]
    assert default_buckets(16, accelerator=True) == [16]


def test_decode_loop_keeps_idle_rows_without_a_token():
    """An idle row (NO_TOKEN) of a multi-step decode call stays without a token for every step, so that no expert
    computes it, while a live row feeds each step's sample to the next."""
    import jax
    import jax.numpy as jnp
    from mixjax.models.base import NO_TOKEN
    from mixjax.sharding.runner import decode_loop

    def forward(_leaves, tok, pos, cache):  # logits favour token (input + 1)
        return jax.nn.one_hot(jnp.maximum(tok, 0) + 1, 16) * 10.0, cache

    tokens = jnp.asarray([3, NO_TOKEN], jnp.int32)
    (ids,), last, _ = jax.jit(lambda t: decode_loop(forward, None, t, jnp.zeros(2, jnp.int32), (), 3,
                                                    lambda i, lg: (jnp.argmax(lg, -1),), unroll=3))(tokens)
    np.testing.assert_array_equal(np.asarray(ids)[:, 0], [4, 5, 6])
    np.testing.assert_array_equal(np.asarray(last), [6, NO_TOKEN])


def test_collect_hands_out_tokens_and_intervals():
    """A K-step call's tokens on the host: each request takes its tokens up to its limit (the rest of its rows are
    dropped), and the inter-token histogram gets one interval per token: the wait since the request's last token
    for the call's first, 0 for the others (they arrive together)."""
    eng = Engine.__new__(Engine)
    eng.tok, eng.metrics, eng.eos_ids, eng.max_seq_len, eng._active = None, Metrics(), set(), 1000, {}
    events = {0: [], 1: []}
    reqs = {}
    for s, max_tokens in ((0, 100), (1, 3)):
        r = Request([1, 2], SamplingParams(max_tokens=max_tokens, ignore_eos=True), events[s].append)
        r.slot, r.out_ids, r.t_last = s, [7], time.monotonic() - 0.5  # its first token came 0.5 s ago
        eng._active[s] = reqs[s] = r
    k = 4
    ids = np.arange(10, 10 + 2 * k, dtype=np.int32).reshape(k, 2)
    out = (ids, np.zeros((k, 2), np.float32), np.zeros((k, 2, 5), np.int32), np.zeros((k, 2, 5), np.float32))
    eng._collect(_Inflight(out, dict(eng._active), k))
    assert reqs[0].out_ids == [7, 10, 12, 14, 16] and reqs[1].out_ids == [7, 11, 13]
    assert [e["ids"] for e in events[0]] == [[10, 12, 14, 16]]
    assert events[1][-1]["type"] == "done" and events[1][-1]["finish_reason"] == "length"
    itl = eng.metrics.itl
    assert itl.count == 4 + 2 and itl.sum == pytest.approx(1.0, abs=0.05)  # two gaps of ~0.5 s, four zeros
    assert itl.counts[0] == 4  # the zeros, in the lowest bucket


def test_prefill_work_and_admissible_prompts():
    """The prefill work of an admission is the tokens of the programs that run it, padding included: a group's rows
    x its bucket, a prompt alone its bucket, a long one its chunks. Under a budget, the most prompts (in arrival
    order) whose work fits are admitted, at least one."""
    eng = Engine.__new__(Engine)
    eng.buckets, eng.group_rows = [16, 64], [2, 4]
    assert eng._prefill_work([5]) == 16 and eng._prefill_work([20]) == 64
    assert eng._prefill_work([5, 9]) == 2 * 16 and eng._prefill_work([5, 9, 3]) == 4 * 16  # 3 prompts: 4 rows
    assert eng._prefill_work([70]) == 64 + 16 and eng._prefill_work([128]) == 64 + 64  # chunks of 64
    assert eng._prefill_work([5, 20, 9]) == 2 * 16 + 64
    lengths = [5, 9, 3, 12, 20]
    assert [eng._admissible(lengths, b) for b in (1, 16, 32, 63, 64, 127, 128, 1000)] == [1, 1, 2, 2, 4, 4, 5, 5]
    assert eng._admissible([200, 5], 64) == 1  # too large for the budget: alone


def test_prefill_budget_interleaves_admissions_with_decode_steps(model):
    """While a request decodes, three prompts that arrive together are admitted under a budget of one 2-row group
    of their bucket: two, then a single decode step for the running request, then the third. A prompt of four chunks
    goes in two chunks at a time, a single decode step between. Without a limit the three go in one call and the
    long prompt's chunks back to back. Every request's tokens are the same either way."""
    eng = Engine(model, None, max_batch=4, max_seq_len=96, prefill_buckets=[16], decode_steps=4, prefill_rows=[2],
                 decode_rows=[], max_prefill_tokens=32)
    eng.warmup(variants=[(False, False, False)])
    log = []
    admit, run_decode, chunk = eng._admit, eng._run_decode, eng._prefill_chunk
    eng._admit = lambda batch: log.append(("admit", len(batch))) or admit(batch)
    gauges = []  # (positions prefilled so far of a prompt going in chunks, running gauge, KV gauge) at each decode call

    def logged_decode(*a):
        p, m = eng._partial, eng.metrics
        gauges.append((p and p.p0, m.running, m.kv_used, sum(r.pos for r in eng._active.values())))
        log.append(("decode", a[-1]))
        return run_decode(*a)
    eng._run_decode = logged_decode
    eng._prefill_chunk = lambda ids, p0: log.append(("chunk", p0)) or chunk(ids, p0)
    rng = np.random.RandomState(1)
    prompts = [rng.randint(3, 500, size=n).tolist() for n in (6, 10, 4, 13, 50)]
    eng.start()

    def scenario(later):
        """prompts[0] decoding 40 tokens; once it has its first token, the prompts `later` (indices) arrive
        together, 8 tokens each. Returns every request's tokens and the loop's steps after the first admission."""
        log.clear()
        results, first, done = {}, threading.Event(), threading.Event()

        def sink_for(i):
            toks = []

            def sink(ev):
                if ev["type"] == "token":
                    toks.extend(ev["ids"])
                    first.set()
                else:
                    results[i] = toks
                    if len(results) == 1 + len(later):
                        done.set()
            return sink
        greedy = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        eng.submit(Request(prompts[0], greedy(40), sink_for(0)))
        assert first.wait(60)
        with eng._lock:  # they arrive together: the loop sees all of them or none
            for i in later:
                eng.submit(Request(prompts[i], greedy(8), sink_for(i)))
        assert done.wait(60)
        return results, log[log.index(("admit", 1)) + 2:]  # after the first prompt's admission and its one chunk

    between = lambda steps, a, b: steps[steps.index(a) + 1: steps.index(b)]
    try:
        budgeted, steps = scenario([1, 2, 3])
        assert [x for x in steps if x[0] == "admit"] == [("admit", 2), ("admit", 1)]
        assert between(steps, ("admit", 2), ("admit", 1)) == [("decode", 1)]
        gauges.clear()
        long_budgeted, long_steps = scenario([4])
        assert [x for x in long_steps if x[0] != "decode"] == [("chunk", p0) for p0 in (0, 16, 32, 48)]
        assert between(long_steps, ("chunk", 16), ("chunk", 32)) == [("decode", 1)]
        # while its chunks go in, the long prompt holds a slot and its prefilled positions: the gauges count them
        assert [g[1:] for g in gauges if g[0]] == [(2, 32 + g[3], g[3]) for g in gauges if g[0]] != []
        eng.max_prefill_tokens = None
        unlimited, steps = scenario([1, 2, 3])
        assert [x for x in steps if x[0] == "admit"] == [("admit", 3)]
        long_unlimited, long_steps = scenario([4])
        i = long_steps.index(("admit", 1))
        assert long_steps[i + 1: i + 5] == [("chunk", p0) for p0 in (0, 16, 32, 48)]
    finally:
        eng.stop()
    assert budgeted == unlimited and [len(budgeted[i]) for i in range(4)] == [40, 8, 8, 8]
    assert long_budgeted == long_unlimited and len(long_budgeted[4]) == 8


def test_max_prefill_tokens_option():
    """--max-prefill-tokens: the engine's default when not given, 'none' for no limit, else a positive integer."""
    from mixjax.serve.__main__ import engine_options, parse_args
    from mixjax.serve.engine import MAX_PREFILL_TOKENS

    options = lambda *argv: engine_options(parse_args(["--model", "m", *argv]))
    assert "max_prefill_tokens" not in options()
    assert options("--max-prefill-tokens", "none")["max_prefill_tokens"] is None
    assert options("--max-prefill-tokens", "4096")["max_prefill_tokens"] == 4096
    for bad in ("0", "-3", "lots"):
        with pytest.raises(ValueError, match="--max-prefill-tokens must be a positive integer or 'none'"):
            options("--max-prefill-tokens", bad)
    with pytest.raises(ValueError, match="max_prefill_tokens must be >= 1"):
        Engine.__init__(Engine.__new__(Engine), None, max_prefill_tokens=0)
    assert MAX_PREFILL_TOKENS == 8192
