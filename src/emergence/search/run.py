"""Running a strategy over a problem file: per-problem records, accuracy with its 95% interval,
tokens and FLOPs per problem, the plot, and the `emergence search` command.

A problem is right when the chosen final answer equals its answer (problems.extract_answer on
the chosen solution; steps are not graded here). Costs per problem are the policy's and the
verifier's usage during it (policy.Usage): prompt tokens prefilled, tokens generated, tokens
the verifier read, FLOPs of each (flops.py). A problem whose requests got no answer scores as
wrong and is counted in `timeouts`. self_correct's records also keep the loop's answer and
FLOPs at every budget 0 .. --budget, and its summaries `by_budget` (accuracy, 95% interval and
mean FLOPs per problem at each budget: the accuracy gain per extra regeneration, from one run).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import InvalidArgument
from .flops import wilson_interval
from .policy import HTTPPolicy, LocalPolicy, Policy, Usage
from .strategies import (ESTIMATORS, NEEDS_VERIFIER, STRATEGIES, SearchConfig, Table, difficulty, fit_table,
                         get_strategy)
from .verifier import AGGREGATIONS, KINDS, Verifier, check_tokenizers, load_verifier


def _usage(u: Usage | None) -> Usage:
    return u.copy() if u is not None else Usage()


def solve_problem(row: dict, strategy: str, policy: Policy, verifier: Verifier | None, cfg: SearchConfig) -> dict:
    """One problem: the strategy's answer and what it cost."""
    fn = get_strategy(strategy)
    p0, v0 = _usage(policy.usage), _usage(verifier.usage if verifier is not None else None)
    out = fn(row["question"], policy, verifier, cfg, row.get("answer"))
    p = policy.usage.minus(p0)
    v = verifier.usage.minus(v0) if verifier is not None else Usage()
    record = {"source": row.get("source"), "difficulty": row.get("difficulty"), "expected": row["answer"],
              "answer": out.answer, "correct": out.answer is not None and out.answer == row["answer"],
              "text": out.text, "candidates": len(out.candidates),
              "prompt_tokens": p.prompt_tokens, "generated_tokens": p.generated_tokens,
              "verifier_tokens": v.generated_tokens,
              "policy_flops": p.flops if p.flops_known else None, "verifier_flops": v.flops,
              "timeouts": p.timeouts + v.timeouts, "server_errors": p.server_errors + v.server_errors}
    record["flops"] = None if record["policy_flops"] is None else record["policy_flops"] + v.flops
    for key in ("chosen", "level", "metric", "rounds", "accepted", "attempt_answers", "answers_by_round",
                "flops_by_round"):
        if key in out.info:
            record[key] = out.info[key]
    return record


def _mean(values: Sequence) -> float | None:
    return None if any(v is None for v in values) or not values else sum(values) / len(values)


def budget_curve(records: Sequence[dict]) -> list[dict] | None:
    """self_correct at every budget b up to the run's: accuracy (Wilson 95% interval) of the
    answers it gives after at most b regenerations, and mean FLOPs per problem spent by then.
    None unless every record has the loop's answers by round."""
    if not records or any("answers_by_round" not in r for r in records):
        return None
    curve = []
    for b in range(min(len(r["answers_by_round"]) for r in records)):
        correct = sum(r["answers_by_round"][b] is not None and r["answers_by_round"][b] == r["expected"]
                      for r in records)
        lo, hi = wilson_interval(correct, len(records))
        curve.append({"budget": b, "correct": correct, "accuracy": correct / len(records), "ci95": [lo, hi],
                      "flops": _mean([r["flops_by_round"][b] for r in records])})
    return curve


def summarize(records: Sequence[dict]) -> dict:
    """Accuracy (Wilson 95% interval), mean tokens and FLOPs per problem, timeouts; and
    self_correct's accuracy by budget (budget_curve)."""
    k = len(records)
    correct = sum(r["correct"] for r in records)
    lo, hi = wilson_interval(correct, k)

    def mean(key):
        return _mean([r[key] for r in records])

    summary = {"problems": k, "correct": correct, "accuracy": correct / k if k else 0.0, "ci95": [lo, hi],
               "prompt_tokens": mean("prompt_tokens"), "generated_tokens": mean("generated_tokens"),
               "verifier_tokens": mean("verifier_tokens"), "policy_flops": mean("policy_flops"),
               "verifier_flops": mean("verifier_flops"), "flops": mean("flops"),
               "timeouts": sum(r["timeouts"] for r in records),
               "server_errors": sum(r["server_errors"] for r in records)}
    if (curve := budget_curve(records)) is not None:
        summary["by_budget"] = curve
    return summary


