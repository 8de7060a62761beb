"""Quantized GGUF files as emergence loads them: memory, load time, decode and prefill speed, same run.

The smollm2-135m architecture with random weights (as bench_quant.py), exported by emergence
to GGUF Q8_0 and Q4_0 (every matrix in the type, the tied token table included), and the
same weights' F32 export quantized by llama.cpp's own quantizer into its Q4_K_M, Q5_K_M and
Q6_K files (its mixes: Q4_K / Q5_K / Q6_K where rows fill 256-blocks, Q5_0 / Q5_1 / Q8_0 for the
576-wide rows, Q6_K for some attn_v and ffn_down, as a SmolLM2 download is made); and, for the
K-quant kernels alone, llama.cpp's "pure" Q4_K and Q6_K files (every matrix in the type) of a
LLaMA-shaped model whose rows fill 256-blocks (WIDE: 12 layers of 768, 110M parameters), beside
the same weights quantized by emergence to q4_k / q6_k (byte for byte llama.cpp's quantizer's,
tests/test_gguf_model.py). For each file:

- its size, and the peak resident memory while loading it in a fresh process (growth over the
  process before, its modules imported), kept quantized (`emergence.load`: the file's blocks in
  GGMLLinear / GGMLEmbedding layers) and dequantized to float32 (`dequantize=True`, how every
  GGUF loaded before); seconds to load each way;
- batch-1 decode tokens/s of emergence on the loaded file (`stream`, the user path) beside
  the same weights quantized by emergence itself (bench_quant.py's q8_0 / q4_0 engine: every
  linear layer, the head included; none for llama.cpp's mixes) and llama.cpp's own llama-bench
  on the same file (tg), and the prefill of a 128-token prompt by each on the file (llama-bench's
  pp128), the engines interleaved round by round; medians, with their ranges.

    python bench/bench_gguf_load.py [--rounds 5] [--new-tokens 64]

Writes bench/results/gguf_load.json (gguf_load_amd.json on an AMD CPU); the README's tables are
`render_table` of them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quant import _prefill_seconds, llama_bench_engine, model_engine, our_engine, synthetic_tokenizer  # noqa: E402
from provenance import result_path, write_result  # noqa: E402

from emergence import Config  # noqa: E402
from emergence.model import Transformer  # noqa: E402
from emergence.weights.gguf_model import load_gguf, save_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TYPES = ("q8_0", "q4_0")
# llama.cpp's quantizer's file types (llama_ftype) made from the F32 export
LLAMA_CPP_MIXES = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}
# its pure files of WIDE: file -> (our format, llama_ftype; Q4_K_S made pure is all Q4_K)
PURE_K = {"Q4_K pure": ("q4_k", 14), "Q6_K pure": ("q6_k", 18)}
WIDE = dict(name="llama-768", family="llama", vocab_size=32000, block_size=512, n_layer=12, n_head=12, n_kv_head=4,
            n_embd=768, intermediate_size=2048, tie_embeddings=False)
# A fresh process: load a small file first (modules imported, allocator warm), reset the peak,
# load the file; prints the peak's growth in bytes and the seconds.
PROBE = """
import sys, time
from emergence.weights.gguf_model import load_gguf
def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
load_gguf(sys.argv[2], dequantize=sys.argv[3] == "1")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base, start = rss("VmRSS"), time.perf_counter()
load_gguf(sys.argv[1], dequantize=sys.argv[3] == "1")
print(rss("VmHWM") - base, time.perf_counter() - start)
"""


def load_cost(path: Path, small: Path, dequantize: bool) -> tuple[int, float]:
    """(peak resident growth in bytes, seconds) of loading `path` in a fresh process."""
    run = subprocess.run([sys.executable, "-c", PROBE, str(path), str(small), "1" if dequantize else "0"],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    grown, seconds = run.stdout.split()
    return int(grown), float(seconds)


def render_table(result: dict) -> str:
    """The README's table: per GGUF file, memory to load, decode and (where measured) prefill speed."""
    prefill = any("gguf_prefill_tok_s" in r for r in result["files"].values())
    rows = ["| GGUF file | size | peak RSS loading it (kept quantized) | loading it dequantized to fp32 | "
            "emergence decode on the file, tok/s (range) | the same weights quantized by emergence | "
            "llama-bench on the file (tg) |" + (" prefill of 128 tokens, tok/s: emergence / llama-bench (pp128) |"
                                                if prefill else ""),
            "|---|---|---|---|---|---|---|" + ("---|" if prefill else "")]

    def rate(r: dict, key: str) -> str:
        if f"{key}_tok_s" not in r:
            return "-"
        lo, hi = r[f"{key}_range"]
        return f"{r[f'{key}_tok_s']:.0f} ({lo:.0f}-{hi:.0f})"

    for kind, r in result["files"].items():
        size = r["file_bytes"]
        ratio = r["gguf_decode_tok_s"] / r["llama_bench_decode_tok_s"]
        name = kind.upper() if kind in TYPES else kind + (", 768 wide" if kind in PURE_K else "")
        row = (f"| {name} | {size / 1e6:.0f} MB | {r['packed_rss_bytes'] / 1e6:.0f} MB "
               f"({r['packed_rss_bytes'] / size:.2f}x), {r['packed_load_s']:.2f} s | "
               f"{r['float_rss_bytes'] / 1e6:.0f} MB ({r['float_rss_bytes'] / size:.1f}x), "
               f"{r['float_load_s']:.2f} s | {rate(r, 'gguf_decode')}, {ratio:.2f}x llama-bench | "
               f"{rate(r, 'quantized_decode')} | {rate(r, 'llama_bench_decode')} |")
        if prefill:
            row += (f" {r['gguf_prefill_tok_s']:.0f} / {r['llama_bench_prefill_tok_s']:.0f} "
                    f"({r['gguf_prefill_tok_s'] / r['llama_bench_prefill_tok_s']:.2f}x) |")
        rows.append(row)
    return "\n".join(rows)


