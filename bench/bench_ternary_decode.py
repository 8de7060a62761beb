"""Ternary (BitNet b1.58) decoding on the CPU against llama.cpp's TQ2_0 and TQ1_0, same weights, same run.

    .venv/bin/python bench/bench_ternary_decode.py            # -> bench/results/ternary_decode[_amd].json
    .venv/bin/python bench/bench_ternary_decode.py --tiny     # a smoke run (tiny shapes, a few tokens; no file written)

Two models with random weights, made ternary as a ternary-trained model is saved
(quantize_model(model, "ternary", act_bits=8): every block matrix {-1, 0, 1} x its absmean,
8-bit per-token activations, the token embedding and head in full precision), each decoded
greedily, batch 1, by emergence (the native step: the 2-bit packed ternary kernel) in fp32 and
in bf16 (the head's precision is the model's dtype), and by llama.cpp from emergence's TQ2_0 and
TQ1_0 exports of the same weights (what `emergence convert --type tq2_0` writes): its own
llama-bench (tg; the ratio's peer) and llama-cpp-python's loop beside it, alternating rounds,
medians, the same thread count on both sides:

- the smollm2-135m shapes. llama.cpp's TQ blocks are 256 wide, and there only ffn_down (1,536
  columns) has rows that fill them; the matrices of 576 columns (attn_q/k/v/output,
  ffn_gate/up) are written F16, as llama.cpp's converter falls back (`tensor_types` in the
  result counts the weights per type), so the two sides read different formats;
- a LLaMA-shaped model whose rows fill 256-blocks (bench_gguf_load's WIDE: 12 layers of 768,
  FFN 2,048, untied head): every block matrix is TQ2_0 / TQ1_0 in llama.cpp's file, ternary
  kernel against ternary kernel. The token embedding and head are F16 in a TQ file, as the
  converter writes them.

Bytes per token are those of the matrices one token reads on each side (every block matrix and
the output head; the embedding row is negligible), from the packed buffers (ours) and the GGUF
tensor sizes (theirs); bytes per weight divides them by the weights read. Each round probes the
read bandwidth first, and each decode's share of the roofline is against its round's probe
(the median over the rounds is reported).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_gguf_load import WIDE  # noqa: E402
from bench_quant import llama_bench_engine, llama_cpp_engine, measure_bandwidth, synthetic_tokenizer  # noqa: E402
from emergence.config import Config  # noqa: E402
from emergence.generate import stream  # noqa: E402
from emergence.gguf import read_gguf  # noqa: E402
from emergence.kernels.fused_decode import unsupported  # noqa: E402
from emergence.model import Transformer  # noqa: E402
from emergence.quant.linear import QuantizedLinear, quantize_model  # noqa: E402
from emergence.sampling import SamplingParams  # noqa: E402
from emergence.weights.gguf_model import save_gguf  # noqa: E402
from provenance import commit, machine, result_path  # noqa: E402

RESULTS = ROOT / result_path("ternary_decode")
TINY = dict(vocab_size=512, block_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=256, intermediate_size=512,
            tie_embeddings=True, bos_token_id=1, eos_token_id=2)
PROMPT = [1, 415, 2936, 9060, 285, 1142, 461, 10575]
TINY_PROMPT = [1, 415, 293, 96, 285, 114, 461, 105]


def weights_read(model: Transformer) -> int:
    """Weights of every matrix one token reads: the block matrices and the output head."""
    c = model.config
    return c.num_parameters() - (0 if c.tie_embeddings else c.vocab_size * c.n_embd) - sum(
        p.numel() for n, p in model.named_parameters() if p.dim() == 1)  # norms (and biases) are not matrices


def our_bytes_per_token(model: Transformer) -> int:
    """Bytes of every matrix the native step reads for one token: the packed operands of the
    quantized layers (2 bits per ternary weight and its scale), the float head."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            ops = m.kernel_operands()
            total += sum(t.numel() * t.element_size() for t in (ops.data, ops.scales, ops.offsets)) + 4
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def gguf_bytes_per_token(path: Path) -> tuple[int, dict]:
    """Bytes of the GGUF matrices a token reads (the head: output, or the tied token_embd) and
    the weights per tensor type."""
    f = read_gguf(path)
    tied = "output.weight" not in f.tensors
    read, types = 0, Counter()
    for name, info in f.tensors.items():
        if len(info.shape) < 2 or (name == "token_embd.weight" and not tied):
            continue
        read += info.nbytes
        types[info.type.name] += info.n_elements
    return read, dict(types)


def our_decode(model: Transformer, tokenizer, prompt: list[int], new: int) -> float:
    chunks = stream(model, tokenizer, prompt, SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True))
    next(chunks)
    start = time.perf_counter()
    for _ in chunks:
        pass
    return (new - 1) / (time.perf_counter() - start)


def shapes_configs(tiny: bool) -> dict[str, Config]:
    """The models measured, by name."""
    if tiny:
        return {"tiny": Config(**TINY)}
    return {"smollm2-135m": Config.from_name("smollm2-135m", block_size=512), WIDE["name"]: Config(**WIDE)}


