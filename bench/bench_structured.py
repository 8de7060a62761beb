"""Structured output's cost: constrained against unconstrained decoding tokens/s, same model, same run.

The smollm2-135m shapes (30 layers, 576 wide, GQA 9/3) with random weights, over a real
byte-level BPE: GPT-2's 50,257 tokens from the shared data (SmolLM2's own 49,152-token
vocabulary is not there; the two are the same kind and nearly the same size, and the mask's
cost follows the vocabulary). The model's vocabulary is set to the tokenizer's.

Workloads, each at batch 1 and batch 8, every row running exactly --new-tokens tokens
(ignore_eos; the constraints cannot be complete sooner):
- free: no constraint;
- json_schema: an array of at least 100 extraction records (company, date, total revenue):
  keys, strings, dates and numbers in turn; at batch 8 every row has a schema of its own;
- regex: capitalised words and numbers, at least 200 of them.

Decoding only is timed (the rows are prefilled first); rounds alternate the three workloads of a
batch size, medians over --rounds. Reported: tokens/s of each, constrained / free (the median of
the rounds' ratios, with their range), the time spent computing and applying masks per step
(DecodeBatch._constrain), and the engine's setup costs: the token table for the tokenizer and
the compile time of each constraint. The issue's target: constrained within 15% of free.

    python bench/bench_structured.py                      # the full benchmark (minutes)
    python bench/bench_structured.py --layers 2 --rounds 1 --new-tokens 16   # a quick check
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import ROOT, commit, machine, result_path  # noqa: E402

from emergence.config import Config  # noqa: E402
from emergence.decode import DecodeBatch, end_ids, new_row  # noqa: E402
from emergence.model import Transformer  # noqa: E402
from emergence.sampling import SamplingParams  # noqa: E402
from emergence.structured import compile_constraint, engine_tokenizer  # noqa: E402
from emergence.tokenizer import Tokenizer  # noqa: E402

TOKENIZER = ROOT.parent / "shared" / "data" / "gpt2_tokenizer"
RECORD = {"type": "object", "properties": {"company": {"type": "string"}, "date": {"type": "string", "format": "date"},
                                           "total_revenue": {"type": "number"}},
          "required": ["company", "date", "total_revenue"], "additionalProperties": False}
REGEX = r"([A-Z][a-z]+ [0-9]{1,4}, ){200,}"
PROMPTS = ["Acme Corp reported total revenue of", "The quarterly report of Globex", "Initech filed on",
           "Umbrella's revenue was", "Hooli said", "Stark Industries", "Wayne Enterprises announced", "Soylent"]


def schema_for(row: int) -> dict:
    """Row r's schema: the records, with one more property named for the row (8 distinct schemas)."""
    record = json.loads(json.dumps(RECORD))
    record["properties"][f"field_{row}"] = {"type": "integer"}
    return {"type": "array", "items": record, "minItems": 100}


def run(model, tokenizer, prompts: list[list[int]], params: list[SamplingParams], backend: str) -> dict:
    """Prefill, then time the decoding steps alone."""
    device = model.tok_embeddings.weight.device
    eos = end_ids(model.config, tokenizer)
    rows = [new_row(i, p, sp, model.config, tokenizer, eos, device) for i, (p, sp) in enumerate(zip(prompts, params))]
    batch = DecodeBatch.for_rows(model, tokenizer, rows, backend=backend)
    masking = [0.0]
    constrain = batch._constrain

    def timed(logits):
        start = time.perf_counter()
        out = constrain(logits)
        masking[0] += time.perf_counter() - start
        return out

    batch._constrain = timed
    batch.admit(rows)
    tokens, steps = 0, 0
    start = time.perf_counter()
    while batch.rows:
        for _, chunk in batch.step():
            tokens += len(chunk.token_ids)
        steps += 1
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "steps": steps, "mask_seconds": masking[0]}


WORKLOADS = ("free", "json_schema", "regex")


def workload(tokenizer, name: str, batch: int, new: int, compile_ms: dict) -> tuple[list, list]:
    """The prompts and sampling parameters (with their compiled constraints) of one workload."""
    prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
    params = []
    for i in range(batch):
        constraint = None
        if name != "free":
            start = time.perf_counter()
            constraint = (compile_constraint(tokenizer, json_schema=schema_for(i)) if name == "json_schema"
                          else compile_constraint(tokenizer, regex=REGEX))
            compile_ms.setdefault(name, []).append((time.perf_counter() - start) * 1e3)
        params.append(SamplingParams(temperature=0.8, seed=i, max_new_tokens=new, ignore_eos=True,
                                     constraint=constraint))
    return prompts, params


