"""Load generator for an OpenAI-compatible server: TTFT, inter-token latency and throughput percentiles.

    python -m mixjax.bench.serve --url http://127.0.0.1:8000 --rate 4 --requests 64 \
        [--arrival poisson|bursty] [--prompt-len 32:128] [--output-len 16:64] [--json out.json]

Requests are streamed completions (`/v1/completions`, `stream: true`, `ignore_eos: true` so every request
generates its drawn output length). Arrivals: `poisson` (exponential gaps at --rate requests/s) or `bursty`
(bursts of --burst requests at once, bursts spaced so the mean rate is --rate). Prompt and output lengths are
drawn uniformly from LO:HI (tokens; prompts are token ids in [--vocab-lo, --vocab-hi)). TTFT is the time from
sending a request to its first streamed token; ITL the gaps between later tokens; TPOT each request's mean gap;
stall each request's longest gap (its pause behind other requests' prefills); throughput the generated tokens over
the whole run. The requests are shared by --processes client processes (default: half the cores, at
most 8), each with its own event loop and its share of every burst.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import queue
import time
from collections import Counter

import httpx
import numpy as np
from tqdm.auto import tqdm


CLIENT_SHARE = 16  # requests per connection pool (see run)


def draw_len(spec: str, rng: np.random.Generator) -> int:
    lo, _, hi = spec.partition(":")
    lo, hi = int(lo), int(hi or lo)
    return int(rng.integers(lo, hi + 1))


def arrival_times(n: int, rate: float, mode: str, burst: int, rng: np.random.Generator) -> np.ndarray:
    if mode == "poisson":
        return np.cumsum(rng.exponential(1.0 / rate, n)) - 1.0 / rate
    if mode == "bursty":
        return np.array([(i // burst) * burst / rate for i in range(n)])
    raise ValueError(f"unknown arrival mode {mode!r}")


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True}
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            return {"status": resp.status_code, "ttft": None, "itl": [], "tokens": 0}
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choice = chunk["choices"][0]
            n = len(choice.get("token_ids") or []) or (1 if choice.get("text") else 0)
            stamps.extend([time.perf_counter()] * n)
    if not stamps:
        return {"status": 200, "ttft": None, "itl": [], "tokens": 0}
    return {"status": 200, "ttft": stamps[0] - t0, "itl": list(np.diff(stamps)), "tokens": len(stamps)}


def workload(args) -> tuple[np.ndarray, list[tuple[list[int], int]]]:
    """The run's requests from its options and seed: each one's start (s from the run's start) and its (prompt
    token ids, output length)."""
    rng = np.random.default_rng(args.seed)
    starts = arrival_times(args.requests, args.rate, args.arrival, args.burst, rng)
    work = [([int(t) for t in rng.integers(args.vocab_lo, args.vocab_hi, draw_len(args.prompt_len, rng))],
             draw_len(args.output_len, rng)) for _ in range(args.requests)]
    return starts, work


async def run_share(args, model: str, indices, t_begin: float, on_done) -> tuple[dict, float]:
    """Send the requests `indices` of the workload at their start times after `t_begin` (time.time()), calling
    on_done() as each finishes. Returns their results by index and the time.time() when the last finished."""
    starts, work = workload(args)
    indices = list(indices)
    # One connection pool per CLIENT_SHARE requests, not one for all: httpcore's pool walks every connection of the
    # pool on each request's and response's turn, so one pool of n connections costs O(n^2) (384 streams against
    # the stand-in engine of tools/probe_http_front.py, under cProfile: 10.2 of the client's 17.9 s there; it
    # saturated a core and delivered 8.5k tokens/s where the load allowed ~39k).
    async with contextlib.AsyncExitStack() as stack:
        ssl = httpx.create_ssl_context()  # one for all pools: each pool making its own took ~34 ms of CPU
        pools = [await stack.enter_async_context(httpx.AsyncClient(
            timeout=args.timeout, limits=httpx.Limits(max_connections=CLIENT_SHARE), verify=ssl))
            for _ in range(0, len(indices), CLIENT_SHARE)]

        async def launch(j, i):
            await asyncio.sleep(max(0.0, t_begin + starts[i] - time.time()))
            try:
                r = await one_request(pools[j // CLIENT_SHARE], args.url, model, *work[i])
            except httpx.HTTPError as e:
                r = {"status": type(e).__name__, "ttft": None, "itl": [], "tokens": 0}
            on_done()
            return r

        results = await asyncio.gather(*(launch(j, i) for j, i in enumerate(indices)))
    return dict(zip(indices, results)), time.time()


def _process_share(args, model, w, n, q, start_q):
    """One client process's share: requests w, w + n, w + 2n, ... (so each process takes part of every burst),
    from the common start that the parent sends once every process is up."""
    try:
        q.put(("ready", None))
        t_begin = start_q.get()
        results, t_end = asyncio.run(run_share(args, model, range(w, args.requests, n), t_begin,
                                               lambda: q.put(("done", None))))
        q.put(("results", (results, t_end)))
    except BaseException as e:  # the parent must not wait forever for this share
        q.put(("failed", f"{type(e).__name__}: {e}"))


def client_processes(spec: str | int) -> int:
    """--processes: a count, or "auto": half the host's cores, at most 8 (the server needs cores of its own)."""
    if spec == "auto":
        return max(1, min(8, (os.cpu_count() or 2) // 2))
    try:
        n = int(spec)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a count of at least 1, got {spec!r}")
    return n


def run_processes(args, model: str, n: int, on_done) -> tuple[dict, float, float]:
    """The requests shared by n client processes, each with its own event loop, as many users' clients would be:
    one Python loop sending a burst of 128 requests serialises their sends, and each one's wait counts in its TTFT.
    Spawned, not forked: the caller may hold threads (a JAX backend in tests) that a fork would copy mid-work.
    Returns the results by index, the common start and the last end (time.time())."""
    ctx = multiprocessing.get_context("spawn")
    q, start_q = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_process_share, args=(args, model, w, n, q, start_q), daemon=True) for w in range(n)]
    for p in procs:
        p.start()
    results, t_begin, t_end, left, ready = {}, None, 0.0, n, 0
    try:
        while left:
            try:
                kind, value = q.get(timeout=1.0)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if not dead:
                    continue
                kind, value = "failed", f"exit code {dead[0]}"  # died without a word (killed, crashed)
            if kind == "ready":
                ready += 1
                if ready == n:  # every process is up (each imports this module): start all at once
                    t_begin = time.time() + 0.05
                    for _ in range(n):
                        start_q.put(t_begin)
            elif kind == "done":
                on_done()
            elif kind == "results":
                results.update(value[0])
                t_end, left = max(t_end, value[1]), left - 1
            else:
                raise RuntimeError(f"a client process failed: {value}")
    finally:
        for p in procs:
            if left:
                p.kill()
            p.join()
    return results, t_begin, t_end


