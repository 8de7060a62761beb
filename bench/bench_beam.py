"""T5 and beam-search generation speed: emergence vs transformers on the same weights, same run.

Two workloads, batch 1, CPU, fp32, random weights (no end token: every run makes exactly
NEW tokens per beam):

- the t5-small shapes (6 + 6 layers, d_model 512, vocab 32128): a SOURCE-token source, greedy
  and 4-beam generation of NEW tokens;
- the smollm2-135m shapes (30 layers, 576 wide, vocab 49152): a SOURCE-token prompt, 4 beams.

Each engine gets one untimed warm-up, then ROUNDS rounds interleave the engines; the figure is
the median wall time of a whole `generate` call (encoder, prefill and every step), and the
ratio transformers' time / ours. The hardware limit beside them: a step reads every decoder
weight once, so (steps x decoder weight bytes) / time is compared with the machine's memory
read bandwidth.

    python bench/bench_beam.py [--new 64] [--source 32] [--rounds 5] [--out bench/results/beam.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import emergence  # noqa: E402
from emergence import SamplingParams, generate  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from bench_decode import measure_bandwidth  # noqa: E402


def word_tokenizer(vocab: int, folder: Path) -> None:
    """A word-level tokenizer over the whole vocabulary (ids in, ids out: text is not measured)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    from emergence.tokenizer import Tokenizer

    Tokenizer(Backend(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))).save(folder)


def t5_small(folder: Path):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                         decoder_start_token_id=0, eos_token_id=None, pad_token_id=0)
    model = tf.T5ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    word_tokenizer(32128, folder)
    # what a step reads: the decoder's weights but the cross-attention keys' and values' projections
    # (run once per source), and the head
    decoder_bytes = sum(p.numel() * 4 for n, p in model.named_parameters()
                        if n.startswith("decoder.") and not n.endswith(("EncDecAttention.k.weight", "EncDecAttention.v.weight")))
    return model, decoder_bytes + 32128 * 512 * 4


def smollm2(folder: Path):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                            rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    model = tf.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    word_tokenizer(49152, folder)
    return model, sum(p.numel() * 4 for p in model.parameters())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def workload(name, hf, lm, weight_bytes, source, new, beams, rounds) -> dict:
    ids = torch.tensor([source])
    params = SamplingParams(temperature=0, max_new_tokens=new, ignore_eos=True, num_beams=beams)

    def theirs():
        with torch.inference_mode():
            return hf.generate(ids, do_sample=False, num_beams=beams, max_new_tokens=new, min_new_tokens=new,
                               early_stopping=False)

    def ours():
        return generate(lm.model, lm.tokenizer, [source], params, backend=lm.backend)

    a, b = theirs(), ours()  # warm-up; both make exactly `new` tokens
    start = 1 if lm.config.is_encoder_decoder else len(source)
    assert a.shape[1] - start == new and len(b[0].token_ids) == new, (a.shape, len(b[0].token_ids))
    times = {"transformers": [], "emergence": []}
    for _ in range(rounds):
        times["transformers"].append(timed(theirs))
        times["emergence"].append(timed(ours))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"workload": name, "num_beams": beams, "source_tokens": len(source), "new_tokens": new,
            "seconds": {k: round(v, 4) for k, v in med.items()},
            "range": {k: [round(min(v), 4), round(max(v), 4)] for k, v in times.items()},
            "ratio": round(med["transformers"] / med["emergence"], 2),
            # every step reads the decoder's weights once for all the beams (both engines batch them)
            "decoder_read_gbs": {k: round(new * weight_bytes / v / 1e9, 2) for k, v in med.items()},
            "same_tokens": a[0, start:].tolist() == b[0].token_ids}


def main() -> int:
    from provenance import result_path  # bench/ is on the path: STEM.json, STEM_amd.json on an AMD CPU
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--source", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / result_path("beam"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        g = torch.Generator().manual_seed(1)
        folder = Path(tmp) / "t5"
        hf, weight_bytes = t5_small(folder)
        lm = emergence.load(str(folder), device="cpu")
        source = torch.randint(3, 32000, (args.source,), generator=g).tolist()
        for beams in (1, 4):
            results.append(workload("t5-small", hf, lm, weight_bytes, source, args.new, beams, args.rounds))
            print(json.dumps(results[-1]), flush=True)
        del hf, lm
        folder = Path(tmp) / "smollm2"
        hf, weight_bytes = smollm2(folder)
        lm = emergence.load(str(folder), device="cpu")
        prompt = torch.randint(3, 49000, (args.source,), generator=g).tolist()
        results.append(workload("smollm2-135m", hf, lm, weight_bytes, prompt, args.new, 4, args.rounds))
        print(json.dumps(results[-1]), flush=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")),
               platform.processor())
    out = {"command": "python bench/bench_beam.py " + " ".join(sys.argv[1:]), "commit": head,
           "date": datetime.date.today().isoformat(),
           "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": args.threads},
           "memory_read_gbs": round(measure_bandwidth(), 1), "results": results}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
