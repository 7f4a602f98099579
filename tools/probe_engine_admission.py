"""The serving engine's admission of prompts on a GPU (prefill, first token sampled and read, row copied into its
slot), 4 layers of Qwen3-30B-A3B's shapes with random bf16 weights, timed on the host after warm-up.
A development tool:
    python tools/probe_engine_admission.py buckets   # one 2000-token prompt: buckets 32,128,512 against the defaults
    python tools/probe_engine_admission.py grouped   # four prompts of 100 / 500 / 2000 tokens: one call each
                                                     # (Engine._run_admit) against one grouped call (_run_admit_group),
                                                     # its rows copied to their slots in one call or one call per row
    python tools/probe_engine_admission.py copies    # the same two copies on the embedded default model (any backend)
    python tools/probe_engine_admission.py parts     # one prompt and four prompts of 2000 tokens (greedy): each
                                                     # part of an admission waited for (host inputs, prefill, copy,
                                                     # first-token sampling, read-back; and the full sampler) against
                                                     # the bare forward; a timeline of un-waited admissions, then the GPU kernels of a few admissions
                                                     # under the profiler (GPU only)
docs/evidence/engine-buckets-h200-2026-12-01.txt and engine-grouped-prefill-h200-2026-12-01.txt are these loops' output
(the buckets run predates grouped prefill: its warm-up then compiled no grouped programs);
engine-grouped-prefill-h200-2026-12-02.txt is the grouped loop on the balanced-routing bench model. Where a greedy
first token differs between the two ways, the top-5 log-probabilities of both are printed."""
import collections, sys, tempfile, time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from mixjax.bench.decode import bench_config, bench_model, decode_vocab
from mixjax.serve.engine import Engine
from mixjax.sharding.mesh import make_mesh
from mixjax.sharding.runner import ShardedModel
from mixjax.sharding.strategies import STRATEGIES

mode = sys.argv[1] if len(sys.argv) > 1 else "grouped"


def copies_apart(eng):
    """A stand-in for Engine._copy that copies a grouped prefill's rows one call each (the engine before the eighth
    session, 2026-12-01)."""
    copy_all = eng._copy

    def per_row(cache, small, slots, rows):
        for s, r in zip(slots, rows):
            if s < eng.slots:
                cache = copy_all(cache, small, np.array([s], np.int32), np.array([r], np.int32))
        return cache
    return per_row


if mode == "copies":
    from pathlib import Path
    import mixjax
    from mixjax.sharding.runner import load_sharded
    m = load_sharded(Path(mixjax.__file__).parent / "default_model", make_mesh("1x1"), STRATEGIES["tp"], progress=False)
    eng = Engine(m, None, max_batch=4, max_seq_len=512, prefill_buckets=[32, 128], prefill_rows=4)
    eng.warmup()
    rng = np.random.RandomState(0)
    items = [([int(v) for v in rng.randint(3, 500, 100)], s, np.uint32(s), np.float32(0), np.int32(0), np.float32(1))
             for s in range(4)]
    print(jax.devices()[0].device_kind, "embedded default model, 4 slots, 4 prompts of 100 tokens", flush=True)
    for name, fn in (("one copy call", eng._copy), ("one call per row", copies_apart(eng))):
        eng._copy = fn
        eng._run_admit_group(items)
        admit, copy = [], []
        for _ in range(15):
            t0 = time.perf_counter()
            eng._run_admit_group(items)
            admit.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            eng.cache = jax.block_until_ready(fn(eng.cache, eng.small_groups[4], *eng._group_slots([0, 1, 2, 3], 4)))
            copy.append(time.perf_counter() - t0)
        print(f"{name}: grouped admission {np.median(admit) * 1e3:.2f} ms, the copies alone {np.median(copy) * 1e3:.3f}"
              f" ms (medians of 15)", flush=True)
    sys.exit()

preset = sys.argv[2] if len(sys.argv) > 2 else "qwen3-30b-a3b"  # e.g. tiny, to try a mode on the CPU
on_gpu = jax.devices()[0].platform == "gpu"
cfg = bench_config(preset, 4, decode_vocab(preset, None))
m = ShardedModel(cfg, make_mesh("1x1"), STRATEGIES["tp"], dtype=jnp.bfloat16,
                 expert_impl="grouped" if on_gpu else "dense")
m.set_state(nnx.state(bench_model(cfg)))
print(jax.devices()[0].device_kind, flush=True)

