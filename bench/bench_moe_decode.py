"""Mixture-of-experts decoding on the CPU against llama.cpp, same weights, same run.

    .venv/bin/python bench/bench_moe_decode.py        # writes bench/results/moe_decode.json (_amd on an AMD CPU)

A Mixtral-shaped model with random weights sized for this machine (SHAPES: 8 experts, top-2,
about 1 GB at fp32), exported with emergence's GGUF writer (what `emergence convert` runs) and
decoded greedily, batch 1, by emergence (the native step, which reads only the chosen experts)
and by llama.cpp: its own llama-bench (tg) and llama-cpp-python's loop, 2 threads, alternating
rounds, medians; the ratio is against llama-bench where it was run. The roofline is
computed on the bytes a token actually reads: the attention and the 2 chosen experts of every
layer, the router, the norms and the output head (the embedding row is negligible), at the read
bandwidth measured just before each round (this machine's drifts from run to run: a share is
each round's, then the median).

emergence runs fp32, bf16, q8_0 and q4_0 here; llama.cpp F32, F16, Q8_0 and Q4_0. The quantized
rows quantize every matrix (quantize_model(skip=()): experts one by one, attention, the output
head; the router stays F32 as llama.cpp keeps it), which is exactly what the GGUF export writes,
so both decode the same blocks; llama.cpp's token embeddings are blocks too (one row per token).
"""

from __future__ import annotations

import copy
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

from bench_quant import llama_bench_engine, llama_cpp_engine, measure_bandwidth, synthetic_tokenizer  # noqa: E402
from emergence.allocator import huge_page_weights  # noqa: E402
from emergence.config import Config  # noqa: E402
from emergence.generate import stream  # noqa: E402
from emergence.kernels.fused_decode import unsupported  # noqa: E402
from emergence.model import Transformer  # noqa: E402
from emergence.quant.linear import quantize_model  # noqa: E402
from emergence.sampling import SamplingParams  # noqa: E402
from emergence.weights.gguf_model import save_gguf  # noqa: E402
from provenance import commit, machine, result_path  # noqa: E402

RESULTS = ROOT / result_path("moe_decode")
SHAPES = dict(family="mixtral", vocab_size=32000, block_size=512, n_layer=6, n_head=12, n_kv_head=4, n_embd=768,
              intermediate_size=2048, n_experts=8, experts_per_token=2, tie_embeddings=False)
PROMPT = [1, 415, 2936, 9060, 285, 1142, 461, 10575]
NEW, ROUNDS = 64, 5


# Bytes per weight of each format (ggml's blocks of 32: a 2-byte scale and 32 codes).
ELEMENT = {"fp32": 4, "bf16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}


def bytes_per_token(config: Config, fmt: str) -> int:
    """Bytes of the matrices one token reads: active parameters less the embedding table, the
    routers in fp32 (never quantized) and the rest in the format."""
    routers = sum(config.is_moe_layer(i) for i in range(config.n_layer)) * config.n_experts * config.n_embd
    matrices = config.num_parameters(active=True) - config.vocab_size * config.n_embd - routers
    return round(matrices * ELEMENT[fmt] + routers * (4 if fmt != "bf16" else 2))


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
    bandwidth = measure_bandwidth()  # at the start (each round probes again)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ours, theirs in (("q8_0", "Q8_0"), ("q4_0", "Q4_0"), ("fp32", "F32"), ("bf16", "F16")):
            if ours.startswith("q"):
                model = quantize_model(copy.deepcopy(base), ours, skip=())
            else:  # in place (the quantized rows went first, from copies of the fp32 weights)
                model = base.to(torch.bfloat16 if ours == "bf16" else torch.float32)
            huge_page_weights(model)  # as emergence.load places a model's weights
            assert unsupported(model) is None, unsupported(model)  # the native step
            path = Path(tmp) / f"moe-{theirs}.gguf"
            save_gguf(base if ours.startswith("q") else model, tokenizer, path, theirs.lower())
            llama_decode, _ = llama_cpp_engine(path, PROMPT)
            bench_decode, _ = llama_bench_engine(path, PROMPT)
            ours_tps, theirs_tps, bench_tps, probes = [], [], [], []
            our_decode(model, tokenizer), llama_decode(4), bench_decode(4)  # warm-up
            for _ in range(ROUNDS):
                probes.append(measure_bandwidth())
                ours_tps.append(our_decode(model, tokenizer))
                theirs_tps.append((NEW - 1) / llama_decode(NEW))
                bench_tps.append((NEW - 1) / bench_decode(NEW))
            read = bytes_per_token(config, ours)
            o, t, b = statistics.median(ours_tps), statistics.median(theirs_tps), statistics.median(bench_tps)

            def share(rates: list[float]) -> float:  # each round's against its own probe, the median
                return statistics.median(r * read / (gb_s * 1e9) for r, gb_s in zip(rates, probes))

            rows.append(dict(emergence=ours, llama_cpp=theirs, emergence_tok_s=o, llama_bench_tok_s=b,
                             llama_cpp_tok_s=t, ratio=o / b, ratio_llama_cpp_python=o / t, bytes_per_token=read,
                             read_bandwidth_gb_s=probes, roofline_tok_s=statistics.median(probes) * 1e9 / read,
                             emergence_share_of_roofline=share(ours_tps), llama_bench_share_of_roofline=share(bench_tps)))
            print(json.dumps(rows[-1]), flush=True)
    result = dict(date=datetime.date.today().isoformat(), commit=commit(), machine=machine(),
                  command="python bench/bench_moe_decode.py", shapes=SHAPES, total_parameters=config.num_parameters(),
                  active_parameters=config.num_parameters(active=True), new_tokens=NEW, rounds=ROUNDS,
                  read_bandwidth_gb_s=bandwidth, rows=rows, target_ratio=1.0)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
