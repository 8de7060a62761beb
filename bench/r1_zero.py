"""R1-zero at small scale: GRPO with an exact-answer reward on the arithmetic word problems, from a
policy that `emergence search-train` taught the answer format (docs/alignment.md, from this script).

    policy (search-train's L: pretrained on problems + canonical step-by-step solutions)
      -> held-out accuracy by number of steps, greedy                                  (before)
      -> GRPO (emergence grpo's code): G samples per problem at temperature 1, reward 1 when the
         final answer is right (emergence.align.rewards:exact_answer), else 0; group-relative
         advantages, no KL term (beta 0: R1-zero's recipe as TRL runs it), DAPO normalisation
      -> held-out accuracy by number of steps every few steps, and after; the completions'
         mean length over training (does longer reasoning emerge?)

Problems come from `emergence.problems.generate_problems` with seeds the policy never saw; held-out
questions that appear in the policy's own training problems (OUT/problems/train.jsonl of its
search-train folder, when it is there) are dropped.

    .venv/bin/python bench/r1_zero.py --policy runs/st-long/policies/M/model   # search-train --setting long
    .venv/bin/python bench/r1_zero.py --smoke --policy DIR --out-json /tmp/r1.json     # tests
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

RESULTS = ROOT / "bench" / "results" / "r1_zero.json"
PLOT = ROOT / "docs" / "alignment_r1.png"
TRAIN_SEED, HELD_SEED = 101, 202  # search-train uses seed 0

FULL = {"train_problems": 4000, "train_difficulties": [1, 8], "held_per_difficulty": 50, "steps": 300,
        "prompts_per_step": 8, "group": 8, "max_new": 160, "lr": 1e-4, "eval_every": 50, "temperature": 1.0}
SMOKE = {"train_problems": 32, "train_difficulties": [1, 2], "held_per_difficulty": 2, "steps": 2,
         "prompts_per_step": 2, "group": 4, "max_new": 24, "lr": 5e-5, "eval_every": 1, "temperature": 1.0}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def problems(p: dict, policy: Path) -> tuple[list[dict], list[dict], int]:
    from emergence.problems import generate_problems

    seen = set()
    own = policy.parent.parent.parent / "problems" / "train.jsonl"  # search-train's OUT/problems/train.jsonl
    if own.exists():
        seen = {json.loads(line)["question"] for line in own.read_text(encoding="utf-8").splitlines() if line}
    lo, hi = p["train_difficulties"]
    train = [r for r in generate_problems(p["train_problems"], (lo, hi), seed=TRAIN_SEED) if r["question"] not in seen]
    held = generate_problems(8 * p["held_per_difficulty"], (1, 8), seed=HELD_SEED)
    train_q = {r["question"] for r in train}
    dropped = sum(r["question"] in seen or r["question"] in train_q for r in held)
    held = [r for r in held if r["question"] not in seen and r["question"] not in train_q]
    return train, held, dropped


def evaluate(model, tokenizer, held: list[dict], max_new: int, chunk: int = 64) -> dict:
    """Greedy solutions of the held-out problems: accuracy (the final answer, as `emergence search`
    scores it) and every-step-valid share, per difficulty; mean completion length."""
    import torch

    from emergence.align.rl import merged_for_decoding, sample_groups
    from emergence.problems import check_solution
    from emergence.sampling import SamplingParams
    from emergence.search.flops import wilson_interval
    from emergence.search.prompt import format_prompt
    from emergence.search.train import is_correct, normalize_solution

    model.eval()
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new)
    samples = []
    with torch.no_grad(), merged_for_decoding(model):
        for i in range(0, len(held), chunk):
            ids = [tokenizer.encode(format_prompt(r["question"])) for r in held[i:i + chunk]]
            samples += sample_groups(model, tokenizer, ids, 1, params, 0)
    by: dict[int, list[tuple[bool, bool]]] = {}
    for r, s in zip(held, samples):
        text = normalize_solution(s.text)
        by.setdefault(r["difficulty"], []).append(
            (is_correct(text, r["answer"]), check_solution(r["question"], text, r["answer"]).correct))
    right = sum(c for v in by.values() for c, _ in v)
    return {"accuracy": right / len(held), "right": right, "problems": len(held),
            "interval": wilson_interval(right, len(held)),
            "all_steps_valid": sum(a for v in by.values() for _, a in v) / len(held),
            "by_difficulty": {str(d): {"accuracy": sum(c for c, _ in v) / len(v), "right": sum(c for c, _ in v),
                                       "n": len(v), "interval": wilson_interval(sum(c for c, _ in v), len(v))}
                              for d, v in sorted(by.items())},
            "mean_length": sum(len(s.token_ids) for s in samples) / len(samples),
            "example": samples[-1].text}


def run(p: dict, policy: Path, work: Path) -> dict:
    from emergence.align.rl import RLConfig, RLRun

    started = time.perf_counter()
    train, held, dropped = problems(p, policy)
    (work / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held), encoding="utf-8")
    prompts = work / "train.jsonl"
    prompts.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"],
                                           "difficulty": r["difficulty"]}) + "\n" for r in train), encoding="utf-8")
    out = work / "grpo"
    shutil.rmtree(out, ignore_errors=True)
    cfg = RLConfig(method="grpo", model=str(policy), prompts=str(prompts), out=str(out),
                   reward=["emergence.align.rewards:exact_answer"], group=p["group"],
                   prompts_per_step=p["prompts_per_step"], max_new_tokens=p["max_new"], temperature=p["temperature"],
                   max_steps=p["steps"], lr=p["lr"], beta=0.0, loss_type="dapo", checkpoint_every=10 ** 6, seed=0,
                   progress=False)
    rl = RLRun(cfg)
    before = evaluate(rl.model, rl.tokenizer, held, p["max_new"])
    log(f"before: accuracy {before['accuracy']:.3f} {before['by_difficulty']}")
    curve, evals, t = [], [{"step": 0, **before}], time.perf_counter()
    for step in range(1, p["steps"] + 1):
        row = rl.step()
        curve.append({k: row[k] for k in ("step", "reward", "completion_length", "completions_stopped",
                                           "rollout_tokens", "step_s") if k in row})
        if step % p["eval_every"] == 0 or step == p["steps"]:
            e = evaluate(rl.model, rl.tokenizer, held, p["max_new"])
            evals.append({"step": step, **e})
            rate = step / (time.perf_counter() - t)
            log(f"step {step}/{p['steps']}: train reward {sum(c['reward'] for c in curve[-p['eval_every']:]) / len(curve[-p['eval_every']:]):.3f}"
                f", length {row['completion_length']:.1f}; held-out accuracy {e['accuracy']:.3f} "
                f"({rate * 60:.1f} steps/min, ETA {(p['steps'] - step) / rate:.0f} s)")
    saved = rl.save_result()
    return {"settings": p, "policy": str(policy), "train_problems": len(train), "held_out": len(held),
            "held_out_dropped": dropped, "curve": curve, "evals": evals, "before": before, "after": evals[-1],
            "saved": str(saved), "grpo_seconds": time.perf_counter() - t, "total_seconds": time.perf_counter() - started}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    curve = result["curve"]
    steps = [c["step"] for c in curve]
    w = max(1, len(curve) // 15)

    def smooth(values):
        return [sum(values[max(0, i - w + 1):i + 1]) / len(values[max(0, i - w + 1):i + 1]) for i in range(len(values))]

    axes[0].plot(steps, smooth([c["reward"] for c in curve]), color="#d62728")
    axes[0].set(title=f"training reward (exact answer), mean of {w} steps", xlabel="GRPO step", ylabel="reward")
    axes[1].plot(steps, smooth([c["completion_length"] for c in curve]), color="#1f77b4")
    axes[1].set(title="mean completion length (tokens)", xlabel="GRPO step", ylabel="tokens")
    diffs = sorted(result["before"]["by_difficulty"], key=int)
    x = range(len(diffs))
    axes[2].bar([i - 0.2 for i in x], [result["before"]["by_difficulty"][d]["accuracy"] for d in diffs], 0.4,
                label="before", color="#999999")
    axes[2].bar([i + 0.2 for i in x], [result["after"]["by_difficulty"][d]["accuracy"] for d in diffs], 0.4,
                label="after GRPO", color="#d62728")
    axes[2].set_xticks(list(x), diffs)
    axes[2].set(title="held-out accuracy (greedy) by steps", xlabel="steps in the problem", ylabel="accuracy")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", required=True, help="a policy folder (search-train's OUT/policies/L/model)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (tests)")
    ap.add_argument("--out-json", default=None, help="results (default bench/results/r1_zero.json; --smoke: required)")
    ap.add_argument("--work", default=None, help="folder for the run (default: a temporary folder, removed)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot-only", action="store_true", help="only draw the plot from the JSON (docs/alignment_r1.png "
                    "for the committed results, else beside the JSON)")
    args = ap.parse_args(argv)
    if args.smoke and not args.out_json:
        ap.error("--smoke needs --out-json (it never replaces the committed results)")
    out_json = Path(args.out_json) if args.out_json else RESULTS
    # the committed plot goes with the committed results; results elsewhere get theirs beside them
    png = PLOT if out_json.resolve() == RESULTS.resolve() else out_json.with_suffix(".png")
    if args.plot_only:
        plot(json.loads(out_json.read_text()), png)
        return 0
    policy = Path(args.policy)
    if not (policy / "config.json").exists():
        ap.error(f"{policy} is not a model folder (no config.json): give search-train's OUT/policies/L/model")
    import torch

    torch.set_num_threads(args.threads)
    p = dict(SMOKE if args.smoke else FULL)
    for k in ("steps", "lr"):
        if getattr(args, k) is not None:
            p[k] = getattr(args, k)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="r1-zero-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = run(p, policy, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    from provenance import write_result

    write_result(out_json, result, "bench/r1_zero.py", sys.argv[1:], args.threads)
    if not args.smoke:
        plot(result, png)
    log(f"wrote {out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
