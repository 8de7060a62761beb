"""Dense against mixture of experts on the same tokens: docs/moe.md and docs/moe.png.

    .venv/bin/python bench/moe_lab.py                 # the full run (about 15 min on 2 cores; speed is bench_moe.py's)
    .venv/bin/python bench/moe_lab.py --smoke --out-json /tmp/moe_lab.json   # a few steps
    .venv/bin/python bench/moe_lab.py --report-only   # docs/moe.md and the plot from the committed JSON

1. **Data.** A byte-level BPE of VOCAB tokens trained on the TinyStories training sample, its
   shards (5% held out), the same for every model and in the same order (the same seed).
2. **Models.** The same attention and width (SHAPES); only the MLP differs:
   - `dense`: one SwiGLU MLP of width F;
   - `moe-same-active`: 8 experts of width F / 2, top-2: each token runs through as many MLP
     parameters as in `dense`, the model holds 4x more;
   - `moe-same-total`: 8 experts of width F / 8, top-2: as many MLP parameters as `dense`
     in all, a token runs through a quarter of them.
   The experts train with the load-balancing loss (0.01) and router z-loss (0.001).
3. **Training.** STEPS steps of AdamW (warmup + cosine), held-out loss every EVAL_EVERY
   steps; training compute counted as 6 x active parameters x tokens.
4. **Specialisation.** The held-out tokens through `moe-same-active`: per layer, the share
   of tokens each expert is the first choice for, and the tokens most often routed to it.

Writes bench/results/moe_lab.json, docs/moe.md and docs/moe.png (--smoke: only the JSON).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from emergence.config import Config  # noqa: E402
from emergence.data.shards import TokenShards, prepare_corpus  # noqa: E402
from emergence.model import MoE  # noqa: E402
from emergence.tokenizer import Tokenizer  # noqa: E402
from emergence.train import TrainConfig, train  # noqa: E402
from emergence.weights.hf import load_hf  # noqa: E402
from provenance import commit, machine  # noqa: E402

TEXT = ROOT.parent / "shared" / "data" / "tinystories" / "train" / "TinyStories-train.head2MiB.txt"
RESULTS = ROOT / "bench" / "results" / "moe_lab.json"
DOC, PLOT = ROOT / "docs" / "moe.md", ROOT / "docs" / "moe.png"
VOCAB, CONTEXT, BATCH, STEPS, EVAL_EVERY = 2048, 128, 16, 300, 25
SHAPES = dict(vocab_size=VOCAB, block_size=CONTEXT, n_layer=4, n_head=4, n_embd=128, tie_embeddings=True,
              bos_token_id=None, eos_token_id=0)
F = 384
MODELS = {
    "dense": dict(family="llama", intermediate_size=F),
    "moe-same-active": dict(family="mixtral", intermediate_size=F // 2, n_experts=8, experts_per_token=2),
    "moe-same-total": dict(family="mixtral", intermediate_size=F // 8, n_experts=8, experts_per_token=2),
}


def run(smoke: bool) -> dict:
    steps, every = (20, 10) if smoke else (STEPS, EVAL_EVERY)
    work = Path(tempfile.mkdtemp(prefix="moe_lab-"))
    text = TEXT.read_text(encoding="utf-8")[: 300_000 if smoke else None]
    corpus = work / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    tokenizer = Tokenizer.train_bpe([corpus], VOCAB)
    prepare_corpus([str(corpus)], tokenizer, work / "shards", val_fraction=0.05, show_progress=False)
    results = {}
    for name, fields in MODELS.items():
        config = Config(name=name, **SHAPES, **fields)
        tc = TrainConfig(data=str(work / "shards"), out=str(work / name), max_steps=steps, batch_size=BATCH,
                         context=CONTEXT, lr=3e-3, min_lr=3e-4, warmup_steps=steps // 10, eval_every=every,
                         eval_batches=8, log_every=every, checkpoint_every=0, seed=1, progress=not smoke)
        result = train(config, tc)
        rows = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
        active = config.num_parameters(active=True) - VOCAB * SHAPES["n_embd"]  # embeddings cost no matmul FLOPs...
        flops_per_token = 6 * (active + VOCAB * SHAPES["n_embd"])  # ...but the tied head does
        curve = [dict(step=r["step"], tokens=r["tokens"], flops=flops_per_token * r["tokens"], val_loss=r["val_loss"])
                 for r in rows if "val_loss" in r]
        results[name] = dict(total_parameters=config.num_parameters(), active_parameters=config.num_parameters(active=True),
                             final_val_loss=result.val_loss, tokens_per_s=result.tokens_per_s, curve=curve,
                             expert_share=next((r["expert_share"] for r in reversed(rows) if "expert_share" in r), None))
        print(json.dumps({k: v for k, v in results[name].items() if k != "curve"}), flush=True)
        if name == "moe-same-active":
            results[name]["specialisation"] = specialisation(work / name / "model", tokenizer, work / "shards")
    return dict(date=datetime.date.today().isoformat(), commit=commit(), machine=machine(),
                command=" ".join(["python", "bench/moe_lab.py", *sys.argv[1:]]), steps=steps, batch=BATCH,
                context=CONTEXT, vocab=VOCAB, models=results)


def specialisation(folder: Path, tokenizer: Tokenizer, shards: Path, tokens: int = 20_000) -> list[list[dict]]:
    """Per layer and expert: the share of held-out tokens it is the first choice for, and the
    tokens most often routed to it first (with how often)."""
    model, _ = load_hf(folder)
    ids = TokenShards(shards).ids("val", tokens).long()
    layers = [b.mlp for b in model.layers if isinstance(b.mlp, MoE)]
    firsts = [[] for _ in layers]
    with torch.no_grad():
        for chunk in ids.split(CONTEXT):
            model(chunk[None])
            for i, m in enumerate(layers):
                firsts[i].append(m.choices[:, 0])
    out = []
    for i, m in enumerate(layers):
        first = torch.cat(firsts[i])
        table = []
        for e in range(m.n_experts):
            mine = ids[: first.numel()][first == e].tolist()
            common = collections.Counter(mine).most_common(6)
            table.append(dict(share=len(mine) / first.numel(),
                              tokens=[[tokenizer.decode([t]), n] for t, n in common]))
        out.append(table)
    return out


def report(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, r in models.items():
        ax.plot([c["flops"] for c in r["curve"]], [c["val_loss"] for c in r["curve"]], marker="o", ms=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training compute (FLOPs, 6 x active parameters x tokens)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Dense vs mixture of experts, same tokens")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)

    lines = ["# Mixture of experts: dense against MoE on the same tokens", "",
             f"`bench/moe_lab.py` ({results['date']}, commit {results['commit'][:12]}, "
             f"{results['machine']['cpu']}, {results['machine']['cores']} cores): {results['steps']} steps of "
             f"{results['batch']} x {results['context']} tokens of TinyStories, a {results['vocab']}-token BPE, "
             "4 layers of width 128; only the MLP differs (see the script's docstring).", "",
             "| model | parameters (total) | active per token | held-out loss |",
             "| --- | --- | --- | --- |"]
    for name, r in models.items():
        lines.append(f"| {name} | {r['total_parameters']:,} | {r['active_parameters']:,} | "
                     f"{r['final_val_loss']:.3f} |")
    d, a, t = (models[n]["final_val_loss"] for n in ("dense", "moe-same-active", "moe-same-total"))
    top = [max(row["share"] for row in layer) for layer in models["moe-same-active"].get("specialisation") or []]
    lines += ["", f"With the same compute per token, the experts' extra parameters lower the held-out loss by "
              f"{d - a:.3f} nats ({d:.3f} -> {a:.3f}); with the same parameters in all, a token's quarter of "
              f"the MLP costs {t - d:.3f} nats at the end of the same tokens, for {1 - models['moe-same-total']['active_parameters'] / models['dense']['active_parameters']:.0%} "
              "less compute per token (the plot: loss against compute). At this size and length the "
              "balancing loss (coefficient 0.01) leaves the routing uneven: the busiest expert of each "
              f"layer takes {', '.join(f'{x:.0%}' for x in top)} of the first choices, and a few experts "
              "almost none; the experts that are used split the vocabulary (punctuation and function "
              "words, names, verbs and content words, word pieces), the tables below."]
    lines += ["", "![held-out loss against training compute](moe.png)", "",
              "## What each expert takes (moe-same-active, held-out tokens, first choice)", ""]
    spec = models["moe-same-active"].get("specialisation") or []
    for i, layer in enumerate(spec):
        lines += [f"Layer {i}:", "", "| expert | share | most frequent tokens routed to it |", "| --- | --- | --- |"]
        for e, row in enumerate(layer):
            tokens = ", ".join(f"`{t!r}` {n}" for t, n in row["tokens"])
            lines.append(f"| {e} | {row['share']:.1%} | {tokens} |")
        lines.append("")
    DOC.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--out-json", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not args.report_only:
        results = run(args.smoke)
        args.out_json.write_text(json.dumps(results, indent=1) + "\n")
        if args.smoke:
            return
    report(json.loads(RESULTS.read_text()))
    print(f"wrote {DOC} and {PLOT}")


if __name__ == "__main__":
    main()
