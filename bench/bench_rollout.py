"""RL rollout throughput: emergence's batched decode with forks against transformers' sampling, same run.

A rollout is what GRPO and PPO sample each step: P prompts, G completions each. emergence
(align/rl.py: sample_groups) prefills each prompt once and forks it G ways in one DecodeBatch
(the forks share the prompt's KV blocks), decoded by the native CPU step; transformers runs
`generate(do_sample=True, num_return_sequences=G)` on the left-padded prompts (it repeats each
prompt G times). Both sample at temperature 1 with no filter, from the same weights, and both
generate exactly N tokens per completion (emergence ignore_eos, transformers min_new_tokens), so
the token counts are equal: P * G * N. Rounds alternate between the two, and between the group
sizes; each figure is the best round (the machine may be shared).

Models: emergence-6m (the shipped TinyStories model), or a smollm2-135m-shaped model with random
weights (--model smollm2-135m). --tiny: a two-layer random model, a few tokens, one round (a smoke
test of the script, not a measurement).

    python bench/bench_rollout.py [--model emergence-6m|smollm2-135m] [--groups 4,16] [--prompts 4]
                                  [--new-tokens 64] [--rounds 3] [--threads N] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from emergence.align.rl import sample_groups  # noqa: E402
from emergence.sampling import SamplingParams  # noqa: E402
from provenance import commit, machine, result_path  # noqa: E402

PROMPTS = ["Once upon a time, there was a little girl named", "Tom and his dog went to the park. They",
           "One day, a big bird flew over the", "The sun was hot and the children wanted to",
           "Lily found a shiny stone in the garden.", "Ben liked to build towers with his blocks, but",
           "It was a rainy day. Mia looked out of the window and", "The old cat slept by the fire while"]


def models(name: str, folder: Path):
    """(emergence model, tokenizer, transformers model) on the same weights."""
    import transformers as tf

    import emergence
    from emergence.api import PACKAGED_MODELS
    from emergence.config import Config
    from emergence.model import Transformer
    from emergence.weights.hf import save_hf

    if name == "emergence-6m":
        lm = emergence.load("emergence-6m", device="cpu")
        path = PACKAGED_MODELS / "emergence-6m"
    else:
        tokenizer = emergence.load("emergence-6m", device="cpu").tokenizer  # any tokenizer: the ids are what count
        shapes = {"smollm2-135m": Config.from_name("smollm2-135m", vocab_size=tokenizer.vocab_size),
                  "tiny": Config.from_name("tiny-llama", vocab_size=tokenizer.vocab_size, eos_token_id=0)}[name]
        torch.manual_seed(0)
        model = Transformer(shapes).eval()
        if name == "tiny":
            with torch.no_grad():  # peaked distributions, as a trained model's
                for p in model.parameters():
                    if p.dim() == 2:
                        p.normal_(0, 0.2)
        save_hf(model, folder)
        tokenizer.save(folder)
        lm = emergence.load(folder, device="cpu")
        path = folder
    hf = tf.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    return lm.model.eval(), lm.tokenizer, hf


def emergence_rollout(model, tokenizer, prompts: list[list[int]], group: int, new: int, seed: int) -> int:
    params = SamplingParams(temperature=1.0, max_new_tokens=new, ignore_eos=True)
    samples = sample_groups(model, tokenizer, prompts, group, params, seed, backend="native")
    return sum(len(s.token_ids) for s in samples)


def transformers_rollout(hf, prompts: list[list[int]], group: int, new: int, seed: int, pad: int) -> int:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as generate() wants for a decoder
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, do_sample=True, num_return_sequences=group, max_new_tokens=new,
                          min_new_tokens=new, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad)
    return (out.shape[1] - width) * out.shape[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="emergence-6m", choices=("emergence-6m", "smollm2-135m"))
    parser.add_argument("--groups", default="4,16", help="group sizes G (default 4,16)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per rollout P (default 4)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per completion N (default 64)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help="a smoke test: tiny random model, 8 tokens, one round")
    parser.add_argument("--out", default=None, help="results JSON (default bench/results/rollout_MODEL.json; "
                                                    "--tiny writes none unless given)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    name = "tiny" if args.tiny else args.model
    new, rounds = (8, 1) if args.tiny else (args.new_tokens, args.rounds)
    groups = [int(g) for g in args.groups.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, hf = models(name, Path(tmp))
        prompts = [tokenizer.encode(p) for p in (PROMPTS * 4)[:args.prompts]]
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
        emergence_rollout(model, tokenizer, prompts, 2, 4, 0)  # warm-up: native plan, kernels
        transformers_rollout(hf, prompts, 2, 4, 0, pad)
        best: dict[tuple[str, int], float] = {}
        for r in range(rounds):
            for g in (groups if r % 2 == 0 else groups[::-1]):
                order = ("emergence", "transformers") if (r + g) % 2 == 0 else ("transformers", "emergence")
                for who in order:
                    start = time.perf_counter()
                    tokens = (emergence_rollout(model, tokenizer, prompts, g, new, r) if who == "emergence"
                              else transformers_rollout(hf, prompts, g, new, r, pad))
                    rate = tokens / (time.perf_counter() - start)
                    assert tokens == len(prompts) * g * new, (who, tokens)
                    best[who, g] = max(best.get((who, g), 0.0), rate)
                    print(f"round {r + 1} G={g:<3} {who:12} {rate:9.0f} tok/s", flush=True)
    rows = [{"group": g, "prompts": len(prompts), "new_tokens": new, "tokens": len(prompts) * g * new,
             "emergence_tok_s": best["emergence", g], "transformers_tok_s": best["transformers", g],
             "speedup": best["emergence", g] / best["transformers", g]} for g in groups]
    print(f"\n{name}, {len(prompts)} prompts x G samples x {new} tokens, best of {rounds} round(s), "
          f"{torch.get_num_threads()} threads\n")
    print("| G | emergence tok/s | transformers tok/s | speedup |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['group']} | {row['emergence_tok_s']:.0f} | {row['transformers_tok_s']:.0f} | "
              f"{row['speedup']:.2f}x |")
    out = args.out or (None if args.tiny else str(ROOT / result_path(f"rollout_{name}")))
    if out is not None:
        result = dict(date=datetime.date.today().isoformat(), commit=commit(), machine=machine(),
                      command="python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                      model=name, threads=torch.get_num_threads(), rounds=rounds, results=rows)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