def llama_cpp_quantize(src: Path, dst: Path, ftype: int, pure: bool = False) -> None:
    """llama.cpp's quantizer (llama-cpp-python's binding to the same source as llama-bench; no
    importance matrix; `pure`: every matrix in the type), in a subprocess: it prints a line per tensor."""
    code = ("import sys, llama_cpp\n"
            "p = llama_cpp.llama_model_quantize_default_params()\n"
            f"p.ftype, p.nthread, p.pure = {ftype}, 2, {pure}\n"
            f"sys.exit(llama_cpp.llama_model_quantize({str(src).encode()!r}, {str(dst).encode()!r}, p))")
    subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / result_path("gguf_load")))
    args = parser.parse_args()

    torch.manual_seed(0)
    config = Config.from_name("smollm2-135m")
    base = Transformer(config).eval()
    tokenizer = synthetic_tokenizer(config.vocab_size)
    prompt = torch.randint(3, config.vocab_size, (16,)).tolist()
    long_prompt = torch.randint(3, config.vocab_size, (128,)).tolist()
    wide = Transformer(Config(**WIDE)).eval()
    with torch.no_grad():
        for p in wide.parameters():
            p.normal_(0, 0.02)
    wide_tokenizer = synthetic_tokenizer(WIDE["vocab_size"])
    print(f"smollm2-135m architecture and {WIDE['name']}, random weights; {torch.get_num_threads()} threads", flush=True)
    result = {"rounds": args.rounds, "new_tokens": args.new_tokens, "files": {}}
    with tempfile.TemporaryDirectory() as tmp:
        small_config = Config(**{**config.to_dict(), "n_layer": 1, "n_embd": 64, "n_head": 2, "n_kv_head": 1,
                                 "intermediate_size": 64, "vocab_size": 512})
        small_wide = Config(**{**WIDE, "n_layer": 1, "n_embd": 256, "n_head": 4, "n_kv_head": 2,
                               "intermediate_size": 256, "vocab_size": 512})
        engines, prefills, samples = {}, {}, {}
        save_gguf(base, tokenizer, Path(tmp) / "f32.gguf", "f32")
        save_gguf(Transformer(small_config), synthetic_tokenizer(512), Path(tmp) / "small-f32.gguf", "f32")
        save_gguf(wide, wide_tokenizer, Path(tmp) / "wide-f32.gguf", "f32")
        save_gguf(Transformer(small_wide), synthetic_tokenizer(512), Path(tmp) / "small-wide-f32.gguf", "f32")
        for kind in (*TYPES, *LLAMA_CPP_MIXES, *PURE_K):
            path, small = Path(tmp) / f"{kind}.gguf", Path(tmp) / f"small-{kind}.gguf"
            if kind in LLAMA_CPP_MIXES:
                llama_cpp_quantize(Path(tmp) / "f32.gguf", path, LLAMA_CPP_MIXES[kind])
                llama_cpp_quantize(Path(tmp) / "small-f32.gguf", small, LLAMA_CPP_MIXES[kind])
            elif kind in PURE_K:
                llama_cpp_quantize(Path(tmp) / "wide-f32.gguf", path, PURE_K[kind][1], pure=True)
                llama_cpp_quantize(Path(tmp) / "small-wide-f32.gguf", small, PURE_K[kind][1], pure=True)
            else:
                save_gguf(base, tokenizer, path, kind)
                save_gguf(Transformer(small_config), synthetic_tokenizer(512), small, kind)
            packed, float_ = load_cost(path, small, False), load_cost(path, small, True)
            result["files"][kind] = {"file_bytes": path.stat().st_size, "packed_rss_bytes": packed[0],
                                     "packed_load_s": packed[1], "float_rss_bytes": float_[0],
                                     "float_load_s": float_[1]}
            print(f"  {kind}: file {path.stat().st_size / 1e6:.0f} MB, loading peak {packed[0] / 1e6:.0f} MB kept "
                  f"quantized ({packed[1]:.2f} s), {float_[0] / 1e6:.0f} MB dequantized ({float_[1]:.2f} s)",
                  flush=True)
            model, _, gguf_tokenizer = load_gguf(path)
            ids, long_ids = (prompt, long_prompt) if kind not in PURE_K else (
                [t % WIDE["vocab_size"] for t in prompt], [t % WIDE["vocab_size"] for t in long_prompt])
            engines[f"gguf-{kind}"] = model_engine(model, gguf_tokenizer, ids, args.new_tokens)[0]
            prefills[f"gguf-{kind}"] = model_engine(model, gguf_tokenizer, long_ids, 1)[1]
            if kind in TYPES:
                engines[f"quantized-{kind}"] = our_engine(base, tokenizer, torch.float32, kind, {}, ids,
                                                          args.new_tokens)[0]
            elif kind in PURE_K:
                engines[f"quantized-{kind}"] = our_engine(wide, wide_tokenizer, torch.float32, PURE_K[kind][0], {},
                                                          ids, args.new_tokens)[0]
            engines[f"llama-bench-{kind}"] = llama_bench_engine(path, ids)[0]
            prefills[f"llama-bench-{kind}"] = llama_bench_engine(path, long_ids)[1]
        samples = {name: [] for name in [*engines, *(f"{n}-prefill" for n in prefills)]}
        for decode in engines.values():  # warm-up
            decode(2)
        for prefill in prefills.values():
            prefill()
        for r in range(args.rounds):
            for name, decode in engines.items():
                samples[name].append((args.new_tokens - 1) / decode(args.new_tokens))
            for name, prefill in prefills.items():
                samples[f"{name}-prefill"].append(len(long_prompt) / _prefill_seconds(prefill))
            print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {s[-1]:.0f}" for n, s in samples.items()),
                  flush=True)
    for kind in result["files"]:
        for engine, key in (("gguf", "gguf_decode"), ("quantized", "quantized_decode"),
                            ("llama-bench", "llama_bench_decode"), ("gguf", "gguf_prefill"),
                            ("llama-bench", "llama_bench_prefill")):
            s = samples.get(f"{engine}-{kind}" + ("-prefill" if key.endswith("prefill") else ""))
            if s:
                result["files"][kind][f"{key}_tok_s"] = statistics.median(s)
                result["files"][kind][f"{key}_range"] = [min(s), max(s)]
    print("\n" + render_table(result))
    write_result(Path(args.out), result, "bench/bench_gguf_load.py", sys.argv[1:], torch.get_num_threads())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
