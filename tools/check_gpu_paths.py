"""On a GPU: the bf16 Pallas/cuDNN paths (expert_impl="grouped") and the bf16 XLA paths ("dense"), each against a
float32 XLA run of the same bench model (same weights): a whole 512-token prompt (cuDNN attention), the same prompt
in two chunks (Triton flash attention for the second), and decode steps (grouped experts). Prints each one's largest
logit difference relative to the largest float32 logit, the same per row (median, 90th percentile, share of rows over
5e-2: one row whose routing flipped at a near-tie makes the largest difference) and the argmax agreement: the Pallas
paths should be no further from float32 than XLA's.
    python tools/check_gpu_paths.py [BATCH] [--preset deepseek-v3 --layers 1] [--prompt T] [--save F.npz] [--xla P]
BATCH: default 2; 1 takes the batch-1 gemv kernels in the decode steps. DeepSeek-V3 prompts take cuDNN (whole) and
the MLA flash kernel (second chunk). --interpret runs the Pallas path's kernels interpreted (any backend: on the CPU,
JAX_PLATFORMS=cpu, with a short --prompt and a small --vocab), the same comparison without the GPU's kernels."""
import argparse
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from mixjax.bench.decode import bench_config, bench_model, decode_vocab
from mixjax.sharding.mesh import make_mesh
from mixjax.sharding.runner import ShardedModel
from mixjax.sharding.strategies import STRATEGIES

ap = argparse.ArgumentParser(); ap.add_argument("batch", nargs="?", type=int, default=2)
ap.add_argument("--preset", default="qwen3-30b-a3b"); ap.add_argument("--layers", type=int, default=2)
ap.add_argument("--save", help="also write each path's per-row differences (and argmax agreement) to this .npz")
ap.add_argument("--prompt", type=int, default=512, help="prompt tokens (a multiple of 32: two chunks)")
ap.add_argument("--vocab", type=int, default=None); ap.add_argument("--interpret", action="store_true")
ap.add_argument("--xla", default="", help="parts of the grouped path run by XLA instead, to find which part makes a "
                "difference: comma-separated from prompt-attention (XLA's attend for prompts, not cuDNN / the flash "
                "kernel), norm-rope (the prompt's q/k norm and RoPE), experts (XLA's dense experts, every step)")
a = ap.parse_args()
import mixjax.models.layers as layers_mod, mixjax.models.qwen3_moe as qwen3_mod  # noqa: E401,E402
for part in filter(None, a.xla.split(",")):  # patched before anything is traced
    if part == "prompt-attention":
        qwen3_mod.tiles_for = lambda *_, **__: None
    elif part == "norm-rope":
        qwen3_mod.norm_rope_supported = lambda *_, **__: False
    elif part == "experts":
        layers_mod.choose_blocks = lambda *_, **__: None
    else:
        ap.error(f"--xla: unknown part {part!r}")
cfg = bench_config(a.preset, a.layers, decode_vocab(a.preset, a.vocab))
w = nnx.state(bench_model(cfg))
t, b = a.prompt, a.batch
grouped = "grouped-interpret" if a.interpret else "grouped"
tok = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (b, t)), jnp.int32)
pos = jnp.asarray(np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)))
res = {}
fed = []  # the float32 run's argmax tokens, which every path is fed at its decode steps
w32 = jax.tree.map(lambda a: a.astype(jnp.float32), w)
for impl, dt, ws in (("f32", jnp.float32, w32), ("dense", jnp.bfloat16, w), ("grouped", jnp.bfloat16, w)):
    m = ShardedModel(cfg, make_mesh("1x1"), STRATEGIES["tp"], dtype=dt,
                     expert_impl={"f32": "dense", "grouped": grouped}.get(impl, impl)).set_state(ws)
    whole, _ = m.forward(tok, pos, m.init_cache(b, t + 64), fresh=True)
    cache = m.init_cache(b, t + 64)
    _, cache = m.forward(tok[:, :t // 2], pos[:, :t // 2], cache)
    second, cache = m.forward(tok[:, t // 2:], pos[:, t // 2:], cache)
    steps = []
    nxt = second[:, -1].argmax(-1).astype(jnp.int32)
    for s in range(8 if b == 1 else 4):
        if impl == "f32":
            fed.append(nxt)
        lg, cache = m.forward(fed[s][:, None], jnp.full((b, 1), t + s, jnp.int32), cache)
        steps.append(lg[:, 0]); nxt = lg[:, 0].argmax(-1).astype(jnp.int32)
    res[impl] = (np.asarray(whole, np.float32), np.asarray(second, np.float32),
                 np.stack([np.asarray(x, np.float32) for x in steps]))
saved = {}
pallas = "bf16 Pallas interpreted (grouped)" if a.interpret else "bf16 Pallas/cuDNN (grouped)"
for name, r, d, g in zip(("whole prompt", "second chunk", "decode steps"), res["f32"], res["dense"], res["grouped"]):
    for label, x in (("bf16 XLA (dense)", d), (pallas, g)):
        rel = np.abs(x - r).max() / np.abs(r).max()
        # per row (and step): one routing decision flipped by a rounding (an expert swapped for a near-tied one)
        # moves a row's logits far more than rounding does, so the largest difference can be one row's; the
        # median row's says how far the path's rounding takes a typical row
        per_row = np.abs(x - r).max(-1) / np.abs(r).max(-1)
        saved[f"{name}|{label}"] = per_row
        saved[f"{name}|{label}|argmax"] = x.argmax(-1) == r.argmax(-1)
        print(f"{name}, {label} vs float32 XLA: max |diff| / max |logit| = {rel:.2e}; "
              f"per row: median {np.median(per_row):.2e}, 90th percentile {np.percentile(per_row, 90):.2e}, "
              f"over 5e-2 {(per_row > 5e-2).mean():.1%}; argmax agreement {(x.argmax(-1) == r.argmax(-1)).mean():.1%}",
              flush=True)
if a.save:
    np.savez(a.save, **saved)
