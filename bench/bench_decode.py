"""Batch-1 decode and prefill speed: emergence vs transformers on the same weights, same run.

The smollm2-135m architecture (30 layers, 576 wide, GQA 9/3, vocab 49152) with random
weights, in fp32 and bf16. Decode tokens/s is measured as (N - 1) / (t(N tokens) - t(1 token))
for both libraries, so prefill and set-up cancel out; prefill tokens/s is one forward pass over
a PROMPT-token prompt, both libraries computing the last position's logits only
(transformers' `logits_to_keep=1`). The hardware limit: each decoded token reads every weight
once, so tokens/s x weight bytes is compared with the machine's memory read bandwidth (the best
of several read kernels: bench_quant.measure_bandwidth), probed before and after every round.

    python bench/bench_decode.py [--new-tokens 64] [--prompt 128] [--rounds 7]

Rates are medians over rounds; the machine's bandwidth drifts, so rounds interleave the
engines and the table gives each engine's range. Writes bench/results/decode.json
(decode_amd.json on an AMD CPU); the README's table is `render_table` of it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from tokenizers import Tokenizer as Backend
from tokenizers import models

import emergence
from emergence import Config, SamplingParams, generate
from emergence.kernels.fused_decode import unsupported
from emergence.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quant import measure_bandwidth  # noqa: E402
from provenance import result_path, write_result  # noqa: E402


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_dtype(folder: Path, dtype: torch.dtype, prompt: list[int], new_tokens: int, rounds: int) -> dict:
    """Median rates over `rounds`; each round measures every engine once, back to back, so a
    shared machine's drifting memory bandwidth affects all engines alike, and probes the bandwidth
    around itself: each engine's share of the read bandwidth is of its own round's."""
    import transformers

    engines = {"transformers": transformers_engine(
        transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval(), prompt)}
    for name, backend in (("emergence", "auto"), ("emergence-torch-ops", "eager")):
        lm = emergence.load(folder, device="cpu", dtype=dtype, backend=backend)
        if backend == "auto" and unsupported(lm.model) is not None:
            print(f"  (no native decode step: {unsupported(lm.model)}; emergence uses torch ops only)")
        engines[name] = emergence_engine(lm, prompt)
    model = lm.model
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    samples: dict[str, dict[str, list[float]]] = {
        n: {"decode_tok_s": [], "prefill_tok_s": [], "bandwidth_share": []} for n in engines}
    for name, (generate_n, prefill) in engines.items():  # warm-up
        generate_n(2), prefill()
    bandwidths = []
    for _ in range(rounds):
        before = measure_bandwidth()
        for name, (generate_n, prefill) in engines.items():
            t1 = _timed(lambda: generate_n(1))
            tn = _timed(lambda: generate_n(new_tokens))
            samples[name]["decode_tok_s"].append((new_tokens - 1) / (tn - t1))
            samples[name]["prefill_tok_s"].append(len(prompt) / _timed(prefill))
        # The round's bandwidth: the higher of the probes just before and just after it (the
        # machine's bandwidth drifts by 2x within minutes here; one probe at the start over-states shares).
        bandwidths.append(max(before, measure_bandwidth()))
        for s in samples.values():
            s["bandwidth_share"].append(s["decode_tok_s"][-1] * weight_bytes / 1e9 / bandwidths[-1])
    result = {}
    for name, s in samples.items():
        result[name] = {k: statistics.median(v) for k, v in s.items()}
        result[name]["decode_range"] = [min(s["decode_tok_s"]), max(s["decode_tok_s"])]
        result[name]["bandwidth_share_range"] = [min(s["bandwidth_share"]), max(s["bandwidth_share"])]
        print(f"  {name:20} decode {result[name]['decode_tok_s']:7.1f} tok/s (range {min(s['decode_tok_s']):.1f}-"
              f"{max(s['decode_tok_s']):.1f}, {100 * result[name]['bandwidth_share']:.0f}% of the read bandwidth)"
              f"   prefill {result[name]['prefill_tok_s']:8.1f} tok/s", flush=True)
    result["weight_bytes"] = weight_bytes
    result["bandwidth_rounds_gb_s"] = bandwidths
    return result


def transformers_engine(hf, prompt: list[int]):
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)

    def generate_n(n: int):
        with torch.inference_mode():
            hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    def prefill():
        with torch.inference_mode():
            hf(ids, attention_mask=mask, logits_to_keep=1)

    return generate_n, prefill


def emergence_engine(lm, prompt: list[int]):
    ids = torch.tensor([prompt])

    def generate_n(n: int):
        generate(lm.model, lm.tokenizer, [prompt], SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True),
                 backend=lm.backend)

    def prefill():
        with torch.inference_mode():
            lm.model(ids, last_logits_only=True)

    return generate_n, prefill


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--out", default=result_path("decode"))
    args = parser.parse_args()

    import transformers

    torch.manual_seed(0)
    config = Config.from_name("smollm2-135m")
    hf_config = transformers.AutoConfig.for_model(**config.to_hf())
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        transformers.AutoModelForCausalLM.from_config(hf_config).save_pretrained(folder)
        # A word-level tokenizer over the model's ids: the benchmark feeds token ids directly.
        vocab = {f"t{i}": i for i in range(config.vocab_size)}
        Tokenizer(Backend(models.WordLevel(vocab, unk_token="t1")), eos_token="t0").save(folder)
        prompt = torch.randint(1, config.vocab_size, (args.prompt,)).tolist()
        bandwidth = measure_bandwidth()
        print(f"smollm2-135m architecture, random weights; torch {torch.__version__}, transformers "
              f"{transformers.__version__}, {torch.get_num_threads()} threads; memory read bandwidth "
              f"{bandwidth:.1f} GB/s", flush=True)
        results = {"bandwidth_gb_s": bandwidth, "rounds": args.rounds, "new_tokens": args.new_tokens,
                   "prompt_tokens": args.prompt, "transformers": transformers.__version__}
        for name in args.dtypes.split(","):
            print(f"{name}:", flush=True)
            results[name] = bench_dtype(folder, dtypes[name], prompt, args.new_tokens, args.rounds)

    print("\n" + render_table(results, args.dtypes.split(",")))
    write_result(Path(args.out), results, "bench/bench_decode.py", sys.argv[1:], torch.get_num_threads())
    return 0


def render_table(results: dict, dtypes: list[str] = ("fp32", "bf16")) -> str:
    """The README's table."""
    lines = ["| dtype | engine | decode tok/s (range) | vs transformers | prefill tok/s | vs transformers "
             "| % of bandwidth (decode) |", "|---|---|---|---|---|---|---|"]
    for name in dtypes:
        r = results[name]
        theirs = r["transformers"]
        for engine in ("transformers", "emergence-torch-ops", "emergence"):
            e = r[engine]
            lo, hi = e["decode_range"]
            if "bandwidth_share" in e:  # the median of the rounds' shares, each of its round's bandwidth
                share = (f"{100 * e['bandwidth_share']:.0f}% ({100 * e['bandwidth_share_range'][0]:.0f}-"
                         f"{100 * e['bandwidth_share_range'][1]:.0f})")
            else:  # a result from before the probe ran around every round: one probe at the start
                share = f"{100 * e['decode_tok_s'] * r['weight_bytes'] / 1e9 / results['bandwidth_gb_s']:.0f}%"
            lines.append(f"| {name} | {engine} | {e['decode_tok_s']:.1f} ({lo:.1f}-{hi:.1f}) | "
                         f"{e['decode_tok_s'] / theirs['decode_tok_s']:.2f}x | {e['prefill_tok_s']:.0f} | "
                         f"{e['prefill_tok_s'] / theirs['prefill_tok_s']:.2f}x | {share} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
