"""The GPU kernels of a JAX profiler trace, for the development tools in this folder (run as `python tools/X.py`,
which puts this folder on the import path)."""
import glob, gzip, json, os


def _load(trace_dir: str) -> tuple[list[dict], dict]:
    """The trace's events, and the names of its processes ((pid, None)) and threads ((pid, tid))."""
    path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
    ev = json.load(gzip.open(path))
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    names = {(e["pid"], e.get("tid")): e["args"]["name"] for e in ev
             if e.get("ph") == "M" and e.get("name") in ("thread_name", "process_name")}
    return ev, names


def gpu_kernels(trace_dir: str) -> list[dict]:
    """The trace's events on GPU streams (kernels and memory copies), sorted by start: each a perfetto "X" event
    with "ts" and "dur" in us, "name", and "args" (XLA puts the HLO op there)."""
    ev, names = _load(trace_dir)

    def on_gpu_stream(e):
        where = names.get((e["pid"], None), "") + "/" + names.get((e["pid"], e.get("tid")), "")
        return "/device:GPU" in where and "Stream" in where
    return sorted((e for e in ev if e.get("ph") == "X" and on_gpu_stream(e)), key=lambda e: e["ts"])


def host_events(trace_dir: str) -> list[dict]:
    """The trace's host-side events (TraceMe spans of the Python thread and of XLA's runtime threads), sorted by
    start, each with "tid_name" added: where a program's launch spends its time."""
    ev, names = _load(trace_dir)
    out = []
    for e in ev:
        if e.get("ph") == "X" and "/device:GPU" not in names.get((e.get("pid"), None), ""):
            out.append(dict(e, tid_name=names.get((e.get("pid"), e.get("tid")), "")))
    return sorted(out, key=lambda e: e["ts"])


def traced_calls(f, args, reps: int = 10, keep=None) -> tuple[object, list[list[dict]]]:
    """jit f, call it once, then trace `reps` calls: (the first call's output, each traced call's GPU kernels in
    order). `keep(name)` picks the kernels counted (default: all); every call must launch as many."""
    import tempfile
    import jax
    f = jax.jit(f)
    out = jax.block_until_ready(f(*args))
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d):
        for _ in range(reps):
            jax.block_until_ready(f(*args))
    ks = [e for e in gpu_kernels(d) if keep is None or keep(e["name"])]
    per = len(ks) // reps
    assert per * reps == len(ks), (len(ks), reps)
    return out, [ks[r * per:(r + 1) * per] for r in range(reps)]


def span_us(run: list[dict]) -> float:
    """From the first kernel's start to the last one's end, in us."""
    return run[-1]["ts"] + run[-1]["dur"] - run[0]["ts"]
