"""The paged KV cache against the contiguous cache it replaced: decoding speed, same run.

The baseline is emergence itself at BASE (default: the last commit with the contiguous,
left-padded `KVCache`), checked out with `git worktree` into a temporary folder and run in its
own processes, its kernels built there once. Each round runs one process per tree, the trees
alternating, and each process measures every configuration: greedy `generate()` of N tokens
for R rows of 16-token prompts, on the CPU with the native backend (both trees' default),
decode tokens/s = R x (N - 1) / (t(N) - t(1)), so the prefill and set-up cancel out, the best
of 3 such measurements (this shared machine's neighbours come and go). Rates are medians over
the rounds; the ratio paged / contiguous >= 0.95 is the target at 1 and 16 rows.

Models: the smollm2-135m architecture (30 layers, 576 wide, random fp32 weights: 538 MB read
per step, where one row is bound by memory) and the packaged emergence-6m (23 MB, where 16 rows
are bound by compute and per-step overhead).

    python bench/bench_paged.py [--rounds 7] [--new-tokens 64] [--base COMMIT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = "1cf259f"  # the last commit whose decoding used the contiguous, left-padded KVCache
CONFIGS = [("smollm2-135m", 1), ("smollm2-135m", 16), ("emergence-6m", 1), ("emergence-6m", 16)]


def worker(models: dict[str, str], new_tokens: int) -> dict:
    """In the tree on PYTHONPATH: decode rates of every configuration (both trees share this API)."""
    import torch

    import emergence
    from emergence.generate import generate
    from emergence.sampling import SamplingParams

    out = {"emergence": emergence.__file__}
    for name, rows in CONFIGS:
        lm = emergence.load(models[name], device="cpu")
        torch.manual_seed(rows)
        prompts = [torch.randint(3, lm.config.vocab_size, (16,)).tolist() for _ in range(rows)]

        def run(n: int) -> float:
            start = time.perf_counter()
            generate(lm.model, lm.tokenizer, prompts, SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True))
            return time.perf_counter() - start

        run(2)  # warm-up (the kernels, the caches)
        out[f"{name} x{rows}"] = max(rows * (new_tokens - 1) / (run(new_tokens) - run(1)) for _ in range(3))
    return out


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def smollm2_folder(folder: Path) -> Path:
    """The smollm2-135m architecture with random weights and a word-level tokenizer over its ids."""
    import torch
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    from emergence.config import Config
    from emergence.model import Transformer
    from emergence.tokenizer import Tokenizer
    from emergence.weights.hf import save_hf

    torch.manual_seed(0)
    config = Config.from_name("smollm2-135m")
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_hf(model, folder)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    Tokenizer(Backend(models.WordLevel(vocab, unk_token="t1")), eos_token="t0").save(folder)
    return folder


def main() -> int:
    from provenance import result_path  # bench/ is on the path: STEM.json, STEM_amd.json on an AMD CPU
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--base", default=BASE, help="the commit with the contiguous cache (default %(default)s)")
    parser.add_argument("--out", default=result_path("paged"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON {model name: folder}
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker), args.new_tokens)))
        return 0

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    if subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True, cwd=ROOT).stdout:
        head += "-dirty"  # measured with uncommitted changes to the package
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), args.base], check=True, cwd=ROOT,
                       capture_output=True)
        try:
            models = {"smollm2-135m": str(smollm2_folder(Path(tmp) / "smollm2")),
                      "emergence-6m": str(ROOT / "src" / "emergence" / "models" / "emergence-6m")}
            trees = {"paged": ROOT, "contiguous": base_tree}
            samples: dict[str, dict[str, list[float]]] = {t: {} for t in trees}
            for r in range(args.rounds):
                for tree_name in (("paged", "contiguous") if r % 2 == 0 else ("contiguous", "paged")):
                    tree = trees[tree_name]
                    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
                    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(models),
                                           "--new-tokens", str(args.new_tokens)], capture_output=True, text=True,
                                          env=env, cwd=tree)
                    if proc.returncode != 0:
                        raise SystemExit(f"the {tree_name} worker failed:\n{proc.stderr[-3000:]}")
                    result = json.loads(proc.stdout.strip().splitlines()[-1])
                    assert result.pop("emergence").startswith(str(tree / "src")), "a worker imported the wrong tree"
                    for key, rate in result.items():
                        samples[tree_name].setdefault(key, []).append(rate)
                    print(f"round {r + 1}/{args.rounds} {tree_name}: "
                          + ", ".join(f"{k} {v:.1f}" for k, v in result.items()), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, capture_output=True)

    rows = []
    print("\n| model | rows | contiguous tok/s | paged tok/s | paged / contiguous (per-round range) |")
    print("|---|---|---|---|---|")
    for name, n in CONFIGS:
        key = f"{name} x{n}"
        old, new = samples["contiguous"][key], samples["paged"][key]
        ratios = [b / a for a, b in zip(old, new)]
        row = {"model": name, "rows": n, "contiguous_tok_s": statistics.median(old), "paged_tok_s": statistics.median(new),
               "ratio": statistics.median(new) / statistics.median(old), "round_ratios": ratios}
        rows.append(row)
        print(f"| {name} | {n} | {row['contiguous_tok_s']:.1f} | {row['paged_tok_s']:.1f} | {row['ratio']:.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}) |")
    result = {"commit": head, "base": args.base, "command": " ".join(sys.argv), "machine": cpu_name(),
              "cpus": os.cpu_count(), "rounds": args.rounds, "new_tokens": args.new_tokens, "results": rows,
              "date": time.strftime("%Y-%m-%d")}
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
