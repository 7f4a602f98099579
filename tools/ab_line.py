"""One line of tools/gpu_serve_ab.sh: a load run's report (bench.serve's --json) and, from the server's /metrics
before and after the run, how many of the engine's own inter-token gaps in the run were over 0.1 s and over 0.25 s
(a stall that the client sees but the engine does not is in the HTTP layer or the client), and the server's
garbage collections in the run: their total time and how many took over 0.1 s.
    python tools/ab_line.py REPORT.json VARIANT ROUND METRICS_BEFORE METRICS_AFTER"""
import json
import sys

ITL = "mixjax_inter_token_latency_seconds"
GC = "mixjax_gc_pause_seconds"


def histogram(path: str, name: str) -> dict[str, float]:
    """A cumulative histogram of /metrics: {le: count, ..., "sum": seconds}."""
    out = {}
    for line in open(path):
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[le] = int(float(line.rsplit(" ", 1)[1]))
        elif line.startswith(name + "_sum "):
            out["sum"] = float(line.rsplit(" ", 1)[1])
    return out


def over(before: dict, after: dict, le: str):
    """Observations above le in the run, or "?" where a histogram could not be read."""
    if le not in before or le not in after:
        return "?"
    return (after["+Inf"] - after[le]) - (before["+Inf"] - before[le])


report, variant, rnd, before, after = sys.argv[1:6]
d = json.load(open(report))
t, s = d["ttft_ms"], d.get("stall_ms") or {}
itl = histogram(before, ITL), histogram(after, ITL)
gcs = histogram(before, GC), histogram(after, GC)
gc_s = round(gcs[1]["sum"] - gcs[0]["sum"], 3) if "sum" in gcs[0] and "sum" in gcs[1] else "?"
print(variant, rnd, round(d["throughput_tok_s"]), *(round(t[p]) for p in ("p50", "p90", "p99")),
      "| stall", *(round(s[p]) for p in ("p50", "p90", "p99") if p in s),
      "| engine gaps >0.1s", over(*itl, "0.1"), ">0.25s", over(*itl, "0.25"),
      "| gc", gc_s, "s, >0.1s", over(*gcs, "0.1"),
      "" if not d["errors"] else f"errors {d['errors']}")
