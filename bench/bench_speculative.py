"""Speculative decoding: speed and acceptance of a target drafted by a smaller model, same run.

Per configuration, the same prompts (8 story openings) are completed with 128 new tokens by
the target alone and by the target with a draft (`lm.complete(..., draft=...)`: the user path,
sampling, stop rules and detokenization included), at temperature 0 and at 0.8 (seeded). Rounds
alternate plain and drafted runs; medians over rounds. Reported: tokens/s of both, the speedup,
the draft's acceptance rate and tokens per round, and (temperature 0) whether the drafted
output equalled the plain output token for token.

Models (2 CPU threads, fp32): the target is emergence-6m (shipped; the issue names emergence-16m,
which is made on a GPU by bench/train_models.py and is not in this checkout). Drafts:

- `draft-1m`: the emergence-1m architecture (1.33M parameters, 4 layers x 128) trained here on
  the CPU with emergence-6m's tokenizer on the same corpus (`--make-draft DIR` runs the
  commands: `emergence prepare`, then `emergence pretrain`, 1,200 steps of 16 x 512 tokens);
- `draft-0.4m`: the same with 2 layers x 64 (0.37M parameters; `--size 0.4m`): its step reads
  a quarter of the 1m's bytes;
- `-distilled`: each trained on further on text the target wrote (sequence-level distillation:
  `--make-draft` has the target continue story openings from the corpus, half greedily and half
  sampled at temperature 1, 1M tokens, and runs `emergence pretrain --init`, 400 steps);
- `-bf16`: the distilled drafts loaded with `dtype="bf16"` (their weights rounded once):
  half the bytes a draft step reads (the target's pass pushes the draft's weights out of the
  caches every round); the target still verifies every token, so greedy output stays the
  target's own;
- `q4_0`: the target itself with every linear layer quantized to q4_0 (a self-draft).

    python bench/bench_speculative.py --make-draft runs/draft [--size 0.4m]   # about 35 / 15 minutes on 2 cores
    python bench/bench_speculative.py --draft runs/draft [--rounds 5]         # every draft made in runs/draft
    python bench/bench_speculative.py --smoke                                 # tiny: the default model drafts itself

Writes bench/results/speculative.json; the README's table is `render_table` of it.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from provenance import result_path, write_result  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
CORPUS = ["tinystories/train", "tinystories/valid", "tinyshakespeare", "text"]
PROMPTS = ["Once upon a time", "One day, a little girl named Lily", "Tom and his dog", "The sun was hot and",
           "There was a big tree in the park", "Mom said", "A small boat", "The cat and the bird"]


# The drafts --make-draft trains: the emergence-1m preset, and a smaller one whose step reads a
# quarter of the bytes (its tied 4,096 x 64 embedding is most of it). Config fields over the preset.
DRAFT_SIZES = {"1m": {}, "0.4m": {"n_embd": 64, "n_layer": 2, "n_head": 2, "n_kv_head": 2, "head_dim": 32,
                                  "intermediate_size": 192}}


def make_draft(out: Path, target: str, size: str) -> Path:
    """Train the draft of `size` (DRAFT_SIZES; see the module docstring) into OUT/SIZE, the corpus
    and the distillation text shared in OUT; resumes an interrupted run."""
    import dataclasses

    import emergence
    from emergence.config import Config

    lm = emergence.load(target)
    cli = [sys.executable, "-m", "emergence"]
    (out / size).mkdir(parents=True, exist_ok=True)
    if not (out / "shards").is_dir():
        subprocess.run(cli + ["prepare", "--tokenizer", target, "--out", str(out / "shards"),
                              *[str(SHARED / c) for c in CORPUS]], check=True)
    config = dataclasses.replace(Config.from_name("emergence-1m", vocab_size=lm.config.vocab_size,
                                                  block_size=lm.config.block_size, eos_token_id=lm.config.eos_token_id,
                                                  bos_token_id=lm.config.bos_token_id), **DRAFT_SIZES[size])
    (out / size / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    common = ["--save-best", "--no-progress", "--context", "512", "--batch-size", "16", "--weight-decay", "0.1",
              "--eval-every", "100", "--eval-batches", "10", "--checkpoint-every", "100", "--log-every", "20",
              "--seed", "1", "--device", "cpu"]
    run, distilled = out / size / "run", out / size / "distilled"
    if not (run / "model").is_dir():  # (written when the run ends)
        resume = ["--resume"] if (run / "checkpoint.pt").exists() else []
        subprocess.run(cli + ["pretrain", "--config", str(out / size / "config.json"), "--data", str(out / "shards"),
                              "--out", str(run), "--max-steps", "1200", "--lr", "3e-3", "--min-lr", "3e-4",
                              "--warmup-steps", "60", *common, *resume], check=True)
    if not (out / "distil.jsonl").exists():
        distil_corpus(lm, out / "distil.jsonl", 1_000_000)
    if not (out / "distil-shards").is_dir():
        subprocess.run(cli + ["prepare", "--tokenizer", target, "--out", str(out / "distil-shards"),
                              str(out / "distil.jsonl")], check=True)
    if not (distilled / "model").is_dir():
        resume = ["--resume"] if (distilled / "checkpoint.pt").exists() else []
        subprocess.run(cli + ["pretrain", "--init", str(run / "best"), "--data", str(out / "distil-shards"),
                              "--out", str(distilled), "--max-steps", "400", "--lr", "1e-3", "--min-lr", "1e-4",
                              "--warmup-steps", "20", *common, *resume], check=True)
    return distilled / "best"


def distil_corpus(lm, path: Path, tokens: int, batch: int = 16, new_tokens: int = 256) -> None:
    """Text the target writes: continuations of story openings (a document's first 6 words) from
    the corpus's validation text, half greedy, half sampled at temperature 1, as JSONL rows."""
    from emergence.data.shards import read_documents
    from emergence.generate import generate
    from emergence.progress import Progress
    from emergence.sampling import SamplingParams
    from emergence.tokenizer import GPT2_EOT

    docs = read_documents(next((SHARED / "tinystories" / "valid").iterdir()), GPT2_EOT)[0]
    openings = [" ".join(d.split()[:6]) for d in docs if len(d.split()) > 6]
    written, i = 0, 0
    progress = Progress(tokens, "tokens", desc="distillation text")
    with path.with_suffix(".tmp").open("w", encoding="utf-8") as f:
        while written < tokens:
            prompts = [openings[(i + j) % len(openings)] for j in range(batch)]
            params = [SamplingParams(temperature=0 if (i + j) % 2 else 1.0, seed=i + j, max_new_tokens=new_tokens)
                      for j in range(batch)]
            made = 0
            for prompt, c in zip(prompts, generate(lm.model, lm.tokenizer, prompts, params, backend=lm.backend)):
                f.write(json.dumps({"text": prompt + c.text}) + "\n")
                made += len(c.token_ids)
            written += made
            progress.update(made)
            i += batch
    progress.close()
    path.with_suffix(".tmp").rename(path)


def timed(lm, params: dict, draft=None) -> tuple[float, int, list[list[int]]]:
    """Seconds, tokens and token ids of completing every prompt."""
    start, tokens, ids = time.perf_counter(), 0, []
    for i, prompt in enumerate(PROMPTS):
        c = lm.complete(prompt, **params, **({"seed": i} if params.get("temperature") else {}), draft=draft)
        tokens += len(c.token_ids)
        ids.append(c.token_ids)
    return time.perf_counter() - start, tokens, ids


def measure(lm, drafts: dict, ks: list[int], temperatures: list[float], rounds: int, new_tokens: int) -> list[dict]:
    rows = []
    for temperature in temperatures:
        params = {"temperature": temperature, "max_new_tokens": new_tokens, "ignore_eos": True}
        timed(lm, params)  # warm up
        for name, draft in drafts.items():
            for k in ks:
                speculator = lm.speculator(draft, k=k)
                plain_s, drafted_s = [], []
                same = True
                for _ in range(rounds):
                    seconds, tokens, plain_ids = timed(lm, params)
                    plain_s.append(seconds)
                    seconds, drafted_tokens, drafted_ids = timed(lm, params, speculator)
                    drafted_s.append(seconds)
                    same &= plain_ids == drafted_ids
                plain, drafted = statistics.median(plain_s), statistics.median(drafted_s)
                ratios = [p / d for p, d in zip(plain_s, drafted_s)]
                rows.append({"draft": name, "k": k, "temperature": temperature, "tokens": tokens,
                             "plain_tok_s": tokens / plain, "drafted_tok_s": drafted_tokens / drafted,
                             "speedup": plain / drafted, "speedup_range": [min(ratios), max(ratios)],
                             "acceptance": speculator.acceptance,
                             "tokens_per_round": (speculator.accepted + speculator.rounds) / speculator.rounds,
                             "identical_to_plain": same if temperature == 0 else None})
                r = rows[-1]
                print(f"T={temperature} draft {name} k={k}: plain {r['plain_tok_s']:.0f} tok/s, drafted "
                      f"{r['drafted_tok_s']:.0f} tok/s, {r['speedup']:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}), "
                      f"acceptance {r['acceptance']:.1%}, {r['tokens_per_round']:.2f} tokens a round"
                      f"{', identical' if same and temperature == 0 else ''}", flush=True)
    return rows


def render_table(result: dict) -> str:
    """The README's table: per draft and temperature, the k that went fastest."""
    lines = ["| temperature | draft (parameters; its own tok/s) | best k | acceptance | tokens a round | plain tok/s "
             "| drafted tok/s | speedup (range) | output identical |", "|---|---|---|---|---|---|---|---|---|"]
    best: dict[tuple, dict] = {}
    for row in result["rows"]:
        key = (row["temperature"], row["draft"])
        if key not in best or row["speedup"] > best[key]["speedup"]:
            best[key] = row
    for (temperature, name), row in best.items():
        draft = result["drafts"][name]
        same = {True: "yes", False: "**no**", None: "(sampled)"}[row["identical_to_plain"]]
        lines.append(f"| {temperature:g} | {name} ({draft['parameters'] / 1e6:.2f}M; {draft['plain_tok_s']:,.0f}) | "
                     f"{row['k']} | {row['acceptance']:.1%} | {row['tokens_per_round']:.2f} | "
                     f"{row['plain_tok_s']:,.0f} | {row['drafted_tok_s']:,.0f} | {row['speedup']:.2f}x "
                     f"({row['speedup_range'][0]:.2f}-{row['speedup_range'][1]:.2f}) | {same} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="emergence-6m")
    parser.add_argument("--draft", default=None, help="the folder --make-draft wrote")
    parser.add_argument("--make-draft", type=Path, default=None, metavar="DIR", help="train a draft into DIR/SIZE")
    parser.add_argument("--size", default="1m", choices=list(DRAFT_SIZES), help="the draft --make-draft trains")
    parser.add_argument("--ks", default="2,3,4,6", help="draft tokens per round to measure")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="the default model drafting itself, 1 round, 24 tokens")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import torch

    import emergence
    from emergence.quant import quantize_model

    torch.set_num_threads(args.threads)
    if args.make_draft is not None:
        print(f"draft trained: {make_draft(args.make_draft, args.target, args.size)}")
        return 0
    if args.smoke:
        lm = emergence.load(device="cpu")
        rows = measure(lm, {"itself": lm}, [3], [0.0, 0.8], 1, 24)
        print(json.dumps(rows))
        return 0
    if args.draft is None:
        parser.error("--draft DIR (made by --make-draft) is needed")
    lm = emergence.load(args.target, device="cpu")
    quantized = copy.deepcopy(lm)
    quantized.model = quantize_model(copy.deepcopy(lm.model), "q4_0")
    folder, drafts = Path(args.draft), {}
    for size in DRAFT_SIZES:
        if (folder / size / "distilled" / "best").is_dir():
            drafts[f"draft-{size}"] = emergence.load(folder / size / "run" / "best", device="cpu")
            drafts[f"draft-{size}-distilled"] = emergence.load(folder / size / "distilled" / "best", device="cpu")
            drafts[f"draft-{size}-distilled-bf16"] = emergence.load(folder / size / "distilled" / "best",
                                                                    device="cpu", dtype="bf16")
    drafts["q4_0"] = quantized
    ks = [int(k) for k in args.ks.split(",")]
    rows = measure(lm, drafts, ks, [0.0, 0.8], args.rounds, args.tokens)
    draft_alone = {}
    for name, draft in drafts.items():  # the drafts' own plain decoding speed, for scale
        seconds, tokens, _ = timed(draft, {"temperature": 0, "max_new_tokens": args.tokens, "ignore_eos": True})
        draft_alone[name] = tokens / seconds
    best = max((r for r in rows if r["temperature"] == 0), key=lambda r: r["speedup"])
    result = {"target": args.target, "target_parameters": lm.config.num_parameters(),
              "drafts": {name: {"parameters": d.config.num_parameters(), "plain_tok_s": draft_alone[name]}
                         for name, d in drafts.items()},
              "prompts": len(PROMPTS), "new_tokens": args.tokens, "rounds": args.rounds, "rows": rows,
              "best_at_temperature_0": best}
    print(f"best at temperature 0: draft {best['draft']} k={best['k']}: {best['speedup']:.2f}x")
    print(render_table(result))
    write_result(Path(args.out or ROOT / result_path("speculative")), result,
                 "bench/bench_speculative.py", sys.argv[1:], args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
