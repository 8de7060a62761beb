"""Test-time compute's headline at small scale (docs/test_time_compute.md, "The headline"):
accuracy against FLOPs for every strategy of `emergence.search` on the smallest policy, per
difficulty, against greedy decoding of policies up to ~10x larger; the self-correcting loop's
gain per extra regeneration; and the GRPO-trained policy (docs/alignment.md) through every
strategy.

    .venv/bin/python bench/test_time_compute.py --run RUN --verifier VRUN/prm [--grpo R1/grpo/model]
    .venv/bin/python bench/test_time_compute.py --smoke --out-dir /tmp/ttc   # < 1 min, what the test runs

RUN is an `emergence search-train --setting long --out RUN` folder (policies S, M, L and the
held-out problems); VRUN/prm a process reward model of the size of the smallest policy (the
same run's stages with `rm_init="S"`: see the doc). Every (policy, strategy, N) run is one
`emergence.search.run_search` over the same held-out problems with a fresh seeded policy, cached
under --work (a rerun skips finished runs). compute_optimal's table is fitted on problems of
another seed (FIT_SEED), never the test problems. Results: bench/results/test_time_compute.json
(summaries and provenance), .csv (one row per run and difficulty), docs/test_time_compute.png
(accuracy against FLOPs per difficulty), docs/test_time_compute_budget.png (self_correct by
budget), and the headline section of docs/test_time_compute.md between its markers.

FLOPs per problem are the policy's and the verifier's (2 x parameters x tokens plus attention,
search/flops.py): the prompt is prefilled once and its N samples share its KV cache.

When RUN holds S's revision model (search-train's revision stages, which bench/revisions.py runs
and measures on its own), sequential revisions with it are among S's runs: one run of the largest
N, one previous attempt in the prompt, majority vote; it gives a point for every N.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

RESULTS = ROOT / "bench" / "results" / "test_time_compute.json"
CSV = ROOT / "bench" / "results" / "test_time_compute.csv"
DOC = ROOT / "docs" / "test_time_compute.md"
PLOT = ROOT / "docs" / "test_time_compute.png"
BUDGET_PLOT = ROOT / "docs" / "test_time_compute_budget.png"
MARK_START, MARK_END = "<!-- headline:start (bench/test_time_compute.py) -->", "<!-- headline:end -->"
FIT_SEED = 4242  # compute_optimal's fitting problems (search-train's problems use seed 0)

# the grid: N per strategy (beam search and DVTS with width 4), self_correct's largest budget
FULL = {"per_difficulty": 50, "fit_per_difficulty": 25, "ns": [1, 2, 4, 8, 16, 32], "verifier_ns": [2, 4, 8, 16, 32],
        "tree_ns": [4, 8, 16, 32], "width": 4, "budget": 8, "grpo_ns": [4, 16], "co_max_n": 16, "probe_n": 4,
        "bins": 4, "max_tokens": 160, "temperature": 0.8, "revision_window": 1}
SMOKE = {"per_difficulty": 2, "fit_per_difficulty": 2, "ns": [1, 2, 4], "verifier_ns": [2, 4], "tree_ns": [4],
         "width": 2, "budget": 2, "grpo_ns": [2], "co_max_n": 2, "probe_n": 2, "bins": 2, "max_tokens": 48,
         "temperature": 0.8, "revision_window": 1}
STRATEGY_NAMES = {"greedy": "greedy", "majority": "majority vote", "best_of_n": "best-of-N (PRM last)",
                  "weighted_best_of_n": "weighted best-of-N", "beam_search": "PRM beam search",
                  "dvts": "DVTS", "self_correct": "self-correcting loop", "compute_optimal": "compute-optimal",
                  "revisions": "sequential revisions (revision model)"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ the plan
def jobs(p: dict, has_grpo: bool, has_reviser: bool = False) -> list[dict]:
    """Every run: {"key", "policy", "strategy", "n", "width", "budget", "temperature", "model"}:
    `model` is the policy's, except sequential revisions', which run S's revision model (search-
    train's revision stages; has_reviser: the run has one) as S's strategy."""
    out = []

    def add(policy, strategy, n=1, temperature=p["temperature"], budget=0, model=None):
        width = p["width"] if strategy in ("beam_search", "dvts") else 1
        key = f"{policy}-{strategy}-n{n}" + (f"-b{budget}" if strategy == "self_correct" else "")
        out.append({"key": key, "policy": policy, "strategy": strategy, "n": n, "width": width, "budget": budget,
                    "temperature": temperature, "model": model or policy})

    for name in ("S", "M", "L") + (("GRPO",) if has_grpo else ()):
        add(name, "greedy", 1, temperature=0.0)
    for n in p["ns"]:
        add("S", "majority", n)
    for n in p["verifier_ns"]:
        add("S", "best_of_n", n)
        add("S", "weighted_best_of_n", n)
    for n in p["tree_ns"]:
        add("S", "beam_search", n)
        add("S", "dvts", n)
    add("S", "self_correct", 1, budget=p["budget"])
    add("S", "compute_optimal", p["co_max_n"])
    if has_reviser:  # one run of the largest N gives every N (the majority after each attempt)
        add("S", "revisions", max(p["ns"]), model="S-rev")
    if has_grpo:  # the GRPO policy through every strategy
        for n in p["grpo_ns"]:
            for s in ("majority", "best_of_n", "weighted_best_of_n", "beam_search", "dvts"):
                if s in ("beam_search", "dvts") and n % p["width"]:
                    continue
                add("GRPO", s, n)
        add("GRPO", "self_correct", 1, budget=p["budget"])
    return out


def fit_problems(p: dict, avoid: set[str]) -> list[dict]:
    """compute_optimal's fitting split: FIT_SEED problems, per_difficulty of each 1..8, none of them
    a question of the run (train, verifier or held-out)."""
    from emergence.problems import first_per_difficulty, generate_problems

    fresh = [r for r in generate_problems(16 * 8 * p["fit_per_difficulty"], (1, 8), seed=FIT_SEED)
             if r["question"] not in avoid]
    return [{**r, "source": f"fit:{i}"} for i, r in enumerate(first_per_difficulty(fresh, p["fit_per_difficulty"]))]


# ------------------------------------------------------------------------------ one run
class Models:
    """Policies and the verifier, loaded once; a fresh seeded LocalPolicy per run."""

    def __init__(self, paths: dict[str, Path], verifier: Path) -> None:
        self.paths, self.verifier_path, self._lm, self._verifier = paths, verifier, {}, None

    def lm(self, name: str):
        import emergence

        if name not in self._lm:
            self._lm[name] = emergence.load(str(self.paths[name]), device="cpu")
        return self._lm[name]

    def policy(self, name: str, seed: int = 0):
        from emergence.search import LocalPolicy

        return LocalPolicy(self.lm(name), seed=seed, name=name)

    def verifier(self):
        from emergence.search.verifier import load_verifier

        if self._verifier is None:
            self._verifier = load_verifier(str(self.verifier_path), kind="prm", device="cpu")
        return self._verifier

    def params(self, name: str) -> int:
        return self.lm(name).config.num_parameters()


def run_job(job: dict, models: Models, rows: list[dict], fit_rows: list[dict], p: dict) -> dict:
    from emergence.search.run import fit_compute_optimal, run_search
    from emergence.search.strategies import SearchConfig

    strategy = "majority" if job["strategy"] == "greedy" else job["strategy"]
    cfg = SearchConfig(n=job["n"], width=job["width"], aggregation="last", temperature=job["temperature"],
                       max_tokens=p["max_tokens"], step_tokens=64, max_steps=10, budget=job["budget"],
                       window=p["revision_window"])
    policy = models.policy(job.get("model", job["policy"]))
    verifier = models.verifier()
    if strategy == "compute_optimal":
        ns = [n for n in p["ns"] if n <= job["n"]]
        candidates = [(s, n, p["width"] if s in ("beam_search", "dvts") else 1)
                      for s in ("majority", "best_of_n", "weighted_best_of_n", "beam_search", "dvts") for n in ns
                      if (s == "majority" or n >= 2) and (s not in ("beam_search", "dvts") or
                                                         (n >= p["width"] and n % p["width"] == 0))]
        t = time.perf_counter()
        cfg.table = fit_compute_optimal(fit_rows, models.policy(job["policy"], seed=1), verifier, cfg, candidates,
                                        "verifier", p["probe_n"], p["bins"])
        log(f"  compute_optimal table fitted on {len(fit_rows)} problems in {time.perf_counter() - t:.0f} s: "
            + "; ".join(f"level {c['level']}: {c['strategy']}@{c['n']}" for c in cfg.table.to_json()["bins"]))
    from emergence.progress import Progress

    start = time.perf_counter()
    meter = Progress(len(rows), "problems", desc=f"  {job['key']}", every_s=20.0)
    voting = strategy in ("majority", "revisions")  # (revisions vote: the PRM cannot rank one problem's samples)
    res = run_search(rows, strategy, policy, None if voting else verifier, cfg,
                     lambda i, total: meter.update(1))
    meter.close()
    res["seconds"] = time.perf_counter() - start
    res["job"] = job
    return res


# ------------------------------------------------------------------------------ analysis
def points(res: dict) -> list[dict]:
    """The run's (accuracy, FLOPs) points: one, or self_correct's one per budget, or sequential
    revisions' one per N (the majority after N attempts)."""
    job = res["job"]
    out = []
    for panel in ["all", *res["by_difficulty"]]:
        s = res["summary"] if panel == "all" else res["by_difficulty"][panel]
        if job["strategy"] in ("self_correct", "revisions"):
            revising = job["strategy"] == "revisions"
            for b in s["by_budget"]:
                out.append({"panel": panel, "budget": None if revising else b["budget"],
                            "n": b["budget"] + 1 if revising else job["n"], "correct": b["correct"],
                            "problems": s["problems"], "accuracy": b["accuracy"], "ci95": b["ci95"],
                            "flops": b["flops"]})
        else:
            out.append({"panel": panel, "budget": None, "n": job["n"], "correct": s["correct"],
                        "problems": s["problems"], "accuracy": s["accuracy"], "ci95": s["ci95"], "flops": s["flops"]})
    return out


