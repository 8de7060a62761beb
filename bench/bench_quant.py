"""Batch-1 CPU decoding at every precision: emergence vs llama.cpp on the same weights, same run.

The smollm2-135m architecture (30 layers, 576 wide, GQA 9/3, vocab 49152, tied head) with
random weights. emergence runs it in fp32, bf16, and quantized to int8, q8_0, int4 (group
32), q4_0, nf4 and ternary (b1.58, with and without 8-bit activations), every linear layer
including the output head. llama.cpp runs the same weights exported with `emergence convert`
to GGUF F32, F16, BF16, Q8_0 and Q4_0, twice: natively, with its own `llama-bench` (built from
the source llama-cpp-python 0.3.36 vendors: bench/llama_cpp_source.py; `-p 128 -n 64 -t 2`,
one repetition per round: its pp128 and tg64), and through llama-cpp-python's Python loop
(one `eval` per token, 2 threads), which adds Python's overhead to llama.cpp's side.

Decode tokens/s: N - 1 tokens over the time from the first generated token to the last,
emergence's `stream` (the user path: sampling and detokenization included) and
llama-cpp-python's single-token evaluations, both greedy from the same prompt (prefill times
are kept out: they vary more than a few decode steps take); llama-bench's tg64 as it reports
it. emergence's bare step: N - 1 calls of the decode backend's forward alone (one token, no
sampling), so the table shows what the Python layer costs. Prefill tokens/s: the prompt through
the backend `stream` prefills it with (the native plan up to its max_prefill, else the eager
forward; llama-bench: pp128). Effective
bandwidth = decode tok/s x bytes of weights read per token, against the machine's memory read
bandwidth measured around each decode (the best of several read kernels, so no engine exceeds
it, just before and just after, the higher of the two: a virtual machine's bandwidth can change
by half from one second to the next); the share is the median of the rounds' shares.

    python bench/bench_quant.py [--new-tokens 64] [--prompt 128] [--rounds 5] [--engines a,b,...]

Rounds interleave the engines (the machine's bandwidth drifts); rates are medians. Writes
bench/results/quant.json, or quant_amd.json on an AMD CPU (the kernels choose differently
there: kernels/gemv_rows.h, blas.h); the README's tables are `render_table` of each.
"""

from __future__ import annotations

import argparse
import copy
import functools
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
from emergence.allocator import huge_page_weights
from emergence.decode import make_backend
from emergence.generate import stream
from emergence.kernels.fused_decode import unsupported
from emergence.kv_cache import PagedKVCache
from emergence.model import Transformer
from emergence.quant.linear import QuantizedLinear, quantize_model
from emergence.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import result_path, write_result  # noqa: E402
from emergence.weights.gguf_model import save_gguf

# engine name -> (how emergence builds it, or the llama.cpp GGUF type), and its peer
OURS = {"fp32": (torch.float32, None, {}), "bf16": (torch.bfloat16, None, {}),
        "int8": (torch.float32, "int8", {}), "q8_0": (torch.float32, "q8_0", {}),
        "int4-g32": (torch.float32, "int4", {"group_size": 32}), "q4_0": (torch.float32, "q4_0", {}),
        "nf4": (torch.float32, "nf4", {}), "ternary": (torch.float32, "ternary", {}),
        "ternary-a8": (torch.float32, "ternary", {"act_bits": 8})}
THEIRS = {"llama.cpp F32": "f32", "llama.cpp F16": "f16", "llama.cpp Q8_0": "q8_0", "llama.cpp Q4_0": "q4_0"}
NATIVE = {"llama-bench F32": "f32", "llama-bench F16": "f16", "llama-bench BF16": "bf16", "llama-bench Q8_0": "q8_0",
          "llama-bench Q4_0": "q4_0"}
# emergence's format -> its llama.cpp peer (the GGUF type of the same precision)
PEER_TYPE = {"fp32": "F32", "bf16": "F16", "int8": "Q8_0", "q8_0": "Q8_0", "int4-g32": "Q4_0", "q4_0": "Q4_0",
             "nf4": "Q4_0"}


def measure_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """GB/s of reading memory: the best of several read kernels over n_bytes (a sum, a max, the
    native fp32 GEMV over the same bytes as a matrix), so no engine's effective rate exceeds it.
    The buffer is kept between calls (the probe runs around every decode)."""
    x = _probe_buffer(n_bytes)
    kernels = [lambda: x.sum(), lambda: x.amax()]
    from emergence.kernels import gemv_extension

    extension = gemv_extension()
    if extension is not None:
        w, v = x.view(-1, 4096), torch.ones(4096)
        kernels.append(lambda: extension.gemv(v, w, None))
    best = float("inf")
    for kernel in kernels:
        kernel()
        best = min(best, *(_timed(kernel) for _ in range(repeats)))
    return n_bytes / best / 1e9


