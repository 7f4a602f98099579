"""The HTTP front end alone: `mixjax.serve`'s app (FastAPI under uvicorn, as `python -m mixjax.serve` runs it) on a
stand-in engine that computes nothing. Every --call-ms it gives each running request --k tokens (as the engine's
decode calls do, one event per request per call, or with --per-token one event per token as before the eleventh
session), admitting waiting requests into --max-batch slots. So the server's and the load client's own costs show
apart from the device's. A development tool:
    python tools/probe_http_front.py --port 8793 --k 8 --call-ms 15 --max-batch 128 [--per-token] &
    python -m mixjax.bench.serve --url http://127.0.0.1:8793 --requests 384 --arrival bursty --burst 128 \\
        --rate 128 --prompt-len 128:512 --output-len 256:256 --vocab-hi 150000
The stand-in's ceiling is max_batch * k tokens every call_ms (128 * 8 / 15 ms = 68k tokens/s); it prints, at the
end, the engine-side time to first token (submit to first event) and its calls' lateness."""
import argparse, collections, signal, sys, threading, time
import numpy as np
import uvicorn
from mixjax.serve.__main__ import GIL_SWITCH_MS, set_gil_switch
from mixjax.serve.api import Server, build_app
from mixjax.serve.metrics import Metrics


class StandInEngine:
    def __init__(self, max_batch: int, k: int, call_ms: float, per_token: bool, vocab: int = 151936,
                 max_seq_len: int = 4096):
        self.max_batch, self.k, self.call_s, self.per_token = max_batch, k, call_ms / 1e3, per_token
        self.vocab, self.max_seq_len, self.tok, self.failed = vocab, max_seq_len, None, None
        self.metrics = Metrics()
        self._lock = threading.Condition()
        self._waiting, self._active = collections.deque(), []
        self.ttft, self.late = [], []

    @property
    def running(self):
        return len(self._active)

    @property
    def queue_length(self):
        return len(self._waiting)

    def submit(self, r):
        r.t_in = time.perf_counter()
        with self._lock:
            self._waiting.append(r)
            self._lock.notify()
        return r

    def cancel(self, r):
        r.cancelled = True

    def _send(self, r, n):
        ids = [7] * n
        events = [ids] if not self.per_token else [[t] for t in ids]
        for e in events:
            r.emit({"type": "token", "text": "", "ids": e, "logprobs": [0.0] * len(e), "top": [[]] * len(e)})
        r.out_ids.extend(ids)

    def loop(self):
        t_next = time.perf_counter()
        while True:
            with self._lock:
                while not self._waiting and not self._active:
                    self._lock.wait()
                    t_next = time.perf_counter()
                while self._waiting and len(self._active) < self.max_batch:
                    self._active.append(self._waiting.popleft())
            now = time.perf_counter()
            self.late.append(now - t_next)
            for r in list(self._active):
                if r.cancelled or len(r.out_ids) >= r.params.max_tokens:
                    self._active.remove(r)
                    r.emit({"type": "done", "finish_reason": "length", "prompt_tokens": len(r.prompt_ids),
                            "completion_tokens": len(r.out_ids)})
                    continue
                if not r.out_ids:  # the prefill's token
                    self.ttft.append(now - r.t_in)
                    self._send(r, 1)
                else:
                    self._send(r, min(self.k, r.params.max_tokens - len(r.out_ids)))
            t_next += self.call_s
            time.sleep(max(0.0, t_next - time.perf_counter()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8793)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--call-ms", type=float, default=15.0)
    ap.add_argument("--max-batch", type=int, default=128)
    ap.add_argument("--per-token", action="store_true")
    ap.add_argument("--http", default="auto", help="uvicorn's HTTP parser: auto, h11 or httptools")
    ap.add_argument("--loop", default="auto", help="uvicorn's event loop: auto, asyncio or uvloop")
    ap.add_argument("--gil-switch-ms", type=float, default=GIL_SWITCH_MS,
                    help=f"Python's thread switch interval, ms (the server's default {GIL_SWITCH_MS:g}; Python's 5)")
    a = ap.parse_args()
    set_gil_switch(a.gil_switch_ms)
    eng = StandInEngine(a.max_batch, a.k, a.call_ms, a.per_token)
    threading.Thread(target=eng.loop, daemon=True).start()
    app = build_app(Server(eng, "stand-in"), eng)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=a.port, log_level="warning", http=a.http,
                                           loop=a.loop))

    def report(*_):
        t, late = np.array(eng.ttft) * 1e3, np.array(eng.late) * 1e3
        if len(t):
            print(f"stand-in engine: {len(t)} requests, time to first token from submit p50 {np.percentile(t, 50):.1f}"
                  f" p90 {np.percentile(t, 90):.1f} max {t.max():.1f} ms; calls late p50 {np.percentile(late, 50):.2f}"
                  f" p99 {np.percentile(late, 99):.2f} ms", flush=True)
        server.should_exit = True
    signal.signal(signal.SIGTERM, report)
    signal.signal(signal.SIGINT, report)
    print("stand-in ready", flush=True)
    server.run()
    sys.exit(0)


if __name__ == "__main__":
    main()