def headline(runs: dict[str, dict], small: str, large: str) -> list[dict]:
    """Per difficulty (and all): greedy of `large` against the best run of `small` whose FLOPs per
    problem (in that bin) are at most large's greedy FLOPs, and against small's compute-optimal run
    (its choice made on other problems: no hindsight)."""
    big = runs[f"{large}-greedy-n1"]
    rows = []
    for panel in ["all", *big["by_difficulty"]]:
        ref = big["summary"] if panel == "all" else big["by_difficulty"][panel]
        best = None
        for key, res in runs.items():
            if res["job"]["policy"] != small or res["job"]["strategy"] == "compute_optimal":
                continue
            for pt in points(res):
                if pt["panel"] != panel or pt["flops"] is None or pt["flops"] > ref["flops"]:
                    continue
                cand = (pt["accuracy"], -pt["flops"])
                if best is None or cand > best[0]:
                    label = res["job"]["strategy"] + (f"@{pt['n']}" if res["job"]["strategy"] not in
                                                      ("greedy", "self_correct") else "")
                    if res["job"]["strategy"] == "self_correct":
                        label += f" budget {pt['budget']}"
                    best = (cand, {**pt, "label": label})
        co = next((r for r in runs.values() if r["job"]["policy"] == small
                   and r["job"]["strategy"] == "compute_optimal"), None)
        co_s = None if co is None else (co["summary"] if panel == "all" else co["by_difficulty"].get(panel))
        row = {"panel": panel, "large": {"accuracy": ref["accuracy"], "ci95": ref["ci95"], "flops": ref["flops"],
                                         "correct": ref["correct"], "problems": ref["problems"]},
               "small_best": None if best is None else best[1],
               "small_compute_optimal": None if co_s is None else {k: co_s[k] for k in ("accuracy", "ci95", "flops",
                                                                                        "correct", "problems")}}
        b = row["small_best"]
        row["verdict"] = ("-" if b is None else "small wins" if b["ci95"][0] > ref["ci95"][1] else
                          "large wins" if ref["ci95"][0] > b["ci95"][1] else "tie (intervals overlap)")
        rows.append(row)
    return rows


