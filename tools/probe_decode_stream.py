"""The host time a request's text costs the engine over a long generation: a full decode of its output at every flush
(before) against `DecodeStream` (the engine's now), the bundled model's tokenizer, a flush every 8 tokens (one
8-step decode call). A development tool:
    python tools/probe_decode_stream.py [TOKENS]"""
import sys, time
import numpy as np
from pathlib import Path
from mixjax.tokenizer import DecodeStream, Tokenizer

tok = Tokenizer(Path(__file__).resolve().parents[1] / "mixjax" / "default_model")
n = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
ids = np.random.RandomState(0).randint(0, tok.vocab_size, n).tolist()
for name in ("full decode at each flush", "DecodeStream"):
    best = float("inf")
    for _ in range(3):
        stream = DecodeStream(tok)
        t0 = time.perf_counter()
        for k in range(8, n + 1, 8):
            tok.decode(ids[:k]) if name.startswith("full") else stream.decode(ids[:k])
        best = min(best, time.perf_counter() - t0)
    print(f"{name}: {best * 1e3:.1f} ms for a {n}-token output ({n // 8} flushes); x128 requests: "
          f"{best * 128:.2f} s", flush=True)
