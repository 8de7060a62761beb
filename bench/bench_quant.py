"""Batch-1 CPU decoding at every precision: emergence vs llama.cpp on the same weights, same run.

The smollm2-135m architecture (30 layers, 576 wide, GQA 9/3, vocab 49152, tied head) with
random weights. emergence runs it in fp32, bf16, and quantized to int8, q8_0, int4 (group
32), q4_0, nf4 and ternary (b1.58, with and without 8-bit activations), every linear layer
including the output head; llama.cpp (llama-cpp-python, 2 threads) runs the same weights
exported with `emergence convert` to GGUF F32, F16, Q8_0 and Q4_0.

Decode tokens/s: N - 1 tokens over the time from the first generated token to the last,
emergence's `stream` and llama.cpp's single-token evaluations, both greedy from the same
prompt (prefill times are kept out: they vary more than a few decode steps take). Prefill tokens/s:
one forward pass over the prompt. Effective bandwidth = decode tok/s x bytes of weights read
per token, against the machine's memory read bandwidth measured in the same run.

    python bench/bench_quant.py [--new-tokens 64] [--prompt 128] [--rounds 5] [--engines a,b,...]

Rounds interleave the engines (the machine's bandwidth drifts); rates are medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import models

from emergence import Config, SamplingParams
from emergence.generate import stream
from emergence.kernels.fused_decode import unsupported
from emergence.model import Transformer
from emergence.quant.linear import QuantizedLinear, quantize_model
from emergence.tokenizer import Tokenizer
from emergence.weights.gguf_model import save_gguf

# engine name -> (how emergence builds it, or the llama.cpp GGUF type), and its peer
OURS = {"fp32": (torch.float32, None, {}), "bf16": (torch.bfloat16, None, {}),
        "int8": (torch.float32, "int8", {}), "q8_0": (torch.float32, "q8_0", {}),
        "int4-g32": (torch.float32, "int4", {"group_size": 32}), "q4_0": (torch.float32, "q4_0", {}),
        "nf4": (torch.float32, "nf4", {}), "ternary": (torch.float32, "ternary", {}),
        "ternary-a8": (torch.float32, "ternary", {"act_bits": 8})}
THEIRS = {"llama.cpp F32": "f32", "llama.cpp F16": "f16", "llama.cpp Q8_0": "q8_0", "llama.cpp Q4_0": "q4_0"}
PEERS = {"fp32": "llama.cpp F32", "bf16": "llama.cpp F16", "int8": "llama.cpp Q8_0", "q8_0": "llama.cpp Q8_0",
         "int4-g32": "llama.cpp Q4_0", "q4_0": "llama.cpp Q4_0", "nf4": "llama.cpp Q4_0"}


def measure_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    x = torch.ones(n_bytes // 4, dtype=torch.float32)
    x.sum()
    return n_bytes / min(_timed(lambda: x.sum()) for _ in range(repeats)) / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-fallback BPE vocabulary of the model's size (the benchmark feeds token ids)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    vocab.update({f"\u2581t{i}": i for i in range(len(vocab), vocab_size)})
    backend = Backend(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    return Tokenizer(backend, bos_token="<s>", eos_token="</s>")


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of every matrix read for one token: all linear layers (the output head included)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            total += sum(b.numel() * b.element_size() for b in m.buffers())
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def our_engine(base: Transformer, tokenizer: Tokenizer, dtype, fmt, options, prompt: list[int]):
    model = copy.deepcopy(base).to(dtype)
    if fmt is not None:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie: quantize it too
        model.config.tie_embeddings = False
        quantize_model(model, fmt, skip=(), **options)
    ids = torch.tensor([prompt])

    def decode(n: int) -> float:
        """Seconds for tokens 2..n."""
        chunks = stream(model, tokenizer, prompt, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))
        next(chunks)
        start = time.perf_counter()
        for _ in chunks:
            pass
        return time.perf_counter() - start

    def prefill():
        with torch.inference_mode():
            model(ids, last_logits_only=True)

    return decode, prefill, weight_bytes_per_token(model), unsupported(model) is None


def llama_cpp_engine(path: Path, prompt: list[int]):
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=2, n_batch=512, verbose=False)

    def decode(n: int) -> float:
        """Seconds for tokens 2..n."""
        llm.reset()
        llm.eval(prompt)
        start = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return time.perf_counter() - start

    def prefill():
        llm.reset()
        llm.eval(prompt)

    return decode, prefill


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engines", default=",".join(list(OURS) + list(THEIRS)))
    parser.add_argument("--out", default="bench/results/quant.json")
    args = parser.parse_args()
    chosen = args.engines.split(",")
    unknown = [e for e in chosen if e not in OURS and e not in THEIRS]
    if unknown:
        parser.error(f"unknown engines {unknown}")

    torch.manual_seed(0)
    config = Config.from_name("smollm2-135m")
    base = Transformer(config).eval()
    tokenizer = synthetic_tokenizer(config.vocab_size)
    prompt = torch.randint(3, config.vocab_size, (args.prompt,)).tolist()
    bandwidth = measure_bandwidth()
    print(f"smollm2-135m architecture, random weights; {torch.get_num_threads()} threads; memory read bandwidth "
          f"{bandwidth:.1f} GB/s", flush=True)

    engines, weight_bytes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            if name in OURS:
                decode, prefill, nbytes, fused = our_engine(base, tokenizer, *OURS[name], prompt)
                if not fused:
                    print(f"  ({name}: no fused native decode here; eager path)", flush=True)
            else:
                path = Path(tmp) / f"{THEIRS[name]}.gguf"
                save_gguf(base, tokenizer, path, THEIRS[name])
                decode, prefill = llama_cpp_engine(path, prompt)
                nbytes = _gguf_matrix_bytes(path)
            engines[name] = (decode, prefill)
            weight_bytes[name] = nbytes
        samples = {n: {"decode": [], "prefill": []} for n in engines}
        for decode, prefill in engines.values():  # warm-up
            decode(2), prefill()
        for r in range(args.rounds):
            for name, (decode, prefill) in engines.items():
                samples[name]["decode"].append((args.new_tokens - 1) / decode(args.new_tokens))
                samples[name]["prefill"].append(len(prompt) / _timed(prefill))
            print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {s['decode'][-1]:.0f}" for n, s in
                                                                 samples.items()), flush=True)

    result = {"bandwidth_gb_s": bandwidth, "threads": torch.get_num_threads(), "engines": {}}
    print("\n| engine | weights MB/token | decode tok/s (range) | vs llama.cpp | prefill tok/s | vs llama.cpp "
          "| effective GB/s | % of bandwidth |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in samples.items():
        decode, prefill = statistics.median(s["decode"]), statistics.median(s["prefill"])
        result["engines"][name] = {"decode_tok_s": decode, "prefill_tok_s": prefill, "weight_bytes": weight_bytes[name],
                                   "decode_range": [min(s["decode"]), max(s["decode"])]}
    for name, r in result["engines"].items():
        peer = result["engines"].get(PEERS.get(name, ""))
        vs = f"{r['decode_tok_s'] / peer['decode_tok_s']:.2f}x" if peer else "-"
        vs_prefill = f"{r['prefill_tok_s'] / peer['prefill_tok_s']:.2f}x" if peer else "-"
        gbs = r["decode_tok_s"] * r["weight_bytes"] / 1e9
        lo, hi = r["decode_range"]
        print(f"| {name} | {r['weight_bytes'] / 1e6:.0f} | {r['decode_tok_s']:.1f} ({lo:.0f}-{hi:.0f}) | {vs} "
              f"| {r['prefill_tok_s']:.0f} | {vs_prefill} | {gbs:.1f} | {100 * gbs / bandwidth:.0f}% |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


def _gguf_matrix_bytes(path: Path) -> int:
    """Bytes of the 2-D tensors llama.cpp reads per token (the embedding table is read by row,
    but with a tied head it is the output matrix too)."""
    from emergence.gguf import read_gguf

    f = read_gguf(path)
    tied = "output.weight" not in f.tensors
    return sum(t.nbytes for t in f.tensors.values()
               if len(t.shape) == 2 and (t.name != "token_embd.weight" or tied))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