def write_csv(runs: dict[str, dict], params: dict[str, int], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["policy", "parameters", "strategy", "n", "width", "budget", "difficulty", "problems", "correct",
                    "accuracy", "ci95_low", "ci95_high", "flops_per_problem"])
        for res in runs.values():
            j = res["job"]
            for pt in points(res):
                w.writerow([j["policy"], params[j["policy"]], j["strategy"], pt["n"], j["width"],
                            pt["budget"] if pt["budget"] is not None else "", pt["panel"], pt["problems"],
                            pt["correct"], f"{pt['accuracy']:.4f}", f"{pt['ci95'][0]:.4f}", f"{pt['ci95'][1]:.4f}",
                            "" if pt["flops"] is None else f"{pt['flops']:.4g}"])


def summaries(runs: dict[str, dict]) -> dict:
    """What the JSON keeps of each run: its job, summary and per-difficulty summaries."""
    return {k: {"job": r["job"], "seconds": r["seconds"], "summary": r["summary"], "by_difficulty": r["by_difficulty"],
                **({"table": r["config"]["table"]} if "table" in r["config"] else {})} for k, r in runs.items()}


# ------------------------------------------------------------------------------ plots
def plot(result: dict, out: Path, budget_out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from emergence.search.run import accuracy_axes

    runs = result["runs"]
    # (error bars clamped at 0: results written before search.flops' Wilson bounds were exact at
    # 0 and 1 hold lower bounds of ~1e-17 above an accuracy of 0)
    panels = ["all", *sorted({d for r in runs.values() for d in r["by_difficulty"]}, key=int)]
    cols = 3
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(13, 3.3 * -(-len(panels) // cols)),
                             squeeze=False)
    small = "S"
    for ax, panel in zip(axes.flat, panels):
        for strategy in ("majority", "best_of_n", "weighted_best_of_n", "beam_search", "dvts", "self_correct",
                         "revisions"):
            pts = sorted((pt["flops"], pt["accuracy"], pt["ci95"]) for r in runs.values()
                         if r["job"]["policy"] == small and r["job"]["strategy"] == strategy
                         for pt in points(r) if pt["panel"] == panel and pt["flops"] is not None)
            if pts:
                ax.errorbar([x[0] for x in pts], [x[1] for x in pts],
                            yerr=[[max(0.0, x[1] - x[2][0]) for x in pts], [max(0.0, x[2][1] - x[1]) for x in pts]], marker="o",
                            ms=3, capsize=2, lw=1, label=f"S: {STRATEGY_NAMES[strategy]}")
        for name, marker in (("S", "s"), ("M", "^"), ("L", "D"), ("GRPO", "*")):
            r = runs.get(f"{name}-greedy-n1")
            if r is None:
                continue
            s = r["summary"] if panel == "all" else r["by_difficulty"][panel]
            ax.errorbar([s["flops"]], [s["accuracy"]], yerr=[[max(0.0, s["accuracy"] - s["ci95"][0])],
                                                            [max(0.0, s["ci95"][1] - s["accuracy"])]],
                        marker=marker, ms=8, color="black", capsize=2, ls="none", mfc="white" if name != "L" else
                        "black", label=f"{name} greedy ({result['params'][name] / 1e6:.2f}M)")
        co = next((r for r in runs.values() if r["job"]["strategy"] == "compute_optimal"), None)
        if co is not None:
            s = co["summary"] if panel == "all" else co["by_difficulty"][panel]
            ax.plot([s["flops"]], [s["accuracy"]], marker="P", ms=9, color="red", ls="none",
                    label="S: compute-optimal")
        accuracy_axes(ax, "all problems" if panel == "all" else f"difficulty {panel} ({panel} "
                      f"step{'s' * (panel != '1')})", "FLOPs per problem (policy + verifier)")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in runs.values():
        if r["job"]["strategy"] != "self_correct":
            continue
        curve = r["summary"]["by_budget"]
        ax.errorbar([b["budget"] for b in curve], [b["accuracy"] for b in curve],
                    yerr=[[max(0.0, b["accuracy"] - b["ci95"][0]) for b in curve],
                          [max(0.0, b["ci95"][1] - b["accuracy"]) for b in curve]],
                    marker="o", capsize=2, label=f"policy {r['job']['policy']}")
    ax.set_xlabel("budget (regenerations after the first sample)")
    ax.set_ylabel("accuracy (all problems)")
    ax.set_title("self-correcting loop: generate, PRM-check each step, regenerate")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(budget_out, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------ the page
def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _ci(s: dict) -> str:
    return f"{100 * s['accuracy']:.1f}% [{100 * s['ci95'][0]:.0f}, {100 * s['ci95'][1]:.0f}]"


def render(result: dict) -> str:
    runs, p, params = result["runs"], result["settings"], result["params"]
    large = result["large"]
    lines = [MARK_START, "", "## The headline: a small policy with search against greedy decoding of larger ones", "",
             "`bench/test_time_compute.py` (results: `bench/results/test_time_compute.json`, one CSV row per run and "
             "difficulty in `test_time_compute.csv`). Policies of the long run: "
             + ", ".join(f"{n} {params[n]:,}" for n in ("S", "M", "L")) + " parameters"
             + (f"; GRPO: policy M after the R1-zero run of docs/alignment.md ({params['GRPO']:,})" if "GRPO" in params
                else "") + f". Verifier: the PRM `{result['verifier_name']}` ({params['verifier']:,} parameters with its "
             f"head; beam search and DVTS with width M = {p['width']}). {result['problems']} held-out problems, {p['per_difficulty']} per "
             f"difficulty (steps) 1-8; samples at temperature {p['temperature']}, up to {p['max_tokens']} tokens; "
             f"compute-optimal's table fitted on {result['fit_problems']} problems of another seed ({p['bins']} "
             f"difficulty bins by the PRM's mean score over {p['probe_n']} probe samples, candidates every strategy "
             f"at N <= {p['co_max_n']}). FLOPs per problem: policy + verifier, 2 x parameters x tokens + attention, "
             f"the prompt prefilled once.", "",
             f"### Policy S with its best run at equal or lower FLOPs, against greedy decoding of {large} "
             f"({params[large] / params['S']:.1f}x the parameters)", "",
             f"Per difficulty: {large}'s greedy accuracy (Wilson 95% interval) and FLOPs per problem; the run of S "
             f"with the best accuracy among those that spend at most as many FLOPs in that bin (chosen in hindsight, "
             f"on these problems); S's compute-optimal run (chosen per problem from its probe, on a table fitted "
             f"elsewhere); and which side's interval lies above the other's.", "",
             f"| difficulty | {large} greedy | its FLOPs | S: best run at <= FLOPs | accuracy | its FLOPs | "
             f"S: compute-optimal | its FLOPs | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in result["headline"]:
        b, co = row["small_best"], row["small_compute_optimal"]
        lines.append(f"| {row['panel']} | {_ci(row['large'])} | {row['large']['flops']:.3g} | "
                     + (f"{b['label']} | {_ci(b)} | {b['flops']:.3g}" if b else "- | - | -") + " | "
                     + (f"{_ci(co)} | {co['flops']:.3g}" if co else "- | -") + f" | {row['verdict']} |")
    lines += ["", "Greedy decoding of every policy (accuracy, Wilson 95% interval):", "",
              "| policy | parameters | all | " + " | ".join(f"d{d}" for d in range(1, 9)) + " | FLOPs per problem |",
              "|---|---|---|" + "---|" * 8 + "---|"]
    for name in ("S", "M", "L", "GRPO"):
        r = runs.get(f"{name}-greedy-n1")
        if r is None:
            continue
        lines.append(f"| {name} | {params[name]:,} | {_ci(r['summary'])} | "
                     + " | ".join(_pct(r["by_difficulty"][str(d)]["accuracy"]) if str(d) in r["by_difficulty"] else "-"
                                  for d in range(1, 9)) + f" | {r['summary']['flops']:.3g} |")
    lines += ["", "Every run of policy S (all problems; per difficulty in the CSV and the plot):", "",
              "| strategy | N | accuracy | FLOPs per problem | generated tokens | verifier tokens |",
              "|---|---|---|---|---|---|"]
    for key, r in runs.items():
        j = r["job"]
        if j["policy"] != "S":
            continue
        s = r["summary"]
        lines.append(f"| {STRATEGY_NAMES[j['strategy']]} | {j['n'] if j['strategy'] != 'self_correct' else '-'} | "
                     f"{_ci(s)} | {s['flops']:.3g} | {s['generated_tokens']:.0f} | {s['verifier_tokens']:.0f} |")
    co = next((r for r in runs.values() if r["job"]["strategy"] == "compute_optimal"), None)
    if co is not None:
        lines += ["", "Compute-optimal's table (fitted on the other seed's problems; level 1 the easiest): "
                  + "; ".join(f"level {b['level']}: {b['strategy']}@{b['n']} ({_pct(b['accuracy'])} on "
                              f"{b['problems']} fitting problems)" for b in co["table"]["bins"]) + "."]
    lines += ["", "![accuracy against FLOPs per difficulty](test_time_compute.png)", ""]
    # reasoning loops
    lines += ["### The self-correcting loop: accuracy per extra regeneration", "",
              f"`self_correct` (PRM threshold 0.5, up to {p['budget']} regenerations from the first rejected step); "
              f"one run gives every smaller budget. All {result['problems']} problems:", "",
              "| policy | " + " | ".join(f"budget {b}" for b in range(p["budget"] + 1)) + " |",
              "|---|" + "---|" * (p["budget"] + 1)]
    gains = {}  # policy -> accuracy gained per extra regeneration, averaged over the budget
    for r in runs.values():
        if r["job"]["strategy"] != "self_correct":
            continue
        curve = r["summary"]["by_budget"]
        lines.append(f"| {r['job']['policy']} | " + " | ".join(f"{_pct(b['accuracy'])} ({b['flops']:.2g})"
                                                                for b in curve) + " |")
        gains[r["job"]["policy"]] = (curve[-1]["accuracy"] - curve[0]["accuracy"]) / max(1, len(curve) - 1)
    lines += ["", "(accuracy, and FLOPs per problem in brackets)", "",
              "Gain per extra regeneration, averaged over the budget: "
              + "; ".join(f"policy {name} {100 * g:+.2f} points" for name, g in gains.items()) + ".", "",
              "![self-correcting loop by budget](test_time_compute_budget.png)", ""]
    if "GRPO" in params:
        lines += ["### The GRPO-trained policy through every strategy", "",
                  "| strategy | N | accuracy | FLOPs per problem |", "|---|---|---|---|"]
        for r in runs.values():
            j = r["job"]
            if j["policy"] == "GRPO":
                lines.append(f"| {STRATEGY_NAMES[j['strategy']]} | {j['n'] if j['strategy'] != 'self_correct' else '-'}"
                             f" | {_ci(r['summary'])} | {r['summary']['flops']:.3g} |")
        lines.append("")
    lines += [f"Run at {result['commit'][:12]} ({result['date']}): `bench/test_time_compute.py --run RUN --verifier "
              f"VRUN/prm --grpo R1/grpo/model --work DIR`, {result['total_seconds'] / 60:.0f} min of runs on "
              f"{result['threads']} torch thread(s) ({result['machine']['cpu']}); the exact command is in the JSON.",
              "", MARK_END]
    return "\n".join(lines)


def update_doc(result: dict) -> None:
    text = DOC.read_text()
    block = render(result)
    if MARK_START in text:
        head, rest = text.split(MARK_START, 1)
        tail = rest.split(MARK_END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(text)


# ------------------------------------------------------------------------------ main
def smoke_run(work: Path) -> tuple[Path, Path]:
    """search-train's quick setting (seconds): its policies, problems and PRM."""
    from emergence.search.train import run as train_run

    train_run(work / "run", "quick", device="cpu", log=lambda m: None)
    return work / "run", work / "run" / "prm"


def run_settings(ap: argparse.ArgumentParser, args, smoke: dict, full: dict):
    """(settings, temporary folder or None, cache folder) of a search benchmark's run: --smoke
    needs --out-dir (it never replaces the committed results), a real run needs --run; finished
    runs are cached in --work/runs (a temporary folder without --work). bench/revisions.py too."""
    if args.smoke and not args.out_dir:
        ap.error("--smoke needs --out-dir (it never replaces the committed results)")
    if not args.smoke and not args.run:
        ap.error("--run RUN is needed (an `emergence search-train --setting long` folder)")
    tmp = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(args.work or tmp.name)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    return dict(smoke if args.smoke else full), tmp, work


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=None, metavar="RUN", help="an `emergence search-train` folder (policies, problems)")
    ap.add_argument("--verifier", default=None, metavar="DIR", help="the PRM (default RUN/prm)")
    ap.add_argument("--verifier-name", default=None, help="how the page names the verifier (default its path)")
    ap.add_argument("--grpo", default=None, metavar="DIR", help="the GRPO-trained policy (bench/r1_zero.py's)")
    ap.add_argument("--large", default="L", choices=("M", "L"), help="the larger policy of the headline (default L)")
    ap.add_argument("--work", default=None, help="cache of finished runs (default: a temporary folder)")
    ap.add_argument("--only", default=None, metavar="PREFIX", help="only the runs whose key starts with PREFIX "
                    "(e.g. GRPO- to run that part in another process; then a call without it assembles)")
    ap.add_argument("--smoke", action="store_true", help="search-train's quick models, 2 problems per difficulty")
    ap.add_argument("--out-dir", default=None, help="--smoke: where the JSON, CSV and plots go (required)")
    ap.add_argument("--report-only", action="store_true", help="the page and plots from the committed JSON")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.report_only:
        result = json.loads(RESULTS.read_text())
        plot(result, PLOT, BUDGET_PLOT)
        update_doc(result)
        return 0
    p, tmp, work = run_settings(ap, args, SMOKE, FULL)
    if args.smoke and not args.run:
        run_dir, verifier = smoke_run(work)
    else:
        run_dir = Path(args.run)
        verifier = Path(args.verifier) if args.verifier else run_dir / "prm"
    from emergence.problems import first_per_difficulty, load_problems

    rows = first_per_difficulty(load_problems(run_dir / "problems" / "heldout.jsonl"), p["per_difficulty"])
    avoid = {r["question"] for split in ("train", "verifier", "heldout")
             for r in load_problems(run_dir / "problems" / f"{split}.jsonl")}
    fit_rows = fit_problems(p, avoid)
    paths = {n: run_dir / "policies" / n / "model" for n in ("S", "M", "L")}
    if args.grpo:
        paths["GRPO"] = Path(args.grpo)
    elif args.smoke:  # the smoke run walks the GRPO part with policy M standing in for it
        paths["GRPO"] = paths["M"]
    from emergence.search.train import SETTINGS

    reviser = run_dir / "revisions" / "S" / SETTINGS["long"].revision_attempts / "run" / "model"
    if (reviser / "config.json").is_file():  # search-train's revision model of S (bench/revisions.py's too)
        paths["S-rev"] = reviser
    models = Models(paths, verifier)
    plan = jobs(p, "GRPO" in paths, "S-rev" in paths)
    runs: dict[str, dict] = {}
    started = time.perf_counter()
    for i, job in enumerate(plan):
        cache = work / "runs" / f"{job['key']}.json"
        if cache.is_file():
            runs[job["key"]] = json.loads(cache.read_text())
            continue
        if args.only and not job["key"].startswith(args.only):
            continue
        log(f"[{i + 1}/{len(plan)}] {job['key']}")
        res = run_job(job, models, rows, fit_rows, p)
        cache.write_text(json.dumps(res) + "\n")
        runs[job["key"]] = res
    if args.only:
        log(f"runs starting with {args.only!r} done in {time.perf_counter() - started:.0f} s")
        return 0
    missing = [j["key"] for j in plan if j["key"] not in runs]
    if missing:
        raise SystemExit(f"test_time_compute: runs missing from {work}: {', '.join(missing)}")
    params = {n: models.params(n) for n in paths}
    params["verifier"] = sum(t.numel() for t in models.verifier().model.parameters())
    from provenance import write_result

    result = {"smoke": args.smoke, "settings": p, "problems": len(rows), "fit_problems": len(fit_rows),
              "fit_seed": FIT_SEED, "params": params, "verifier_name": args.verifier_name or str(verifier), "large": args.large, "date": time.strftime("%Y-%m-%d"),
              "total_seconds": sum(r["seconds"] for r in runs.values()),
              "headline": headline(runs, "S", args.large), "runs": summaries(runs)}
    out_json = Path(args.out_dir) / "test_time_compute.json" if args.smoke else RESULTS
    write_result(out_json, result, "bench/test_time_compute.py", sys.argv[1:] if argv is None else argv, args.threads)
    write_csv(runs, params, out_json.with_suffix(".csv"))
    if args.smoke:
        plot(result, Path(args.out_dir) / "test_time_compute.png", Path(args.out_dir) / "budget.png")
        (Path(args.out_dir) / "headline.md").write_text(render(result))
        # per-problem records for the test (the committed JSON keeps summaries only)
        (Path(args.out_dir) / "records.json").write_text(json.dumps({k: r["records"] for k, r in runs.items()}))
    else:
        plot(result, PLOT, BUDGET_PLOT)
        update_doc(result)
    log(f"wrote {out_json}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