def admission_inputs(eng, items, b):
    """An admission's host inputs (tokens, positions, last positions, the first tokens' sampling arguments), as
    `_run_admit` builds them for one prompt's one chunk and `_group_inputs` for a group."""
    if len(items) > 1:
        return eng._group_inputs(items, b, 4)
    ids, _slot, seed, temp, topk, topp = items[0]
    tokens = np.zeros((1, b), np.int32)
    tokens[0, :len(ids)] = ids
    return (tokens, np.arange(b, dtype=np.int32)[None], np.int32(len(ids) - 1),
            eng._one_row_sampling(seed, temp, topk, topp))


def dispatch_prefill(eng, items, tokens, positions, last):
    """The admission's prefill call (not waited for): its prompts' last logits."""
    if len(items) > 1:
        logits, eng.small_groups[4] = eng._prefill_group[4](eng.sm.leaves, tokens, positions,
                                                             eng.small_groups[4], last)
    else:
        logits, eng.small = eng._prefill_fresh(eng.sm.leaves, tokens, positions, eng.small, last)
    return logits


def dispatch_copy(eng, items):
    """The admission's copy of its rows into their slots of the big cache (not waited for)."""
    if len(items) > 1:
        eng.cache = eng._copy(eng.cache, eng.small_groups[4], *eng._group_slots([it[1] for it in items], 4))
    else:
        eng.cache = eng._copy(eng.cache, eng.small, np.full(1, items[0][1], np.int32), np.zeros(1, np.int32))
    return eng.cache


def admission_parts(eng, items):
    """Median seconds of each part of an admission (`Engine._run_admit_group`, or `_run_admit`'s one chunk for a
    single prompt), each waited for: host inputs, the prefill program (forward to the last logits), the copy into
    the slots, the first token's sampling (the program the greedy items need, and the full one), the read-back;
    and the bare forward (`ShardedModel.forward_last`) on the same inputs and a cache of the same length."""
    one = len(items) == 1
    b = next(x for x in eng.buckets if x >= max(len(it[0]) for it in items))
    parts = collections.defaultdict(list)
    for _ in range(7):
        t = [time.perf_counter()]
        tokens, positions, last, sampling = admission_inputs(eng, items, b)
        t.append(time.perf_counter())
        logits = jax.block_until_ready(dispatch_prefill(eng, items, tokens, positions, last))
        t.append(time.perf_counter())
        jax.block_until_ready(dispatch_copy(eng, items))
        t.append(time.perf_counter())
        out = jax.block_until_ready(eng._first_tokens(logits, items, sampling, want_top=False))
        t.append(time.perf_counter())
        [np.asarray(x) for x in out]
        t.append(time.perf_counter())
        jax.block_until_ready(eng._picks[(True, True, True)](logits, *sampling))
        t.append(time.perf_counter())
        for name, t0, t1 in zip(("inputs", "prefill", "copy", "sampling", "read-back", "(full sampling)"), t, t[1:]):
            parts[name].append(t1 - t0)
    # the engine's cache lengths: one prompt's small cache holds max_seq_len + the largest bucket (a long prompt's
    # chunks), a group's the largest bucket (on a GPU a fresh prompt attends to its own keys either way; on the
    # CPU the XLA path attends over the whole cache)
    cache = eng.sm.init_cache(tokens.shape[0], eng.max_seq_len + eng.buckets[-1] if one else eng.buckets[-1])
    at = jnp.asarray(np.broadcast_to(last, tokens.shape[:1]))  # each row's last position
    for _ in range(8):
        t0 = time.perf_counter()
        logits, cache = eng.sm.forward_last(jnp.asarray(tokens), jnp.asarray(positions), cache, at, fresh=True)
        jax.block_until_ready(logits)
        parts["bare forward"].append(time.perf_counter() - t0)
    return {k: float(np.median(v[1:])) for k, v in parts.items()}


def admission_timeline(eng, items, batched: bool):
    """Host times (ms from the start) at which each call of an un-waited admission returned, as `_run_admit_group`
    issues them, and when its first tokens were on the host: read one array at a time (np.asarray, the engine
    before the eleventh session) or, batched, by one jax.device_get (which asks for every copy, then waits once)."""
    b = next(x for x in eng.buckets if x >= max(len(it[0]) for it in items))
    rows = []
    for _ in range(7):
        t = [time.perf_counter()]
        tokens, positions, last, sampling = admission_inputs(eng, items, b)
        t.append(time.perf_counter())
        logits = dispatch_prefill(eng, items, tokens, positions, last)
        t.append(time.perf_counter())
        dispatch_copy(eng, items)
        t.append(time.perf_counter())
        out = eng._first_tokens(logits, items, sampling, want_top=False)
        t.append(time.perf_counter())
        if batched:
            jax.device_get(out)  # every copy asked for first, then one wait
        else:
            [np.asarray(x) for x in out]
        t.append(time.perf_counter())
        rows.append(np.diff(t))
    med = np.median(np.array(rows[1:]), axis=0) * 1e3
    return dict(zip(("inputs", "prefill call", "copy call", "sampling call", "read"), med)), float(med.sum())


