"""Quantized GGUF files as emergence loads them: memory, load time and decode speed, same run.

The smollm2-135m architecture with random weights (as bench_quant.py), exported by emergence
to GGUF Q8_0 and Q4_0 (every matrix in the type, the tied token table included). For each file:

- its size, and the peak resident memory while loading it in a fresh process (growth over the
  process before, its modules imported), kept quantized (`emergence.load`: the file's blocks in
  GGMLLinear / GGMLEmbedding layers) and dequantized to float32 (`dequantize=True`, how every
  GGUF loaded before); seconds to load each way;
- batch-1 decode tokens/s of emergence on the loaded file (`stream`, the user path) beside
  the same weights quantized by emergence itself (bench_quant.py's q8_0 / q4_0 engine: every
  linear layer, the head included) and llama.cpp's own llama-bench on the same file (tg), the
  engines interleaved round by round; medians, with their ranges.

    python bench/bench_gguf_load.py [--rounds 5] [--new-tokens 64]

Writes bench/results/gguf_load.json; the README's table is `render_table` of it.
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
from bench_quant import llama_bench_engine, model_engine, our_engine, synthetic_tokenizer  # noqa: E402
from provenance import write_result  # noqa: E402

from emergence import Config  # noqa: E402
from emergence.model import Transformer  # noqa: E402
from emergence.weights.gguf_model import load_gguf, save_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TYPES = ("q8_0", "q4_0")
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
    """The README's table: per GGUF type, memory to load and decode speed."""
    rows = ["| GGUF file | size | peak RSS loading it (kept quantized) | loading it dequantized to fp32 | "
            "emergence decode on the file, tok/s (range) | the same weights quantized by emergence | "
            "llama-bench on the file (tg) |", "|---|---|---|---|---|---|---|"]

    def rate(r: dict, key: str) -> str:
        lo, hi = r[f"{key}_range"]
        return f"{r[f'{key}_tok_s']:.0f} ({lo:.0f}-{hi:.0f})"

    for kind, r in result["files"].items():
        size = r["file_bytes"]
        rows.append(f"| {kind.upper()} | {size / 1e6:.0f} MB | {r['packed_rss_bytes'] / 1e6:.0f} MB "
                    f"({r['packed_rss_bytes'] / size:.2f}x), {r['packed_load_s']:.2f} s | "
                    f"{r['float_rss_bytes'] / 1e6:.0f} MB ({r['float_rss_bytes'] / size:.1f}x), "
                    f"{r['float_load_s']:.2f} s | {rate(r, 'gguf_decode')} | {rate(r, 'quantized_decode')} | "
                    f"{rate(r, 'llama_bench_decode')} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gguf_load.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    config = Config.from_name("smollm2-135m")
    base = Transformer(config).eval()
    tokenizer = synthetic_tokenizer(config.vocab_size)
    prompt = torch.randint(3, config.vocab_size, (16,)).tolist()
    print(f"smollm2-135m architecture, random weights; {torch.get_num_threads()} threads", flush=True)
    result = {"rounds": args.rounds, "new_tokens": args.new_tokens, "files": {}}
    with tempfile.TemporaryDirectory() as tmp:
        small_config = Config(**{**config.to_dict(), "n_layer": 1, "n_embd": 64, "n_head": 2, "n_kv_head": 1,
                                 "intermediate_size": 64, "vocab_size": 512})
        engines, samples = {}, {}
        for kind in TYPES:
            path, small = Path(tmp) / f"{kind}.gguf", Path(tmp) / f"small-{kind}.gguf"
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
            engines[f"gguf-{kind}"] = model_engine(model, gguf_tokenizer, prompt, args.new_tokens)[0]
            engines[f"quantized-{kind}"] = our_engine(base, tokenizer, torch.float32, kind, {}, prompt, args.new_tokens)[0]
            engines[f"llama-bench-{kind}"] = llama_bench_engine(path, prompt)[0]
        samples = {name: [] for name in engines}
        for decode in engines.values():  # warm-up
            decode(2)
        for r in range(args.rounds):
            for name, decode in engines.items():
                samples[name].append((args.new_tokens - 1) / decode(args.new_tokens))
            print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {s[-1]:.0f}" for n, s in samples.items()),
                  flush=True)
    for kind in TYPES:
        for engine, key in (("gguf", "gguf_decode"), ("quantized", "quantized_decode"),
                            ("llama-bench", "llama_bench_decode")):
            s = samples[f"{engine}-{kind}"]
            result["files"][kind][f"{key}_tok_s"] = statistics.median(s)
            result["files"][kind][f"{key}_range"] = [min(s), max(s)]
    print("\n" + render_table(result))
    write_result(Path(args.out), result, "bench/bench_gguf_load.py", sys.argv[1:], torch.get_num_threads())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