def batch_rounds(model, tokenizer, batch: int, new: int, rounds: int, backend: str, compile_ms: dict) -> list[dict]:
    """Every workload at one batch size, round by round (the order alternating), so this shared
    machine's drifting speed falls on all three alike; constrained / free is the median of the
    rounds' own ratios."""
    loads = {name: workload(tokenizer, name, batch, new, compile_ms) for name in WORKLOADS}
    for name in WORKLOADS:
        run(model, tokenizer, *loads[name], backend)  # warm-up
    runs: dict[str, list[dict]] = {name: [] for name in WORKLOADS}
    for r in range(rounds):
        for name in (WORKLOADS if r % 2 == 0 else WORKLOADS[::-1]):
            runs[name].append(run(model, tokenizer, *loads[name], backend))
            assert runs[name][-1]["tokens"] == new * batch, (name, runs[name][-1]["tokens"])  # whole budgets
    results = []
    for name, rs in runs.items():
        rates = [x["tokens"] / x["seconds"] for x in rs]
        ratios = [a / (f["tokens"] / f["seconds"]) for a, f in zip(rates, runs["free"])]
        per_step = {k: [1e3 * x[k] / x["steps"] for x in rs] for k in ("seconds", "mask_seconds")}
        results.append({"workload": name, "batch": batch, "new_tokens": new, "tok_s": round(statistics.median(rates), 2),
                        "step_ms": round(statistics.median(per_step["seconds"]), 3),
                        "mask_ms_per_step": round(statistics.median(per_step["mask_seconds"]), 3),
                        "range_tok_s": [round(min(rates), 2), round(max(rates), 2)],
                        "vs_free": round(statistics.median(ratios), 3),
                        "vs_free_range": [round(min(ratios), 3), round(max(ratios), 3)]})
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than smollm2-135m's 30 (a quick check)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", type=Path, default=ROOT / result_path("structured"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.load(TOKENIZER)
    start = time.perf_counter()
    engine_tokenizer(tokenizer)
    table_ms = (time.perf_counter() - start) * 1e3
    overrides = {"vocab_size": tokenizer.vocab_size, "eos_token_id": tokenizer.eos_id, "bos_token_id": tokenizer.bos_id}
    if args.layers:
        overrides["n_layer"] = args.layers
    config = Config.from_name("smollm2-135m", **overrides)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    print(f"smollm2-135m shapes ({config.n_layer} layers, {config.n_embd} wide), random weights, GPT-2 tokenizer "
          f"({tokenizer.vocab_size} tokens); {torch.get_num_threads()} threads; token table {table_ms:.0f} ms",
          flush=True)
    compile_ms: dict = {}
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        for r in batch_rounds(model, tokenizer, batch, args.new_tokens, args.rounds, args.backend, compile_ms):
            r["within_15_percent"] = r["vs_free"] >= 0.85
            results.append(r)
            print(f"  batch {batch:2d} {r['workload']:12s} {r['tok_s']:8.1f} tok/s  step {r['step_ms']:.2f} ms  "
                  f"masks {r['mask_ms_per_step']:.3f} ms/step  vs free {r['vs_free']:.3f} "
                  f"({r['vs_free_range'][0]:.3f}-{r['vs_free_range'][1]:.3f})", flush=True)
    print("\n| batch | workload | tok/s | vs free (rounds) | masks ms/step | step ms |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['batch']} | {r['workload']} | {r['tok_s']:.1f} | {r['vs_free']:.3f} ({r['vs_free_range'][0]:.3f}-"
              f"{r['vs_free_range'][1]:.3f}) | {r['mask_ms_per_step']:.3f} | {r['step_ms']:.2f} |")
    import llguidance

    out = {"date": datetime.date.today().isoformat(), "commit": commit(), "machine": machine(),
           "command": "python bench/bench_structured.py " + " ".join(sys.argv[1:]),
           "model": {"shapes": "smollm2-135m", "n_layer": config.n_layer, "n_embd": config.n_embd,
                     "vocab_size": config.vocab_size, "weights": "random fp32", "tokenizer": "GPT-2 byte-level BPE"},
           "engine": {"name": "llguidance", "version": llguidance.__version__, "token_table_ms": round(table_ms, 1),
                      "compile_ms_median": {k: round(statistics.median(v), 2) for k, v in compile_ms.items()}},
           "threads": torch.get_num_threads(), "results": results,
           "target_met": all(r["within_15_percent"] for r in results)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
