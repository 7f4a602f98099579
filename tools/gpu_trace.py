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
