"""Batch-1 decode and prefill speed: emergence vs transformers on the same weights, same run.

The smollm2-135m architecture (30 layers, 576 wide, GQA 9/3, vocab 49152) with random
weights, in fp32 and bf16. Decode tokens/s is measured as (N - 1) / (t(N tokens) - t(1 token))
for both libraries, so prefill and set-up cancel out; prefill tokens/s is one forward pass over
a PROMPT-token prompt. The hardware limit: each decoded token reads every weight once, so
tokens/s x weight bytes is compared with the machine's measured memory read bandwidth.

    python bench/bench_decode.py [--new-tokens 64] [--prompt 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from emergence import Config, SamplingParams, generate
from emergence.tokenizer import Tokenizer
from emergence.weights.hf import load_hf


def measure_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s: summing a tensor much larger than the caches."""
    x = torch.ones(n_bytes // 4, dtype=torch.float32)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(repeats))
    return n_bytes / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    return min(_timed(fn) for _ in range(repeats))


def bench_dtype(folder: Path, dtype: torch.dtype, tokenizer: Tokenizer, prompt: list[int], new_tokens: int,
                repeats: int) -> dict:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ours, _ = load_hf(folder, dtype=dtype)
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)

    def hf_generate(n: int):
        with torch.inference_mode():
            hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    def our_generate(n: int):
        generate(ours, tokenizer, [prompt], SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))

    def hf_prefill():
        with torch.inference_mode():
            hf(ids, attention_mask=mask)

    def our_prefill():
        with torch.inference_mode():
            ours(ids, last_logits_only=True)

    result = {}
    for name, gen, prefill in (("transformers", hf_generate, hf_prefill), ("emergence", our_generate, our_prefill)):
        t1 = best_of(lambda: gen(1), repeats)
        tn = best_of(lambda: gen(new_tokens), repeats)
        tp = best_of(prefill, repeats)
        result[name] = {"decode_tok_s": (new_tokens - 1) / (tn - t1), "prefill_tok_s": len(prompt) / tp}
        print(f"  {name:13} decode {result[name]['decode_tok_s']:7.1f} tok/s   "
              f"prefill {result[name]['prefill_tok_s']:8.1f} tok/s", flush=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in ours.parameters()}.values())
    result["weight_bytes"] = weight_bytes
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--out", default="bench/results/decode.json")
    args = parser.parse_args()

    import transformers

    torch.manual_seed(0)
    config = Config.from_name("smollm2-135m")
    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        transformers.AutoModelForCausalLM.from_config(hf_config).save_pretrained(folder)
        from tokenizers import Tokenizer as Backend, models

        tokenizer = Tokenizer(Backend(models.WordLevel({f"t{i}": i for i in range(config.vocab_size)}, unk_token="t1")))
        prompt = torch.randint(1, config.vocab_size, (args.prompt,)).tolist()
        bandwidth = measure_bandwidth()
        print(f"smollm2-135m architecture, random weights; torch {torch.__version__}, transformers "
              f"{transformers.__version__}, {torch.get_num_threads()} threads; memory read bandwidth "
              f"{bandwidth:.1f} GB/s", flush=True)
        results = {"bandwidth_gb_s": bandwidth, "threads": torch.get_num_threads(), "machine": platform.processor(),
                   "torch": torch.__version__, "transformers": transformers.__version__}
        for name in args.dtypes.split(","):
            print(f"{name}:", flush=True)
            results[name] = bench_dtype(folder, dtypes[name], tokenizer, prompt, args.new_tokens, args.repeats)

    print("\n| dtype | emergence decode tok/s | transformers decode tok/s | ratio | emergence prefill tok/s "
          "| transformers prefill tok/s | ratio | decode GB/s (x weight bytes) | % of bandwidth |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.dtypes.split(","):
        r = results[name]
        ours, theirs = r["emergence"], r["transformers"]
        gbs = ours["decode_tok_s"] * r["weight_bytes"] / 1e9
        print(f"| {name} | {ours['decode_tok_s']:.1f} | {theirs['decode_tok_s']:.1f} | "
              f"{ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x | {ours['prefill_tok_s']:.0f} | "
              f"{theirs['prefill_tok_s']:.0f} | {ours['prefill_tok_s'] / theirs['prefill_tok_s']:.2f}x | "
              f"{gbs:.1f} | {100 * gbs / bandwidth:.0f}% |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
