"""Train the README's small LLaMA-architecture models from scratch, and report them.

    python bench/train_models.py --text ../shared/data --out runs/          # tokenizer + shards + 3 sizes
    python bench/train_models.py --shards runs/shards --out runs/ --sizes s  # reuse prepared shards

The corpus is the text in `shared/data`: the TinyStories sample (train head and validation
head), Tiny Shakespeare and War and Peace. `emergence train-tokenizer` makes a 4,096-token
byte-level BPE from it, `emergence prepare` holds out 5% of every file (its last documents;
a one-document file is cut at 95%) as the validation split, and each size is trained by
`emergence.train.train` with the settings below, keeping the checkpoint of lowest
validation loss (`save_best`). The script writes OUT/results.json (one row per size:
parameters, tokens seen, best validation loss and perplexity, wall time, a sample) and,
when matplotlib is installed, OUT/val_loss.png with the validation curves.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from emergence.config import Config  # noqa: E402
from emergence.data.shards import TokenShards, prepare_corpus  # noqa: E402
from emergence.data.shards import expand_inputs, read_documents  # noqa: E402
from emergence.tokenizer import GPT2_EOT, Tokenizer  # noqa: E402
from emergence.train import TrainConfig, train  # noqa: E402

CORPUS = ["tinystories/train", "tinystories/valid", "tinyshakespeare", "text"]
VOCAB = 4096
CONTEXT = 512

# LLaMA-architecture presets (RMSNorm, RoPE, SwiGLU, tied embeddings; emergence.config.PRESETS);
# the vocabulary is sized from the tokenizer. Larger models get a lower peak learning rate.
SIZES = {"s": ("emergence-1m", 3e-3), "m": ("emergence-6m", 2e-3), "l": ("emergence-16m", 1.5e-3)}


def model_config(size: str) -> Config:
    return Config.from_name(SIZES[size][0], block_size=CONTEXT)


def build_shards(text_root: Path, out: Path) -> Path:
    files = [str(text_root / c) for c in CORPUS]
    docs = []
    for path in expand_inputs(files):
        docs += read_documents(path, GPT2_EOT)[0]
    tokenizer = Tokenizer.train_bpe_from_texts(docs, VOCAB)
    shards = out / "shards"
    prepare_corpus(files, tokenizer, shards, val_fraction=0.05, show_progress=False)
    return shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", type=Path, help="shared/data folder (builds tokenizer and shards)")
    ap.add_argument("--shards", type=Path, help="prepared shards (skips --text)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sizes", default="m,s,l")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--export", type=Path, help="after each size, copy results and a tar of its run here")
    ap.add_argument("--export-models", default="s,m", help="sizes whose best weights go into their tar")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shards = args.shards or build_shards(args.text, args.out)
    data = TokenShards(shards)
    print(f"corpus: {data.tokens('train'):,} train + {data.tokens('val'):,} val tokens, "
          f"tokenizer {data.tokenizer_hash}", flush=True)

    results = []
    for size in args.sizes.split(","):
        config = model_config(size)
        tc = TrainConfig(data=str(shards), out=str(args.out / f"run-{size}"), context=CONTEXT,
                         batch_size=args.batch, max_steps=args.steps, lr=SIZES[size][1],
                         min_lr=SIZES[size][1] / 10, warmup_steps=args.steps // 20, weight_decay=0.1,
                         eval_every=max(1, args.steps // 40), eval_batches=20, checkpoint_every=args.steps,
                         log_every=50, save_best=True, device=args.device, compile=args.compile,
                         progress=False, sample_tokens=80)
        start = time.perf_counter()
        result = train(config, tc)
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in (Path(tc.out) / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in rows if "val_loss" in r]
        best = min(evals, key=lambda r: r["val_loss"])
        sample = _sample(Path(tc.out) / "best")
        results.append({
            "size": size, "preset": SIZES[size][0], "config": config.to_dict(), "parameters": config.num_parameters(),
            "steps": args.steps, "tokens_seen": result.tokens, "best_step": best["step"],
            "best_tokens_seen": best["tokens"], "best_val_loss": best["val_loss"],
            "best_val_ppl": math.exp(best["val_loss"]), "final_val_loss": evals[-1]["val_loss"],
            "train_loss_at_best": best["train_loss"], "wall_s": wall, "tokens_per_s": result.tokens_per_s,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "sample": sample, "curve": [(r["step"], r["val_loss"]) for r in evals],
        })
        print(json.dumps({k: v for k, v in results[-1].items() if k not in ("config", "curve")}), flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        _plot(results, args.out / "val_loss.png")
        if args.export:
            _export(args, size, Path(tc.out))


def _export(args, size: str, run: Path, part_bytes: int = 15 << 20) -> None:
    """results.json, the plot, and run-SIZE.tar.NN (metrics, samples, best weights) in parts
    of at most part_bytes, for transports that limit file sizes."""
    import io
    import shutil
    import tarfile

    args.export.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "val_loss.png"):
        if (args.out / name).exists():
            shutil.copy(args.out / name, args.export / name)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("metrics.jsonl", "samples.jsonl", "train_config.json"):
            tar.add(run / name, arcname=f"run-{size}/{name}")
        if size in args.export_models.split(","):
            tar.add(run / "best", arcname=f"run-{size}/best")
    data = buffer.getvalue()
    for i in range(0, len(data), part_bytes):
        (args.export / f"run-{size}.tar.{i // part_bytes:02d}").write_bytes(data[i:i + part_bytes])


def _sample(model_dir: Path) -> str:
    import emergence

    lm = emergence.load(model_dir, backend="eager")
    prompt = "Once upon a time"
    return prompt + lm.generate(prompt, temperature=0.8, top_k=40, max_new_tokens=60, seed=1)


def _plot(results: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        steps, losses = zip(*r["curve"])
        ax.plot(steps, losses, label=f"{r['preset']}: {r['parameters'] / 1e6:.2f}M parameters")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("emergence pretrain: validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