@functools.cache
def _probe_buffer(n_bytes: int) -> torch.Tensor:
    return torch.ones(n_bytes // 4, dtype=torch.float32)


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
    """Bytes of every matrix read for one token: all linear layers (the output head included);
    a quantized layer's as its native kernel reads them (ternary: the 2-bit repacking, not the
    int8 values stored)."""
    total = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            ops = m.kernel_operands()
            read = [ops.data, ops.scales, ops.offsets] if ops is not None else list(m.buffers())
            total += sum(t.numel() * t.element_size() for t in read if t is not None)
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def our_engine(base: Transformer, tokenizer: Tokenizer, dtype, fmt, options, prompt: list[int], new_tokens: int):
    model = copy.deepcopy(base).to(dtype)
    if fmt is not None:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie: quantize it too
        model.config.tie_embeddings = False
        quantize_model(model, fmt, skip=(), **options)
    huge_page_weights(model)  # as emergence.load places a model's weights
    return (*model_engine(model, tokenizer, prompt, new_tokens), weight_bytes_per_token(model),
            unsupported(model) is None)


def model_engine(model: Transformer, tokenizer: Tokenizer, prompt: list[int], new_tokens: int):
    """(decode, prefill, step) of emergence on `model`: decode(n) the seconds of tokens 2..n
    through `stream` (the user path: sampling and detokenization included); prefill() the
    prompt through the backend a decode batch picks (native up to its max_prefill, else the
    eager forward), as `stream` prefills it; step(n) the seconds of n - 1 bare decoding steps
    after it (the backend's forward alone: what the Python layer adds is decode - step)."""
    cache = PagedKVCache(model.config, -(-(len(prompt) + new_tokens + 1) // 16), block_size=16, dtype=model.dtype)
    table: list[int] = []
    cache.grow(table, 0, len(prompt) + new_tokens + 1)
    backend = make_backend(model, cache, "auto")

    def decode(n: int) -> float:
        chunks = stream(model, tokenizer, prompt, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))
        next(chunks)
        start = time.perf_counter()
        for _ in chunks:
            pass
        return time.perf_counter() - start

    def prefill():
        with torch.inference_mode():
            return backend.forward([prompt], [0], [table])

    def step(n: int) -> float:
        token = int(prefill()[0].argmax())
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(n - 1):
                backend.forward([[token]], [len(prompt) + i], [table])
        return time.perf_counter() - start

    return decode, prefill, step


def llama_cpp_engine(path: Path, prompt: list[int], threads: int = 2):
    """llama-cpp-python's loop on the file, on `threads` threads: decode(n) the seconds of tokens
    2..n, one eval a token; prefill() the prompt in one eval."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_threads=threads, n_batch=512, verbose=False)

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


def llama_bench_engine(path: Path, prompt: list[int], threads: int = 2):
    """llama.cpp's own llama-bench on the file, on `threads` threads: decode(n) is its tg(n - 1),
    prefill() its pp over the prompt's length, each one repetition, as it times them (its process
    start and loading excluded)."""
    import subprocess

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llama_cpp_source import llama_cpp_binary

    binary = llama_cpp_binary("llama-bench")

    def run(n_prompt: int, n_gen: int) -> float:
        out = subprocess.run([str(binary), "-m", str(path), "-p", str(n_prompt), "-n", str(n_gen), "-r", "1",
                              "-t", str(threads), "-o", "json"], capture_output=True, text=True, check=True).stdout
        (test,) = json.loads(out)
        return (n_prompt + n_gen) / test["avg_ts"]  # seconds for the test

    return (lambda n: run(0, n - 1)), (lambda: run(len(prompt), 0))


def render_table(result: dict) -> str:
    """The README's table: each emergence format against llama.cpp's own binary (llama-bench) and
    against llama-cpp-python's loop, on the same weights."""
    engines, bandwidth = result["engines"], result["bandwidth_gb_s"]
    lines = ["| emergence | weights MB/token | decode tok/s (range) | bare step tok/s | llama-bench peer: tg64 tok/s | ratio "
             "| llama-cpp-python loop tok/s | ratio | prefill tok/s | llama-bench pp128 | ratio | % of bandwidth |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in engines.items():
        if name not in OURS:
            continue
        peer = PEER_TYPE.get(name)
        native, loop = engines.get(f"llama-bench {peer}"), engines.get(f"llama.cpp {peer}")
        cells = [name, f"{r['weight_bytes'] / 1e6:.0f}",
                 f"{r['decode_tok_s']:.1f} ({r['decode_range'][0]:.0f}-{r['decode_range'][1]:.0f})",
                 f"{r['step_tok_s']:.1f}" if "step_tok_s" in r else "-"]
        cells += [f"{peer} {native['decode_tok_s']:.1f}", f"{r['decode_tok_s'] / native['decode_tok_s']:.2f}x"] \
            if native else ["-", "-"]
        cells += [f"{loop['decode_tok_s']:.1f}", f"{r['decode_tok_s'] / loop['decode_tok_s']:.2f}x"] if loop else ["-", "-"]
        cells.append(f"{r['prefill_tok_s']:.0f}")
        cells += [f"{native['prefill_tok_s']:.0f}", f"{r['prefill_tok_s'] / native['prefill_tok_s']:.2f}x"] \
            if native else ["-", "-"]
        if "bandwidth_share" in r:  # the median of the rounds' shares, each against its round's bandwidth
            low, high = r["bandwidth_share_range"]
            cells.append(f"{100 * r['bandwidth_share']:.0f}% ({100 * low:.0f}-{100 * high:.0f})")
        else:  # files written before the per-round probe
            cells.append(f"{100 * r['decode_tok_s'] * r['weight_bytes'] / 1e9 / bandwidth:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    if "llama-bench BF16" in engines and "bf16" in engines:
        bf16 = engines["llama-bench BF16"]
        lines.append(f"\nllama-bench on the BF16 file (emergence exports BF16): tg64 {bf16['decode_tok_s']:.1f} tok/s "
                     f"(bf16 {engines['bf16']['decode_tok_s'] / bf16['decode_tok_s']:.2f}x), pp128 "
                     f"{bf16['prefill_tok_s']:.0f} tok/s.")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engines", default=",".join(list(OURS) + list(NATIVE) + list(THEIRS)))
    parser.add_argument("--out", default=result_path("quant"))
    args = parser.parse_args()
    chosen = args.engines.split(",")
    unknown = [e for e in chosen if e not in OURS and e not in THEIRS and e not in NATIVE]
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
                decode, prefill, step, nbytes, fused = our_engine(base, tokenizer, *OURS[name], prompt,
                                                                  args.new_tokens)
                if not fused:
                    print(f"  ({name}: no fused native decode here; eager path)", flush=True)
            else:
                kind = THEIRS.get(name) or NATIVE[name]
                path = Path(tmp) / f"{kind}.gguf"
                if not path.exists():
                    save_gguf(base, tokenizer, path, kind)
                decode, prefill = (llama_cpp_engine if name in THEIRS else llama_bench_engine)(path, prompt)
                step, nbytes = None, _gguf_matrix_bytes(path)
            engines[name] = (decode, prefill, step)
            weight_bytes[name] = nbytes
        samples = {n: {"decode": [], "prefill": [], "step": [], "bandwidth": []} for n in engines}
        for decode, prefill, step in engines.values():  # warm-up
            decode(2), prefill()
        for r in range(args.rounds):
            for name, (decode, prefill, step) in engines.items():
                before = measure_bandwidth(repeats=3)  # around each decode: the higher of the two
                samples[name]["decode"].append((args.new_tokens - 1) / decode(args.new_tokens))
                samples[name]["bandwidth"].append(max(before, measure_bandwidth(repeats=3)))
                samples[name]["prefill"].append(len(prompt) / _prefill_seconds(prefill))
                if step is not None:
                    samples[name]["step"].append((args.new_tokens - 1) / step(args.new_tokens))
            print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
                f"{n} {s['decode'][-1]:.0f} ({s['bandwidth'][-1]:.0f} GB/s)" for n, s in samples.items()), flush=True)

    probes = [gb_s for s in samples.values() for gb_s in s["bandwidth"]]
    result = {"bandwidth_gb_s": statistics.median(probes), "bandwidth_range_gb_s": [min(probes), max(probes)],
              "bandwidth_at_start_gb_s": bandwidth, "rounds": args.rounds, "new_tokens": args.new_tokens,
              "prompt_tokens": args.prompt, "engines": {}}
    for name, s in samples.items():
        decode, prefill = statistics.median(s["decode"]), statistics.median(s["prefill"])
        shares = [rate * weight_bytes[name] / 1e9 / gb_s for rate, gb_s in zip(s["decode"], s["bandwidth"])]
        result["engines"][name] = {"decode_tok_s": decode, "prefill_tok_s": prefill, "weight_bytes": weight_bytes[name],
                                   "decode_range": [min(s["decode"]), max(s["decode"])],
                                   "bandwidth_gb_s": s["bandwidth"], "bandwidth_share": statistics.median(shares),
                                   "bandwidth_share_range": [min(shares), max(shares)]}
        if s["step"]:
            result["engines"][name]["step_tok_s"] = statistics.median(s["step"])
    print("\n" + render_table(result))
    write_result(Path(args.out), result, "bench/bench_quant.py", sys.argv[1:], torch.get_num_threads())
    return 0


def _prefill_seconds(prefill) -> float:
    """A prefill's seconds: as the engine reports them (llama-bench), else timed here."""
    start = time.perf_counter()
    reported = prefill()
    took = time.perf_counter() - start
    return reported if isinstance(reported, float) else took


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