def run(args) -> dict:
    model = args.model or httpx.get(f"{args.url}/v1/models", timeout=args.timeout).json()["data"][0]["id"]
    n = min(client_processes(args.processes), args.requests)
    bar = tqdm(total=args.requests, desc="requests")
    if n == 1:
        t_begin = time.time()
        results, t_end = asyncio.run(run_share(args, model, range(args.requests), t_begin, lambda: bar.update(1)))
    else:
        results, t_begin, t_end = run_processes(args, model, n, lambda: bar.update(1))
    bar.close()
    summary = report(args, [results[i] for i in range(args.requests)], t_end - t_begin)
    summary["client_processes"] = n
    return summary


def report(args, results: list[dict], wall: float) -> dict:
    """The run's summary from each request's result (status, ttft and itl in seconds, tokens)."""
    ok = [r for r in results if r["status"] == 200 and r["ttft"] is not None]
    ttft = np.array([r["ttft"] for r in ok]) * 1e3
    itl = np.array([x for r in ok for x in r["itl"]]) * 1e3
    tokens = sum(r["tokens"] for r in ok)
    # Per request, of those with two tokens or more: its longest pause between two tokens (a stall behind other
    # requests' prefills shows here, where the many short gaps of the ITL percentiles hide it), and its time per
    # output token after the first (TPOT: the decode pace it saw).
    longer = [r for r in ok if r["itl"]]
    stall = np.array([max(r["itl"]) for r in longer]) * 1e3
    tpot = np.array([sum(r["itl"]) / len(r["itl"]) for r in longer]) * 1e3

    def pct(a):
        return {f"p{p}": float(np.percentile(a, p)) for p in (50, 90, 99)} | {"mean": float(a.mean())} if len(a) else {}

    errors = Counter(str(r["status"]) for r in results if r["status"] != 200 or r["ttft"] is None)
    return {"requests": args.requests, "ok": len(ok), "errors": dict(errors),
            "rate": args.rate, "arrival": args.arrival, "wall_s": wall, "generated_tokens": tokens,
            "throughput_tok_s": tokens / wall, "ttft_ms": pct(ttft), "itl_ms": pct(itl),
            "tpot_ms": pct(tpot), "stall_ms": pct(stall)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="model id (default: the server's first)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rate", type=float, default=2.0, help="mean requests per second")
    ap.add_argument("--arrival", default="poisson", choices=["poisson", "bursty"])
    ap.add_argument("--burst", type=int, default=8)
    ap.add_argument("--prompt-len", default="16:64")
    ap.add_argument("--output-len", default="16:32")
    ap.add_argument("--vocab-lo", type=int, default=10)
    ap.add_argument("--vocab-hi", type=int, default=200)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--processes", default="auto", metavar="N", type=lambda v: v if v == "auto" else client_processes(v),
                    help="client processes sharing the requests (default auto: half the cores, at most 8)")
    ap.add_argument("--json", default=None, help="write the report here too")
    return ap.parse_args(argv)


def emit(summary: dict, path: str | None):
    """Print the summary, and write it to path too when given."""
    print(json.dumps(summary, indent=1), flush=True)
    if path:
        with open(path, "w") as f:
            json.dump(summary, f, indent=1)


def main(argv=None):
    args = parse_args(argv)
    try:
        summary = run(args)
    except httpx.HTTPError as e:
        raise SystemExit(f"error: cannot reach the server at {args.url}: {e}") from None
    emit(summary, args.json)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