def measure(name: str, config: Config, args, new: int, rounds: int, tmp: Path) -> list[dict]:
    """Rows for one model: each of our dtypes against each TQ file."""
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    quantize_model(model, "ternary", act_bits=8)  # what a ternary-trained model saves as
    tokenizer = synthetic_tokenizer(config.vocab_size)
    prompt = [t % config.vocab_size for t in (TINY_PROMPT if args.tiny else PROMPT)]
    ours: dict[str, dict] = {}
    for dtype in ("fp32", "bf16"):
        m = model if dtype == "fp32" else copy.deepcopy(model).to(torch.bfloat16)
        assert unsupported(m) is None, unsupported(m)  # the native step decodes it
        ours[dtype] = dict(model=m, bytes_per_token=our_bytes_per_token(m), tok_s=[])
    theirs: dict[str, dict] = {}
    for kind in ("tq2_0", "tq1_0"):
        path = tmp / f"{name}-{kind}.gguf"
        save_gguf(model, tokenizer, path, kind)
        read, types = gguf_bytes_per_token(path)
        bench_decode, _ = llama_bench_engine(path, prompt, args.threads)
        loop_decode, _ = llama_cpp_engine(path, prompt, args.threads)
        theirs[kind] = dict(loop=lambda n, d=loop_decode: (n - 1) / d(n),
                            bench=lambda n, d=bench_decode: (n - 1) / d(n), bytes_per_token=read,
                            tensor_types=types, loop_tok_s=[], bench_tok_s=[])
    for side in ours.values():  # warm-up
        our_decode(side["model"], tokenizer, prompt, 4)
    for side in theirs.values():
        side["loop"](4), side["bench"](4)
    probes = []
    for r in range(rounds):
        probes.append(measure_bandwidth(1 << 26 if args.tiny else 1 << 30, repeats=3))
        for side in ours.values():
            side["tok_s"].append(our_decode(side["model"], tokenizer, prompt, new))
        for side in theirs.values():
            side["bench_tok_s"].append(side["bench"](new))
            side["loop_tok_s"].append(side["loop"](new))
        print(f"{name} round {r + 1}/{rounds} ({probes[-1]:.0f} GB/s): " + ", ".join(
            [f"{d} {o['tok_s'][-1]:.1f}" for d, o in ours.items()]
            + [f"llama-bench {k.upper()} {t['bench_tok_s'][-1]:.1f}" for k, t in theirs.items()]) + " tok/s", flush=True)

    def share(rates: list[float], nbytes: int) -> float:  # each round's against its own probe, the median
        return statistics.median(r * nbytes / (gb_s * 1e9) for r, gb_s in zip(rates, probes))

    weights = weights_read(model)
    rows = []
    for dtype, o in ours.items():
        for kind, t in theirs.items():
            a, b, c = (statistics.median(x) for x in (o["tok_s"], t["bench_tok_s"], t["loop_tok_s"]))
            rows.append(dict(shapes=name, emergence=f"ternary native, {dtype} head", llama_cpp=kind.upper(),
                             emergence_tok_s=a, llama_bench_tok_s=b, llama_cpp_tok_s=c, ratio=a / b,
                             ratio_llama_cpp_python=a / c, weights_read_per_token=weights,
                             emergence_bytes_per_token=o["bytes_per_token"],
                             llama_cpp_bytes_per_token=t["bytes_per_token"],
                             emergence_bytes_per_weight=o["bytes_per_token"] / weights,
                             llama_cpp_bytes_per_weight=t["bytes_per_token"] / weights,
                             read_bandwidth_gb_s=probes,
                             emergence_roofline_tok_s=statistics.median(probes) * 1e9 / o["bytes_per_token"],
                             llama_cpp_roofline_tok_s=statistics.median(probes) * 1e9 / t["bytes_per_token"],
                             emergence_share_of_roofline=share(o["tok_s"], o["bytes_per_token"]),
                             llama_bench_share_of_roofline=share(t["bench_tok_s"], t["bytes_per_token"]),
                             llama_cpp_tensor_types=t["tensor_types"]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, few tokens, one round; writes no file")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads on both sides")
    parser.add_argument("--new", type=int, default=64, help="tokens decoded per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    new, rounds = (8, 1) if args.tiny else (args.new, args.rounds)
    torch.set_num_threads(args.threads)
    configs = shapes_configs(args.tiny)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for name, config in configs.items() for row in measure(name, config, args, new, rounds, Path(tmp))]
    result = dict(date=datetime.date.today().isoformat(), commit=commit(), machine=machine(),
                  command=" ".join(["python", "bench/bench_ternary_decode.py", *sys.argv[1:]]),
                  configs={name: c.to_dict() for name, c in configs.items()}, threads=args.threads,
                  new_tokens=new, rounds=rounds, rows=rows, target_ratio=1.0)
    if args.tiny:
        print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "configs")}))
        return
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
