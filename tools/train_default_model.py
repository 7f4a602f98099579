"""Train the embedded default model (mixjax/default_model): a tiny Qwen3-MoE on the generated corpus of
tools/make_corpus.py, with optax AdamW on CPU, written as a Hugging Face checkpoint with its tokenizer.

    .venv/bin/python tools/train_default_model.py [--steps 1500] [--out mixjax/default_model]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).parent))
from make_corpus import corpus  # noqa: E402

from mixjax.export import save_hf_checkpoint  # noqa: E402
from mixjax.models.qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402
from mixjax.sharding.strategies import ParallelContext, Strategy  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# One device, no collectives: every axis group is empty.
SINGLE = ParallelContext(Strategy("single", (), (), (), ()), (("node", 1), ("gpu", 1)))


def train_tokenizer(docs, vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def hf_config(cfg: Qwen3MoeConfig, eos: int) -> dict:
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "moe_intermediate_size": cfg.moe_intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim, "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
            "norm_topk_prob": cfg.norm_topk_prob, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
            "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": True,
            "bos_token_id": eos, "eos_token_id": eos, "hidden_act": "silu", "torch_dtype": "float16"}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent.parent / "mixjax" / "default_model"))
    args = ap.parse_args(argv)

    docs = corpus()
    tok = train_tokenizer(docs, vocab=512)
    eos = tok.token_to_id("<|endoftext|>")
    ids = np.concatenate([np.array(tok.encode(d).ids + [eos], np.int32) for d in docs])
    print(f"corpus: {len(docs)} documents, {len(ids)} tokens")

    cfg = Qwen3MoeConfig(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=96,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                         num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                         mlp_only_layers=(), rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                         max_position_embeddings=512, tie_word_embeddings=True)
    model = Qwen3MoeForCausalLM(cfg, rngs=nnx.Rngs(0))
    warmup = min(100, args.steps // 2)
    sched = optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup, max(args.steps, warmup + 1), 3e-4)
    opt = nnx.Optimizer(model, optax.adamw(sched, weight_decay=0.01), wrt=nnx.Param)
    positions = jnp.broadcast_to(jnp.arange(args.seq, dtype=jnp.int32), (args.batch, args.seq))

    def loss_fn(m, x, y):
        cache = [{"k": jnp.zeros((args.batch, args.seq, 2, 32)), "v": jnp.zeros((args.batch, args.seq, 2, 32))}
                 for _ in range(cfg.num_hidden_layers)]
        logits, _ = m(x, positions, cache, SINGLE)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @nnx.jit
    def step(m, o, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(m, x, y)
        o.update(m, grads)
        return loss

    rng = np.random.default_rng(0)
    t0 = time.time()
    for i in range(args.steps):
        starts = rng.integers(0, len(ids) - args.seq - 1, args.batch)
        batch = np.stack([ids[s:s + args.seq + 1] for s in starts])
        loss = step(model, opt, jnp.asarray(batch[:, :-1]), jnp.asarray(batch[:, 1:]))
        if i % 100 == 0 or i == args.steps - 1:
            print(f"step {i:5d} loss {float(loss):.3f} ({time.time() - t0:.0f}s)", flush=True)

    out = Path(args.out)
    save_hf_checkpoint(model, hf_config(cfg, eos), out, dtype=np.float16)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, tok.token_to_id("<|im_end|>")]}))
    print(f"final loss {float(loss):.3f}; wrote {out}")


if __name__ == "__main__":
    main()