def run_search(rows: Sequence[dict], strategy: str, policy: Policy, verifier: Verifier | None, cfg: SearchConfig,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """A strategy over problems: {"strategy", "config", "summary", "by_difficulty", "records"}."""
    cfg.check()
    if strategy in NEEDS_VERIFIER and verifier is None:
        get_strategy(strategy)
        raise InvalidArgument(f"{strategy} needs a verifier (--verifier: a reward model folder)")
    records = []
    for i, row in enumerate(rows):
        records.append(solve_problem(row, strategy, policy, verifier, cfg))
        if progress is not None:
            progress(i + 1, len(rows))
    bins: dict = {}
    for r in records:
        bins.setdefault(r["difficulty"], []).append(r)
    config = {k: v for k, v in cfg.__dict__.items() if k != "table"}
    if cfg.table is not None:
        config["table"] = cfg.table.to_json()
    return {"strategy": strategy, "config": config, "summary": summarize(records),
            "by_difficulty": {str(d): summarize(rs) for d, rs in sorted(bins.items(), key=lambda x: (x[0] is None,
                                                                                                        x[0] or 0))},
            "records": records}


def fit_compute_optimal(rows: Sequence[dict], policy: Policy, verifier: Verifier | None, cfg: SearchConfig,
                        candidates: Sequence[tuple[str, int, int]], estimator: str = "verifier", probe_n: int = 4,
                        bins: int = 5) -> Table:
    """compute_optimal's table, fitted on held-out problems: each problem's probe metric, then every
    candidate (strategy, n, width) run on every problem (strategies.fit_table chooses per bin)."""
    metrics = []
    for row in rows:
        m = difficulty(row["question"], policy, verifier, estimator, probe_n, cfg, row.get("answer"))
        metrics.append(0.0 if m is None else m)
    results = {}
    for strategy, n, width in candidates:
        sub = SearchConfig(**{**cfg.__dict__, "n": n, "width": width, "table": None})
        recs = [solve_problem(row, strategy, policy, verifier, sub) for row in rows]
        results[(strategy, n, width)] = [(r["correct"], r["flops"] or 0.0) for r in recs]
    return fit_table(metrics, results, min(bins, len(rows)), estimator, probe_n)


# -------------------------------------------------------------------------------- the plot
def accuracy_axes(ax, title: str, xlabel: str = "FLOPs per problem") -> None:
    """A panel of accuracy (0-1) against FLOPs per problem on a log axis."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # a narrow FLOPs range: no crowded minor labels
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)


def plot(runs: Sequence[dict], out: str | Path) -> None:
    """Accuracy (95% interval bars) against FLOPs per problem, a line per strategy (self_correct's
    points: its budgets), a panel per difficulty bin and one for all problems."""
    try:
        import matplotlib
    except ImportError:
        raise InvalidArgument("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = sorted({d for run in runs for d in run["by_difficulty"]}, key=lambda d: (not d.isdigit(), int(d) if
                                                                                     d.isdigit() else 0, d))
    panels = ["all", *bins]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    strategies = list(dict.fromkeys(run["strategy"] for run in runs))
    for ax, panel in zip(axes.flat, panels):
        for name in strategies:
            points = []
            for run in runs:
                if run["strategy"] != name:
                    continue
                s = run["summary"] if panel == "all" else run["by_difficulty"].get(panel)
                for point in (s.get("by_budget", [s]) if s else []):
                    if point["flops"] is not None:
                        points.append((point["flops"], point["accuracy"], point["ci95"]))
            if not points:
                continue
            points.sort()
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            err = [[y - p[2][0] for y, p in zip(ys, points)], [p[2][1] - y for y, p in zip(ys, points)]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=2, label=name)
        accuracy_axes(ax, "all problems" if panel == "all" else f"difficulty {panel}")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------- the CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Run test-time search strategies over a problem file (emergence problems): accuracy with a "
                     "95% interval, tokens and FLOPs per problem. The policy and verifier are local models or "
                     "(the policy) an OpenAI-compatible endpoint.")
    p.add_argument("--problems", required=True, metavar="FILE.jsonl",
                   help="problems (emergence problems' rows or GSM8K)")
    p.add_argument("--strategy", required=True, metavar="NAME[,NAME...]",
                   help="one or more (comma-separated) of: " + ", ".join(STRATEGIES))
    p.add_argument("--n", type=int, default=4, metavar="N", help="samples or beams per problem (default %(default)s)")
    p.add_argument("--width", type=int, default=4, metavar="M",
                   help="beam width / DVTS subtree width (default %(default)s)")
    p.add_argument("--policy", required=True, metavar="MODEL|URL",
                   help="a model (as --model takes) or an OpenAI-compatible endpoint URL (http://host:port)")
    p.add_argument("--verifier", default=None, metavar="MODEL", help="a reward model folder (with its tokenizer)")
    p.add_argument("--verifier-kind", default="prm", choices=KINDS, help="prm: a score per step; orm: one per solution")
    p.add_argument("--aggregation", default="last", choices=AGGREGATIONS, help="PRM step scores -> one (default last)")
    p.add_argument("--lookahead", type=int, default=0, metavar="K",
                   help="beam search: greedy steps rolled out before scoring")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per solution (default %(default)s)")
    p.add_argument("--step-tokens", type=int, default=64,
                   help="tokens per step in step-wise search (default %(default)s)")
    p.add_argument("--max-steps", type=int, default=10, help="rounds of step-wise search (default %(default)s)")
    p.add_argument("--window", type=int, default=4,
                   help="revisions: previous attempts in the prompt (default %(default)s)")
    p.add_argument("--budget", type=int, default=4, metavar="B",
                   help="self_correct: regenerations after the first sample; accuracy is reported at every "
                        "budget 0 .. B (default %(default)s)")
    p.add_argument("--threshold", type=float, default=0.5, metavar="T",
                   help="self_correct: a PRM step score below T rejects the step (default %(default)s)")
    p.add_argument("--heldout", default=None, metavar="FILE.jsonl",
                   help="compute_optimal: held-out problems its table is fitted on")
    p.add_argument("--estimator", default="verifier", choices=ESTIMATORS,
                   help="compute_optimal's difficulty: the verifier's mean score, or (oracle) the probe's pass rate")
    p.add_argument("--probe-n", type=int, default=4, help="compute_optimal: probe samples per problem")
    p.add_argument("--bins", type=int, default=5, help="compute_optimal: difficulty bins (default %(default)s)")
    p.add_argument("--limit", type=int, default=None, metavar="K", help="only the first K problems")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--plot", default=None, metavar="OUT.png",
                   help="also run N = 1, 2, 4 ... up to --n and draw accuracy against FLOPs per strategy and "
                        "difficulty")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds an endpoint may take to answer a request")
    p.add_argument("--policy-model", default=None, metavar="NAME",
                   help="the endpoint's model name (default: its first)")
    p.add_argument("--flops-model", default=None, metavar="MODEL",
                   help="the endpoint's model, loaded here to count its tokens and FLOPs (default: not counted)")
    p.add_argument("--tokenizer-mismatch", default="reencode", choices=("reencode", "refuse"),
                   help="a verifier whose tokenizer differs from the policy's: re-encode the text, or refuse")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: as stored)")


def _policy(args: argparse.Namespace):
    from ..api import load

    if args.policy.startswith(("http://", "https://")):
        fm = tok = None
        if args.flops_model:
            from .flops import FlopsModel

            lm = load(args.flops_model, device="cpu")
            fm, tok = FlopsModel.of(lm.model), lm.tokenizer
        return HTTPPolicy(args.policy, model=args.policy_model, timeout=args.timeout, seed=args.seed,
                          flops_model=fm, tokenizer=tok), tok
    lm = load(args.policy, device=args.device, dtype=args.dtype)
    return LocalPolicy(lm, seed=args.seed, name=args.policy), lm.tokenizer


def _print_run(run: dict, file=None) -> None:
    file = file or sys.stdout
    s, c = run["summary"], run["config"]
    shape = f"N={c['n']}" + (f" M={c['width']}" if run["strategy"] in ("beam_search", "dvts") else "")
    if run["strategy"] == "self_correct":
        shape = f"budget={c['budget']} threshold={c['threshold']:g}"
    flops = "FLOPs not counted" if s["flops"] is None else (
        f"{s['flops']:.3g} FLOPs (policy {s['policy_flops']:.3g}, verifier {s['verifier_flops']:.3g})")
    print(f"{run['strategy']} {shape}: accuracy {s['accuracy']:.3f} (95% CI {s['ci95'][0]:.3f}-{s['ci95'][1]:.3f}) "
          f"on {s['problems']} problems; per problem {s['prompt_tokens']:.0f} prompt + {s['generated_tokens']:.0f} "
          f"generated tokens, {s['verifier_tokens']:.0f} verifier tokens, {flops}; {s['timeouts']} timeouts",
          file=file)
    if "by_budget" in s:
        print("  by budget: " + ", ".join(f"{b['budget']}: {b['accuracy']:.3f}" + (
            "" if b["flops"] is None else f" at {b['flops']:.3g} FLOPs") for b in s["by_budget"]), file=file)
    if len(run["by_difficulty"]) > 1:
        for d, b in run["by_difficulty"].items():
            f = "-" if b["flops"] is None else f"{b['flops']:.3g}"
            print(f"  difficulty {d}: {b['correct']}/{b['problems']} = {b['accuracy']:.3f} "
                  f"({b['ci95'][0]:.2f}-{b['ci95'][1]:.2f}), {f} FLOPs per problem", file=file)


def command(args: argparse.Namespace) -> None:
    from ..files import check_output
    from ..problems import load_problems

    names = [s.strip() for s in args.strategy.split(",") if s.strip()]
    for name in names:
        get_strategy(name)
    if not names:
        raise InvalidArgument("--strategy names no strategy")
    cfg = SearchConfig(n=args.n, width=args.width, aggregation=args.aggregation, lookahead=args.lookahead,
                       temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                       step_tokens=args.step_tokens, max_steps=args.max_steps, window=args.window,
                       budget=args.budget, threshold=args.threshold)
    cfg.check()
    for name in names:  # bad combinations before any model loads
        if name in ("beam_search", "dvts"):
            from .strategies import _check_width

            _check_width(cfg, name)
        if name in NEEDS_VERIFIER and args.verifier is None:
            raise InvalidArgument(f"{name} needs a verifier (--verifier: a reward model folder)")
        if name == "compute_optimal" and args.heldout is None:
            raise InvalidArgument("compute_optimal needs held-out problems to fit its table on (--heldout FILE.jsonl)")
    if args.limit is not None and args.limit < 1:
        raise InvalidArgument(f"--limit must be at least 1, got {args.limit}")
    rows = load_problems(args.problems)[:args.limit]
    heldout = load_problems(args.heldout) if args.heldout else None
    if args.plot:
        check_output(args.plot, folder=False, force=True)
    verifier = None
    if args.verifier is not None:
        verifier = load_verifier(args.verifier, kind=args.verifier_kind, device=args.device, dtype=args.dtype)
    policy, policy_tokenizer = _policy(args)
    if verifier is not None:
        notice = check_tokenizers(policy_tokenizer, verifier.tokenizer, args.policy, args.verifier,
                                  args.tokenizer_mismatch)
        if notice:
            verifier.check_roundtrip = True
            print(f"emergence: note: {notice}", file=sys.stderr)
    sizes = [args.n]
    if args.plot:
        sizes = sorted({2 ** k for k in range(args.n.bit_length()) if 2 ** k <= args.n} | {args.n})
    runs = []
    for name in names:
        for n in sizes:
            if name in ("beam_search", "dvts") and (n < args.width or n % args.width):
                continue
            if name == "self_correct" and n != args.n:  # N is not its knob: its budgets come from one run
                continue
            sub = SearchConfig(**{**cfg.__dict__, "n": n})
            if name == "compute_optimal":
                candidates = [(s, k, args.width) for s in ("majority", "best_of_n", "weighted_best_of_n",
                                                           "beam_search", "dvts")
                              for k in sorted({2 ** j for j in range(n.bit_length()) if 2 ** j <= n} | {n})
                              if (s in ("majority",) or verifier is not None)
                              and (s not in ("beam_search", "dvts") or (k >= args.width and k % args.width == 0))]
                sub.table = fit_compute_optimal(heldout, policy, verifier, sub, candidates, args.estimator,
                                                args.probe_n, args.bins)
            runs.append(run_search(rows, name, policy, verifier, sub))
            if not args.json:
                _print_run(runs[-1])
    timeouts = sum(r["summary"]["timeouts"] for r in runs)
    if timeouts:
        print(f"emergence: warning: {timeouts} requests to {args.policy} got no answer within {args.timeout:g} s "
              "(counted as timeouts; their problems score as wrong)", file=sys.stderr)
    if args.plot:
        plot(runs, args.plot)
        if not args.json:
            print(f"plot written to {args.plot}")
    if args.json:
        print(json.dumps(runs[0] if len(runs) == 1 else {"runs": runs}, indent=1, default=str))