def round_trip_ms(n=20):
    """A tiny program dispatched and its 4-value output read: the floor of any call waited for."""
    f = jax.jit(lambda x: x + 1)
    x = jnp.zeros(4, jnp.int32)
    np.asarray(f(x))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); np.asarray(f(x)); ts.append(time.perf_counter() - t0)
    ready = [f(x) for _ in range(4)]
    jax.block_until_ready(ready)
    t0 = time.perf_counter(); [np.asarray(r) for r in ready]; apart = time.perf_counter() - t0
    ready = [f(x) for _ in range(4)]
    jax.block_until_ready(ready)
    t0 = time.perf_counter(); jax.device_get(ready); together = time.perf_counter() - t0
    return float(np.median(ts) * 1e3), apart * 1e3, together * 1e3


if mode == "parts":
    from gpu_trace import gpu_kernels, host_events
    eng = Engine(m, None, max_batch=4, max_seq_len=4096, prefill_rows=4)
    print("buckets", eng.buckets, "warm-up", round(eng.warmup(), 1), "s", flush=True)
    rng = np.random.RandomState(0)
    n = min(2000, eng.buckets[-1] - 12)  # one bucket (the CPU's buckets are shorter)
    items = [([int(v) for v in rng.randint(0, cfg.vocab_size, n)], slot, np.uint32(slot), np.float32(0), np.int32(0),
              np.float32(1)) for slot in range(4)]
    for group in (items[:1], items):
        parts = admission_parts(eng, group)
        print(f"{len(group)} x {n} tokens, medians of 6: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in parts.items()),
              flush=True)
    for name, arr in (("contiguous", np.tile(np.arange(2048, dtype=np.int32), (4, 1))),
                      ("broadcast view", np.broadcast_to(np.arange(2048, dtype=np.int32), (4, 2048)))):
        ts = []
        for _ in range(20):
            t0 = time.perf_counter(); jax.block_until_ready(jax.device_put(arr)); ts.append(time.perf_counter() - t0)
        print(f"device_put of a [4, 2048] int32 host array, {name}: median {np.median(ts) * 1e3:.3f} ms", flush=True)
    rt, apart, together = round_trip_ms()
    print(f"round trip of a tiny program {rt:.3f} ms; four ready 4-value arrays read one by one {apart:.3f} ms, by one "
          f"device_get {together:.3f} ms", flush=True)
    for group in (items[:1], items):
        for batched in (False, True):
            tl, total = admission_timeline(eng, group, batched)
            print(f"{len(group)} x {n} tokens, un-waited, {'batched read' if batched else 'read one by one'}: total "
                  f"{total:.3f} ms; " + ", ".join(f"{k} {v:.3f}" for k, v in tl.items()), flush=True)
        ts = []
        for _ in range(7):
            t0 = time.perf_counter(); eng._run_admit_group(group); ts.append(time.perf_counter() - t0)
        print(f"{len(group)} x {n} tokens, the engine's admission (_run_admit_group): median "
              f"{np.median(ts[1:]) * 1e3:.3f} ms, min {min(ts[1:]) * 1e3:.3f} ms of 6", flush=True)
    if on_gpu:
        # one prefill call alone under the profiler: the gaps between its kernels (the GPU waiting for the host
        # to launch the next one) are its span less its busy time
        b = next(x for x in eng.buckets if x >= n)
        tokens, positions, last, _ = eng._group_inputs(items[:1], b, 4)
        for _ in range(2):
            logits, eng.small_groups[4] = eng._prefill_group[4](eng.sm.leaves, tokens, positions,
                                                                 eng.small_groups[4], last)
            jax.block_until_ready(logits)
        d = tempfile.mkdtemp()
        with jax.profiler.trace(d):
            t0 = time.perf_counter()
            logits, eng.small_groups[4] = eng._prefill_group[4](eng.sm.leaves, tokens, positions,
                                                                 eng.small_groups[4], last)
            jax.block_until_ready(logits)
            wall = time.perf_counter() - t0
        ks = gpu_kernels(d)
        busy = sum(e["dur"] for e in ks)
        gaps = sorted((b_["ts"] - (a["ts"] + a["dur"]), a["name"][:50]) for a, b_ in zip(ks, ks[1:]))[::-1]
        print(f"one grouped-prefill call of 1 x {n} tokens under the profiler: {len(ks)} GPU events, busy {busy:.0f} "
              f"us, first start to last end {ks[-1]['ts'] + ks[-1]['dur'] - ks[0]['ts']:.0f} us, host wall "
              f"{wall * 1e6:.0f} us; largest gaps: " + ", ".join(f"{g:.0f} us after {nm}" for g, nm in gaps[:6]),
              flush=True)
        # where the host spends the call's launch: its spans from the call to the first kernel's start
        hs = [e for e in host_events(d) if e["ts"] < ks[0]["ts"] + 50 and e["dur"] >= 20]
        t_first = min(e["ts"] for e in hs) if hs else 0
        print(f"host spans >= 20 us up to the first kernel (+50 us), us from the first span: ", flush=True)
        for e in hs[:60]:
            print(f"  {e['ts'] - t_first:8.0f} {e['dur']:8.0f}  {e['tid_name'][:24]:24s} {e['name'][:90]}", flush=True)
        print(f"  first GPU event at {ks[0]['ts'] - t_first:.0f}: {ks[0]['name'][:60]}", flush=True)
    if on_gpu and "--no-profile" not in sys.argv:
        for group in (items[:1], items):
            d = tempfile.mkdtemp()
            with jax.profiler.trace(d):
                for _ in range(3):
                    eng._run_admit_group(group)
            ks = gpu_kernels(d)
            tot, cnt = collections.Counter(), collections.Counter()
            for e in ks:
                tot[e["name"][:70]] += e["dur"] / 3
                cnt[e["name"][:70]] += 1
            span = (ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]) / 3
            print(f"{len(group)} x {n} tokens under the profiler, per admission: GPU busy {sum(tot.values()):.0f} us, "
                  f"span {span:.0f} us (3 admissions back to back, host time between them included); largest:")
            for k, v in tot.most_common(25):
                print(f"  {v:9.1f} us  x{cnt[k] // 3:3d}  {k}", flush=True)
    sys.exit()

