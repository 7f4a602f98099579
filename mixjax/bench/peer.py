"""The peer: Hugging Face transformers decoding the same model shape on the same GPU (torch, bf16).

    python -m mixjax.bench.peer --preset qwen3-30b-a3b --layers 4 --batch 1,8,32 --ctx 1024 --json peer.json

Random weights of the preset's shapes (the layer count given), a KV cache of ctx-1 random positions, then one
decode step (one token per sequence) timed with CUDA synchronisation, median of --iters; the cache is cropped back
after each step so every step sees the same context. Run it in its own process (bench.decode does), so that JAX and
torch do not share the GPU's memory. Needs torch and transformers, which the GPU image has; mixjax does not.
Qwen3 presets only (no DeepSeek-V3 peer: no torch environment was at hand to check transformers' DeepseekV3
against mixjax's shapes); bench.decode skips the peer for the DeepSeek presets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from mixjax.bench.layers import DEEPSEEK_PRESETS, PRESETS, add_decode_shape_args, decode_vocab


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_decode_shape_args(ap, "1,8,32,128")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.preset in DEEPSEEK_PRESETS:
        raise SystemExit(f"mixjax.bench.peer covers the Qwen3 presets only, not {args.preset}")
    args.vocab = decode_vocab(args.preset, args.vocab)

    import torch
    import transformers
    from transformers import DynamicCache, Qwen3MoeConfig, Qwen3MoeForCausalLM
    p = dict(PRESETS[args.preset], vocab_size=args.vocab)
    cfg = Qwen3MoeConfig(num_hidden_layers=args.layers, norm_topk_prob=True, tie_word_embeddings=False,
                         max_position_embeddings=32768, **p)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).eval()
    impl = getattr(model.config, "_experts_implementation", None)
    dev = torch.cuda.get_device_name()
    print(f"transformers {transformers.__version__} (torch {torch.__version__}, experts implementation {impl}) on "
          f"{dev}: {args.layers} layers, ctx {args.ctx}, bf16")
    rows = []
    kv, hd = cfg.num_key_value_heads, cfg.head_dim
    for b in (int(x) for x in args.batch.split(",")):
        cache = DynamicCache(config=cfg)
        for layer in range(args.layers):
            k = torch.randn(b, kv, args.ctx - 1, hd, device="cuda", dtype=torch.bfloat16)
            cache.update(k, torch.randn_like(k), layer)
        tok = torch.randint(0, args.vocab, (b, 1), device="cuda")
        pos = torch.full((b, 1), args.ctx - 1, device="cuda")
        cpos = torch.tensor([args.ctx - 1], device="cuda")
        times = []
        with torch.inference_mode():
            for i in range(args.iters + 2):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(input_ids=tok, position_ids=pos, cache_position=cpos, past_key_values=cache, use_cache=True)
                torch.cuda.synchronize()
                if i >= 2:
                    times.append(time.perf_counter() - t0)
                cache.crop(args.ctx - 1)
        t = statistics.median(times)
        rows.append(dict(batch=b, step_s=t, tokens_per_s=b / t))
        print(f"peer batch {b:4d}: {t * 1e3:8.3f} ms/step, {b / t:8.0f} tok/s", flush=True)
        del cache
        torch.cuda.empty_cache()
    out = {"peer": f"transformers {transformers.__version__}", "torch": torch.__version__, "device": dev,
           "experts_implementation": impl, "args": vars(args), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
