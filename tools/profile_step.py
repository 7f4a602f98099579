"""Per-kernel GPU time of one bench decode step (or prefill), from a JAX profiler trace (perfetto JSON).
A development tool: python tools/profile_step.py BATCH[,BATCH..] [--prefill T] [--impl grouped] [--explain]
[--hlo-out PATH] [--each NAME].
--explain dumps the optimized HLO and names, under each kernel, the JAX operations (source lines) it was fused from."""
import argparse, collections, functools, glob, os, re, sys, tempfile
DUMP = tempfile.mkdtemp() if "--explain" in sys.argv or "--hlo-out" in sys.argv else None
if DUMP:  # before jax is imported
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP} --xla_dump_hlo_as_text"
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from mixjax.bench.decode import bench_config, bench_model, decode_vocab
from mixjax.sharding.mesh import make_mesh
from mixjax.sharding.runner import ShardedModel
from mixjax.sharding.strategies import STRATEGIES
from gpu_trace import gpu_kernels

ap = argparse.ArgumentParser(); ap.add_argument("batch"); ap.add_argument("--prefill", type=int, default=0)
ap.add_argument("--impl", default="grouped"); ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--ctx", type=int, default=1024); ap.add_argument("--top", type=int, default=25)
ap.add_argument("--gaps", type=int, default=0, help="list the N longest idle gaps between GPU events");
ap.add_argument("--each", help="list each call (in order, median over the profiled steps) of the kernels whose "
                "name holds this text, e.g. mosaic: the Hopper expert kernels A and B of each layer")
ap.add_argument("--explain", action="store_true"); ap.add_argument("--preset", default="qwen3-30b-a3b")
ap.add_argument("--hlo-out", help="also keep the forward's optimized HLO in this file")
ap.add_argument("--sample", type=float, default=None,
                help="decode: also sample each row at this temperature as the engine does (seeded draw, logprob)")
a = ap.parse_args()
cfg = bench_config(a.preset, a.layers, decode_vocab(a.preset, None))
m = ShardedModel(cfg, make_mesh("1x1"), STRATEGIES["tp"], dtype=jnp.bfloat16, expert_impl=a.impl)
m.set_state(nnx.state(bench_model(cfg)))


