"""Load generator for an OpenAI-compatible server: TTFT, inter-token latency and throughput percentiles.

    python -m mixjax.bench.serve --url http://127.0.0.1:8000 --rate 4 --requests 64 \
        [--arrival poisson|bursty] [--prompt-len 32:128] [--output-len 16:64] [--json out.json]

Requests are streamed completions (`/v1/completions`, `stream: true`, `ignore_eos: true` so every request
generates its drawn output length). Arrivals: `poisson` (exponential gaps at --rate requests/s) or `bursty`
(bursts of --burst requests at once, bursts spaced so the mean rate is --rate). Prompt and output lengths are
drawn uniformly from LO:HI (tokens; prompts are token ids in [--vocab-lo, --vocab-hi)). TTFT is the time from
sending a request to its first streamed token; ITL the gaps between later tokens; throughput the generated
tokens over the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
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


async def run(args) -> dict:
    starts, work = workload(args)
    # One connection pool per CLIENT_SHARE requests, not one for all: httpcore's pool walks every connection of the
    # pool on each request's and response's turn, so one pool of n connections costs O(n^2) (384 streams against
    # the stand-in engine of tools/probe_http_front.py, under cProfile: 10.2 of the client's 17.9 s there; it
    # saturated a core and delivered 8.5k tokens/s where the load allowed ~39k).
    async with contextlib.AsyncExitStack() as stack:
        pools = [await stack.enter_async_context(httpx.AsyncClient(
            timeout=args.timeout, limits=httpx.Limits(max_connections=CLIENT_SHARE)))
            for _ in range(0, args.requests, CLIENT_SHARE)]
        client = pools[0]
        model = args.model or (await client.get(f"{args.url}/v1/models")).json()["data"][0]["id"]
        bar = tqdm(total=args.requests, desc="requests")
        t_begin = time.perf_counter()

        async def launch(i):
            await asyncio.sleep(max(0.0, starts[i] - (time.perf_counter() - t_begin)))
            try:
                r = await one_request(pools[i // CLIENT_SHARE], args.url, model, *work[i])
            except httpx.HTTPError as e:
                r = {"status": type(e).__name__, "ttft": None, "itl": [], "tokens": 0}
            bar.update(1)
            return r

        results = await asyncio.gather(*(launch(i) for i in range(args.requests)))
        wall = time.perf_counter() - t_begin
        bar.close()
    return report(args, results, wall)


def report(args, results: list[dict], wall: float) -> dict:
    """The run's summary from each request's result (status, ttft and itl in seconds, tokens)."""
    ok = [r for r in results if r["status"] == 200 and r["ttft"] is not None]
    ttft = np.array([r["ttft"] for r in ok]) * 1e3
    itl = np.array([x for r in ok for x in r["itl"]]) * 1e3
    tokens = sum(r["tokens"] for r in ok)

    def pct(a):
        return {f"p{p}": float(np.percentile(a, p)) for p in (50, 90, 99)} | {"mean": float(a.mean())} if len(a) else {}

    errors = Counter(str(r["status"]) for r in results if r["status"] != 200 or r["ttft"] is None)
    return {"requests": args.requests, "ok": len(ok), "errors": dict(errors),
            "rate": args.rate, "arrival": args.arrival, "wall_s": wall, "generated_tokens": tokens,
            "throughput_tok_s": tokens / wall, "ttft_ms": pct(ttft), "itl_ms": pct(itl)}


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
    summary = asyncio.run(run(args))
    emit(summary, args.json)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
