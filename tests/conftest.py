"""Shared test helpers. Tests run on 8 simulated CPU devices (the Makefile sets XLA_FLAGS)."""

import json
import socket
from pathlib import Path

import httpx
import jax.numpy as jnp
import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_dirs():
    return sorted(p for p in FIXTURES.iterdir() if (p / "reference.npz").is_file()) if FIXTURES.is_dir() else []


def reference(name):
    return dict(np.load(FIXTURES / name / "reference.npz"))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def interpreted_model(name: str, mesh: str = "1x1", strategy: str = "tp"):
    """A fixture's model on the Pallas path with the kernels interpreted (expert_impl="grouped-interpret"), its
    reference, and the reference prompt's tokens [B, T] and positions from 0."""
    from mixjax.sharding.mesh import make_mesh
    from mixjax.sharding.runner import load_sharded
    from mixjax.sharding.strategies import STRATEGIES

    ref = reference(name)
    model = load_sharded(FIXTURES / name, make_mesh(mesh), STRATEGIES[strategy], progress=False,
                         expert_impl="grouped-interpret")
    tokens = ref["input_ids"].astype(np.int32)
    b, t = tokens.shape
    return model, ref, tokens, np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))


def prefill_and_greedy(model, prompts: np.ndarray, n_new: int):
    """One prefill (full logits) and n_new greedy steps on a ShardedModel, with one cache shape, so that each
    (model, shapes) pair compiles once. prompts [B, T] int; B is padded up to the DP degree."""
    rows, t = prompts.shape
    b = -(-rows // model.dp_size) * model.dp_size
    tokens = np.zeros((b, t), np.int32)
    tokens[:rows] = prompts
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    cache = model.init_cache(b, t + n_new)
    logits, cache = model.forward(jnp.asarray(tokens), jnp.asarray(pos), cache)
    full = np.asarray(logits)[:rows, :, : model.vocab_size]
    nxt = np.asarray(logits)[:, -1, : model.vocab_size].argmax(-1)
    out = [nxt]
    for s in range(n_new - 1):
        p = np.full((b, 1), t + s, np.int32)
        logits, cache = model.forward(jnp.asarray(nxt[:, None].astype(np.int32)), jnp.asarray(p), cache)
        nxt = np.asarray(logits)[:, 0, : model.vocab_size].argmax(-1)
        out.append(nxt)
    return full, np.stack(out, axis=1)[:rows]


@pytest.fixture(scope="session")
def fixtures_available():
    if not fixture_dirs():
        pytest.fail("tests/fixtures is empty: run tools/make_fixtures.py")
    return fixture_dirs()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_across_sigterm(url: str, body: dict, send_sigterm) -> list[dict]:
    """Stream a completion, call send_sigterm() after the first chunk, read the stream to its end. Asserts that it
    ends with [DONE]; returns the choices of every chunk (a graceful stop lets in-flight streams finish)."""
    with httpx.stream("POST", url + "/v1/completions", json=dict(body, stream=True), timeout=120) as r:
        it = r.iter_lines()
        first = next(l for l in it if l.startswith("data:"))
        send_sigterm()
        rest = [l for l in it if l.startswith("data:")]
    assert first and rest[-1] == "data: [DONE]"
    return [json.loads(l[5:])["choices"][0] for l in [first] + rest[:-1]]