if mode == "buckets":
    n = 2000
    ids = [int(v) for v in np.random.RandomState(0).randint(0, cfg.vocab_size, n)]
    for buckets in ([32, 128, 512], None):
        eng = Engine(m, None, max_batch=1, max_seq_len=4096, prefill_buckets=buckets)
        w = eng.warmup()
        times = []
        for _ in range(9):
            t0 = time.perf_counter()
            eng._run_admit(ids, 0, np.uint32(0), np.float32(1), np.int32(0), np.float32(1))
            times.append(time.perf_counter() - t0)
        print(f"buckets {eng.buckets}: warm-up {w:.1f} s; admission of a {n}-token prompt (prefill, first token "
              f"sampled and read, row copied to its slot): median {np.median(times) * 1e3:.2f} ms, min "
              f"{min(times) * 1e3:.2f} ms over 9", flush=True)
        del eng
else:
    eng = Engine(m, None, max_batch=4, max_seq_len=4096, prefill_rows=4)
    print("buckets", eng.buckets, "warm-up", round(eng.warmup(), 1), "s", flush=True)
    rng = np.random.RandomState(0)
    copy_all, per_row = eng._copy, copies_apart(eng)

    def grouped_rows_apart(items):
        eng._copy = per_row
        try:
            return eng._run_admit_group(items)
        finally:
            eng._copy = copy_all

    for n in (100, 500, 2000):
        items = [([int(v) for v in rng.randint(0, cfg.vocab_size, n)], slot, np.uint32(slot), np.float32(0),
                  np.int32(0), np.float32(1)) for slot in range(4)]
        alone, grouped, row_copies = [], [], []
        grouped_rows_apart(items)  # compiles the one-row copy from the grouped cache
        for _ in range(7):
            t0 = time.perf_counter()
            outs_a = [eng._run_admit(*it) for it in items]
            alone.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            outs_g = eng._run_admit_group(items)
            grouped.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            grouped_rows_apart(items)
            row_copies.append(time.perf_counter() - t0)
        same = [int(a[0]) for a in outs_a] == [int(g[0]) for g in outs_g]
        print(f"4 prompts of {n} tokens: one call each {np.median(alone) * 1e3:.2f} ms, one grouped call "
              f"{np.median(grouped) * 1e3:.2f} ms, the same with one copy call per row {np.median(row_copies) * 1e3:.2f}"
              f" ms (medians of 7; first tokens equal: {same})", flush=True)
        for i, (a, g) in enumerate(zip(outs_a, outs_g)):  # greedy: a difference is a near-tie in bf16, or a bug
            if int(a[0]) != int(g[0]):
                print(f"   prompt {i}: alone {int(a[0])} (top logprobs {np.round(np.asarray(a[3][:3], float), 4)}), "
                      f"grouped {int(g[0])} (top logprobs {np.round(np.asarray(g[3][:3], float), 4)})", flush=True)