def _frames(text):
    """stack_frame_id -> 'file.py:line function' of its innermost frame in mixjax (the HLO dump's frame tables)."""
    sec = lambda name: re.search(rf"^{name}\n(.*?)\n\n", text, re.M | re.S)
    files = dict(re.findall(r'^(\d+) "(.*)"$', sec("FileNames").group(1), re.M)) if sec("FileNames") else {}
    funcs = dict(re.findall(r'^(\d+) "(.*)"$', sec("FunctionNames").group(1), re.M)) if sec("FunctionNames") else {}
    locs = {i: (f, fn, ln) for i, f, fn, ln in re.findall(
        r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", sec("FileLocations").group(1), re.M)} \
        if sec("FileLocations") else {}
    frames = dict((i, (l, p)) for i, l, p in re.findall(
        r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)", sec("StackFrames").group(1), re.M)) \
        if sec("StackFrames") else {}

    def name(fid):
        seen = set()
        while fid in frames and fid not in seen:
            seen.add(fid)
            loc, parent = frames[fid]
            f, fn, ln = locs.get(loc, ("", "", "0"))
            path = files.get(f, "")
            if "/mixjax/" in path:
                return f"{path.split('/mixjax/')[-1]}:{ln} {funcs.get(fn, '')}"
            fid = parent
        return ""
    return name


def explain(tot, top):
    """For each of the top kernels: the JAX operations fused into it and the mixjax source lines they come from,
    from the largest optimized module that defines it (kernel names are fusion names; the forward is the largest)."""
    mods = sorted(glob.glob(os.path.join(DUMP, "*after_optimizations.txt")), key=os.path.getsize, reverse=True)
    texts = [open(f).read() for f in mods]
    frame_names = [_frames(t) for t in texts]
    hlos = [{n.replace(".", "_").replace("-", "_"): n for n in re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = ", t, re.M)}
            for t in texts]
    print("  -- what the kernels are (op names; mixjax source lines) --")
    for name, us in tot.most_common(top):
        kern = re.sub(r"__\d+$", "", name.split(" [")[0])  # kernel names spell the HLO's '.' as '_'
        for text, frame, hlo in zip(texts, frame_names, hlos):
            if kern not in hlo:
                continue
            m = re.search(rf"^\s*(ROOT )?%{re.escape(hlo[kern])} = [^\n]*", text, re.M)
            line = m.group(0)
            c = re.search(r"calls=%?([\w.\-]+)", line)
            body = re.search(rf"^%?{re.escape(c.group(1))} [^\n]*\{{\n(.*?)^\}}", text, re.M | re.S) if c else None
            chunk = (body.group(1) if body else "") + line
            ops = sorted({o.split("/")[-1] for o in re.findall(r'op_name="([^"]+)"', chunk)})
            srcs = collections.Counter(frame(i) for i in re.findall(r"stack_frame_id=(\d+)", chunk))
            srcs.pop("", None)
            print(f"  {us:8.1f} us  {kern}: {', '.join(ops[:8])}")
            for src, _ in srcs.most_common(3):
                print(f"               {src}")
            break


def _step_and_sample(fwd, leaves, tok, pos, cache, *, temp):
    """One decode step and the engine's sampling (mixjax.serve.engine's pick without the top logprobs)."""
    from mixjax.sampling import sample
    logits, cache = fwd(leaves, tok, pos, cache)
    n = tok.shape[0]
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(jnp.arange(n), jnp.zeros(n, jnp.int32))
    ids, lp = sample(logits[:, 0, :cfg.vocab_size], keys, jnp.full((n,), temp, jnp.float32),
                     jnp.zeros(n, jnp.int32), jnp.ones(n, jnp.float32), draw=temp > 0, filter=False)
    return (ids, lp), cache


for b in map(int, a.batch.split(",")):
    t = a.prefill or 1
    ctx = a.prefill or a.ctx
    # random tokens, as bench.decode's prompts: one token repeated would route every row to the same few experts
    tok = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (b, t)), jnp.int32)
    pos = jnp.asarray(np.broadcast_to(np.arange(ctx - t, ctx, dtype=np.int32), (b, t)))
    cache = m.init_cache(b, ctx)
    run = (lambda c: m.forward_last(tok, pos, c, jnp.full((b,), t - 1, jnp.int32), fresh=True)) if a.prefill else \
          (lambda c: m.forward(tok, pos, c))
    if a.sample is not None and not a.prefill:  # the engine's decode program: forward, then its sampling
        step = jax.jit(functools.partial(_step_and_sample, m._forward, temp=a.sample), donate_argnums=3)
        run = lambda c, step=step, tok=tok, pos=pos: step(m.leaves, tok, pos, c)
    for _ in range(3):
        lg, cache = run(cache)
    jax.block_until_ready(lg)
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(5):
            lg, cache = run(cache)
        jax.block_until_ready(lg)
    evs = gpu_kernels(d)  # the trace parsed once: the totals, --gaps and --each read it
    tot = collections.Counter(); cnt = collections.Counter(); gpu_total = 0.0; t_lo, t_hi = 1e30, 0
    for e in evs:
        t_lo = min(t_lo, e["ts"]); t_hi = max(t_hi, e["ts"] + e["dur"])
        key = e["name"]
        hlo = (e.get("args") or {}).get("hlo_op") or (e.get("args") or {}).get("long_name")
        if hlo and hlo not in key:
            key = f"{key} [{str(hlo)[:60]}]"
        tot[key] += e["dur"] / 5; cnt[key] += 1; gpu_total += e["dur"] / 5
    if not gpu_total:
        print("no GPU kernels in the trace")
    print(f"== batch {b} {'prefill ' + str(t) if a.prefill else 'decode'}: GPU kernel time per step {gpu_total:.0f} us, span {(t_hi - t_lo) / 5:.0f} us, {sum(cnt.values())//5} kernels")
    for n_, us in tot.most_common(a.top):
        print(f"  {us:8.1f} us  x{cnt[n_]//5:3d}  {n_[:110]}")
    if a.gaps:
        gaps = sorted(((nxt["ts"] - (cur["ts"] + cur["dur"]), i, cur["name"], nxt["name"])
                       for i, (cur, nxt) in enumerate(zip(evs, evs[1:]))), reverse=True)
        idle = sum(g for g, *_ in gaps if g > 0)
        print(f"  -- idle GPU time between events: {idle / 5:.0f} us per step; the {a.gaps} longest gaps "
              f"(event index of {len(evs)}) --")
        for g, i, before, after in gaps[:a.gaps]:
            print(f"  {g:8.1f} us  #{i:4d}  after {before[:50]}  before {after[:50]}")
    if a.each:
        durs = [e["dur"] for e in evs if a.each in e["name"]]
        per = len(durs) // 5
        if per:
            calls = np.median(np.reshape(durs[:per * 5], (5, per)), axis=0)
            print(f"  -- each call of the kernels named *{a.each}*, in order (median of 5 steps) --")
            print("  " + "  ".join(f"{u:.1f}" for u in calls) + " us")
    if a.explain:
        explain(tot, a.top)
    if a.hlo_out:  # the forward's optimized HLO: the largest module
        import shutil
        mods = sorted(glob.glob(os.path.join(DUMP, "*after_optimizations.txt")), key=os.path.getsize)
        shutil.copy(mods[-1], a.hlo_out)
