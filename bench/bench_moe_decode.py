"""Mixture-of-experts decoding on the CPU against llama.cpp, same weights, same run.

    .venv/bin/python bench/bench_moe_decode.py        # writes bench/results/moe_decode.json

A Mixtral-shaped model with random weights sized for this machine (SHAPES: 8 experts, top-2,
about 1 GB at fp32), exported with emergence's GGUF writer (what `emergence convert` runs) and
decoded greedily, batch 1, by emergence (the native step, which reads only the chosen experts)
and by llama.cpp (llama-cpp-python, 2 threads), alternating rounds, medians. The roofline is
computed on the bytes a token actually reads: the attention and the 2 chosen experts of every
layer, the router, the norms and the output head (the embedding row is negligible), at the read
bandwidth measured in the same run.

emergence runs fp32 and bf16 here; llama.cpp F32 and F16. Quantized experts (q8_0/q4_0 in
emergence's native step) are not built yet, so those rows of issue 15's table are not measured.
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_quant import llama_cpp_engine, measure_bandwidth, synthetic_tokenizer  # noqa: E402
from emergence.config import Config  # noqa: E402
from emergence.generate import stream  # noqa: E402
from emergence.kernels.fused_decode import unsupported  # noqa: E402
from emergence.model import Transformer  # noqa: E402
from emergence.sampling import SamplingParams  # noqa: E402
from emergence.weights.gguf_model import save_gguf  # noqa: E402
from provenance import commit, machine  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "moe_decode.json"
SHAPES = dict(family="mixtral", vocab_size=32000, block_size=512, n_layer=6, n_head=12, n_kv_head=4, n_embd=768,
              intermediate_size=2048, n_experts=8, experts_per_token=2, tie_embeddings=False)
PROMPT = [1, 415, 2936, 9060, 285, 1142, 461, 10575]
NEW, ROUNDS = 64, 3


def bytes_per_token(config: Config, element: int) -> int:
    """Bytes of the matrices one token reads: active parameters less the embedding table."""
    return (config.num_parameters(active=True) - config.vocab_size * config.n_embd) * element


def our_decode(model: Transformer, tokenizer) -> float:
    chunks = stream(model, tokenizer, PROMPT, SamplingParams(temperature=0, max_new_tokens=NEW, ignore_eos=True))
    next(chunks)
    start = time.perf_counter()
    for _ in chunks:
        pass
    return (NEW - 1) / (time.perf_counter() - start)


def main() -> None:
    torch.manual_seed(0)
    config = Config(**SHAPES)
    base = Transformer(config).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.02)
    tokenizer = synthetic_tokenizer(config.vocab_size)
    bandwidth = measure_bandwidth()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ours, theirs, dtype, element in (("fp32", "F32", torch.float32, 4), ("bf16", "F16", torch.bfloat16, 2)):
            model = base.to(dtype)
            assert unsupported(model) is None, unsupported(model)  # the native step
            path = Path(tmp) / f"moe-{theirs}.gguf"
            save_gguf(model, tokenizer, path, theirs.lower())
            llama_decode, _ = llama_cpp_engine(path, PROMPT)
            ours_tps, theirs_tps = [], []
            our_decode(model, tokenizer), llama_decode(4)  # warm-up
            for _ in range(ROUNDS):
                ours_tps.append(our_decode(model, tokenizer))
                theirs_tps.append((NEW - 1) / llama_decode(NEW))
            read = bytes_per_token(config, element)
            o, t = statistics.median(ours_tps), statistics.median(theirs_tps)
            rows.append(dict(emergence=ours, llama_cpp=theirs, emergence_tok_s=o, llama_cpp_tok_s=t, ratio=o / t,
                             bytes_per_token=read, roofline_tok_s=bandwidth * 1e9 / read,
                             emergence_share_of_roofline=o * read / (bandwidth * 1e9)))
            print(json.dumps(rows[-1]), flush=True)
    result = dict(date=datetime.date.today().isoformat(), commit=commit(), machine=machine(),
                  command="python bench/bench_moe_decode.py", shapes=SHAPES, total_parameters=config.num_parameters(),
                  active_parameters=config.num_parameters(active=True), new_tokens=NEW, rounds=ROUNDS,
                  read_bandwidth_gb_s=bandwidth, rows=rows, target_ratio=1.0)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
