"""The engine thread's host time to hand out one decode call's tokens (`Engine._collect`): 128 running requests, 8
steps per call, random tokens, no device (the call's outputs are numpy arrays), with and without the bundled
tokenizer's text. A development tool:
    python tools/probe_collect.py [--rows 128] [--k 8] [--calls 64]"""
import argparse, time
from pathlib import Path
import numpy as np
from mixjax.serve.engine import Engine, Request, SamplingParams, _Inflight
from mixjax.serve.metrics import Metrics
from mixjax.tokenizer import Tokenizer

ap = argparse.ArgumentParser()
ap.add_argument("--rows", type=int, default=128); ap.add_argument("--k", type=int, default=8)
ap.add_argument("--calls", type=int, default=64)
a = ap.parse_args()
tok = Tokenizer(Path(__file__).resolve().parents[1] / "mixjax" / "default_model")


def median_ms(with_text: bool, logprobs=None) -> float:
    eng = Engine.__new__(Engine)  # the bookkeeping only: no model, no device
    eng.tok, eng.metrics, eng.eos_ids, eng.max_seq_len, eng._active = tok if with_text else None, Metrics(), set(), \
        10 ** 6, {}
    for s in range(a.rows):
        r = Request([1, 2, 3], SamplingParams(max_tokens=10 ** 6, ignore_eos=True, logprobs=logprobs), lambda ev: None)
        r.slot = s
        eng._active[s] = r
    rng, times = np.random.RandomState(0), []
    for _ in range(a.calls):
        out = (rng.randint(3, tok.vocab_size, (a.k, a.rows)).astype(np.int32), np.zeros((a.k, a.rows), np.float32),
               np.zeros((a.k, a.rows, 5), np.int32), np.zeros((a.k, a.rows, 5), np.float32))
        t0 = time.perf_counter()
        eng._collect(_Inflight(out, dict(eng._active), a.k))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


for name, kw in (("no text", dict(with_text=False)), ("text", dict(with_text=True)),
                 ("text and 2 logprobs", dict(with_text=True, logprobs=2))):
    print(f"{name}: {median_ms(**kw):.2f} ms per call of {a.rows} rows x {a.k} steps (median of {a.calls})", flush=True)
