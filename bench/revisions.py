"""Sequential revisions against parallel sampling (docs/test_time_compute.md, "Sequential
revisions"): for each policy of the long run that search-train gives a revision model (S and M),
majority voting over N parallel samples against N attempts in sequence, each prompted with the
previous ones (`revisions`, majority vote over the attempts), as Snell et al. (2024) compare them.

    .venv/bin/python bench/revisions.py --run RUN [--attempts sampled|wrong] [--grpo DIR] [--work DIR]
    .venv/bin/python bench/revisions.py --smoke --out-dir /tmp/rev   # < 1 min, what the test runs

RUN is an `emergence search-train --setting long --out RUN` folder, finished or not (an empty
one will do): the script runs, or finds done, the stages of search-train it needs: the problems,
tokenizer and shards, policies S and M and their greedy evaluation (not L, not the verifiers;
two --policies calls may run in parallel once the shards exist), then
the revision stages for them (`revision-samples-P`,
`revision-P-KIND`: samples of P on 6,000 training problems, up to 4 of them before the canonical
solution, fine-tuned with as many plain rows; search/revise.py), which need neither policy L
nor the verifiers; --grpo adds the GRPO-trained policy of bench/r1_zero.py (from M) as a third,
given its own revision model the same way. --attempts picks the kind of revision rows
(revise.ATTEMPTS: the attempts as sampled, the setting's default; or Snell et al.'s wrong ones
only). Per policy P, over the same 400 held-out problems (50 per difficulty):

    P-majority-nN          P itself, N parallel samples, majority vote (N = 1, 2, 4, 8, 16)
    P-rev-majority-nN      the revision model, the same: what the fine-tuning alone changes
    P-rev-revisions-wW     the revision model, 16 attempts in sequence, the last W in the prompt
                           (W = 1 and 4): one run gives every N <= 16: the majority of the first
                           N attempts (`answers_by_round`, with the FLOPs spent by then) and
                           attempt N's own answer (does revising improve it?)
    P-revisions-w4         P itself prompted the same way: what the revision training adds

FLOPs per problem are the policy's (search/flops.py); parallel samples share their prompt's
prefill, sequential attempts each prefill their longer prompt. Results: bench/results/revisions.json
and .csv (the default kind; revisions_wrong.json and .csv for the other), the plots
docs/test_time_compute_revisions[_wrong].png, and the section of docs/test_time_compute.md
between the kind's markers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

DOC = ROOT / "docs" / "test_time_compute.md"
FULL = {"per_difficulty": 50, "ns": [1, 2, 4, 8, 16], "windows": [1, 4], "max_tokens": 160, "temperature": 0.8,
        "setting": "long"}
SMOKE = {"per_difficulty": 2, "ns": [1, 2, 4], "windows": [1, 2], "max_tokens": 48, "temperature": 0.8,
         "setting": "quick"}
BINS = {"easy (1-2 steps)": (1, 2), "medium (3-5)": (3, 5), "hard (6-8)": (6, 8)}


def outputs(kind: str) -> tuple[Path, Path, str, str]:
    """(results JSON, plot, the page's start and end markers) of a kind of revision rows: the
    setting's default kind has the plain names."""
    from emergence.search.train import SETTINGS

    suffix = "" if kind == SETTINGS["long"].revision_attempts else f"_{kind}"
    tag = "revisions" + suffix.replace("_", "-")
    return (ROOT / "bench" / "results" / f"revisions{suffix}.json",
            ROOT / "docs" / f"test_time_compute_revisions{suffix}.png",
            f"<!-- {tag}:start (bench/revisions.py) -->", f"<!-- {tag}:end -->")


def series_labels(p: dict) -> dict[str, str]:
    """series -> its label (P: the policy's name): the columns of the tables, in order."""
    out = {"majority": "parallel: P, majority of N", "rev-majority": "parallel: revision model, majority of N"}
    for w in p["windows"]:
        out[f"rev-revisions-w{w}"] = f"sequential (window {w}): revision model, majority of N attempts"
        out[f"rev-revisions-w{w}-last"] = f"sequential (window {w}): revision model, attempt N alone"
    out[f"revisions-w{max(p['windows'])}"] = f"sequential (window {max(p['windows'])}): P, majority of N attempts"
    return out


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def jobs(p: dict, policies: list[str]) -> list[dict]:
    """Every run: {"key", "policy" (P), "model" (P or P-rev), "strategy", "n", "window"}."""
    out = []
    top, widest = max(p["ns"]), max(p["windows"])
    for name in policies:
        for n in p["ns"]:
            out.append({"key": f"{name}-majority-n{n}", "policy": name, "model": name, "strategy": "majority", "n": n,
                        "window": None})
            out.append({"key": f"{name}-rev-majority-n{n}", "policy": name, "model": f"{name}-rev",
                        "strategy": "majority", "n": n, "window": None})
        for w in p["windows"]:
            out.append({"key": f"{name}-rev-revisions-w{w}", "policy": name, "model": f"{name}-rev",
                        "strategy": "revisions", "n": top, "window": w})
        out.append({"key": f"{name}-revisions-w{widest}", "policy": name, "model": name, "strategy": "revisions",
                    "n": top, "window": widest})
    return out


def series(job: dict) -> str:
    name = ("rev-" if job["model"].endswith("-rev") else "") + job["strategy"]
    return name + (f"-w{job['window']}" if job["strategy"] == "revisions" else "")


def run_job(job: dict, lms: dict, rows: list[dict], p: dict) -> dict:
    from emergence.progress import Progress
    from emergence.search import LocalPolicy
    from emergence.search.run import run_search
    from emergence.search.strategies import SearchConfig

    cfg = SearchConfig(n=job["n"], temperature=p["temperature"], max_tokens=p["max_tokens"],
                       window=job["window"] or 1)
    policy = LocalPolicy(lms[job["model"]], seed=0, name=job["model"])
    start = time.perf_counter()
    meter = Progress(len(rows), "problems", desc=f"  {job['key']}", every_s=20.0)
    res = run_search(rows, job["strategy"], policy, None, cfg, lambda i, total: meter.update(1))
    meter.close()
    res["seconds"] = time.perf_counter() - start
    res["job"] = job
    return res


# ------------------------------------------------------------------------------ analysis
def _point(correct: int, problems: int, flops: float) -> dict:
    from emergence.search.flops import wilson_interval

    return {"correct": correct, "problems": problems, "accuracy": correct / problems,
            "ci95": list(wilson_interval(correct, problems)), "flops": flops}


def curves(run: dict, span: tuple[int, int] | None, ns: list[int]) -> dict[str, dict[int, dict]]:
    """series -> N -> accuracy (Wilson 95% interval) and mean FLOPs per problem, over the run's
    problems whose difficulty is in `span` (None: all). A majority run gives its own N; a
    sequential run every N: the majority of the first N attempts (search.run.summarize's
    by_budget, budget N - 1), and attempt N's own answer (`attempt_answers`; the series' name +
    "-last", at the same FLOPs)."""
    from emergence.search.run import summarize

    recs = [r for r in run["records"] if span is None or span[0] <= r["difficulty"] <= span[1]]
    name, s = series(run["job"]), summarize(recs)
    keep = ("correct", "problems", "accuracy", "ci95", "flops")
    if run["job"]["strategy"] == "majority":
        return {name: {run["job"]["n"]: {k: s[k] for k in keep}}}
    out: dict[str, dict[int, dict]] = {name: {}, f"{name}-last": {}}
    for n in ns:
        b = s["by_budget"][n - 1]
        out[name][n] = {"correct": b["correct"], "problems": s["problems"], "accuracy": b["accuracy"],
                        "ci95": b["ci95"], "flops": b["flops"]}
        out[f"{name}-last"][n] = _point(sum(len(r["attempt_answers"]) >= n and r["attempt_answers"][n - 1] ==
                                            r["expected"] for r in recs), len(recs), b["flops"])
    return out


def tables(runs: dict[str, dict], policies: list[str], ns: list[int]) -> dict:
    """policy -> bin ("all" and BINS) -> series -> N -> point."""
    out = {}
    for name in policies:
        out[name] = {}
        for label, span in [("all", None), *BINS.items()]:
            by_series: dict = {}
            for r in runs.values():
                if r["job"]["policy"] == name:
                    for key, pts in curves(r, span, ns).items():
                        by_series.setdefault(key, {}).update(pts)
            out[name][label] = {k: {str(n): v[n] for n in sorted(v)} for k, v in by_series.items()}
    return out


def write_csv(result: dict, path: Path) -> None:
    """One row per policy, series, N and difficulty bin: the tables of the JSON, flat."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["attempts", "policy", "parameters", "series", "n", "difficulty", "problems", "correct", "accuracy",
                    "ci95_low", "ci95_high", "flops_per_problem"])
        for name, bins in result["tables"].items():
            for b, by_series in bins.items():
                for key, pts in by_series.items():
                    for n, pt in pts.items():
                        w.writerow([result["attempts"], name, result["params"][name], key, n, b, pt["problems"],
                                    pt["correct"], f"{pt['accuracy']:.4f}", f"{pt['ci95'][0]:.4f}",
                                    f"{pt['ci95'][1]:.4f}", f"{pt['flops']:.4g}"])


def summaries(runs: dict[str, dict]) -> dict:
    return {k: {"job": r["job"], "seconds": r["seconds"], "summary": r["summary"], "by_difficulty": r["by_difficulty"]}
            for k, r in runs.items()}


# ------------------------------------------------------------------------------ plot and page
def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from emergence.search.run import accuracy_axes

    policies, bins = list(result["tables"]), ["all", *BINS]
    fig, axes = plt.subplots(len(policies), len(bins), figsize=(3.8 * len(bins), 3.4 * len(policies)), squeeze=False)
    for row, name in zip(axes, policies):
        for ax, b in zip(row, bins):
            for key, label in series_labels(result["settings"]).items():
                pts = result["tables"][name][b].get(key)
                if not pts:
                    continue
                xs = sorted(pts, key=int)
                ys = [pts[n]["accuracy"] for n in xs]
                err = [[max(0.0, pts[n]["accuracy"] - pts[n]["ci95"][0]) for n in xs],
                       [max(0.0, pts[n]["ci95"][1] - pts[n]["accuracy"]) for n in xs]]
                ax.errorbar([pts[n]["flops"] for n in xs], ys, yerr=err, marker="o", ms=3, capsize=2, lw=1,
                            ls="-" if key.endswith("majority") else ":" if key.endswith("last") else "--",
                            label=label.replace("P", name))
            accuracy_axes(ax, f"{name} ({result['params'][name]:,}): {b}", "FLOPs per problem")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, [lab.replace(policies[0], "P") for lab in labels], loc="lower center", ncol=3, fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _ci(pt: dict) -> str:
    return f"{100 * pt['accuracy']:.1f}% [{100 * pt['ci95'][0]:.0f}, {100 * pt['ci95'][1]:.0f}]"


KIND_TEXT = {"sampled": "between 1 and {window} of the problem's distinct samples, right or wrong as the policy wrote "
                        "them, in a random order (the prompt the strategy will show it)",
             "wrong": "between 1 and {window} of the problem's distinct wrong samples, the closest to the canonical "
                      "solution by character edit distance, the nearest last (Snell et al.'s recipe; a problem "
                      "without a wrong sample gives no row)"}


def render(result: dict) -> str:
    p, t, rev = result["settings"], result["tables"], result["revision"]
    labels = series_labels(p)
    kind = result["attempts"]
    _, png, start, end = outputs(kind)
    top = str(max(p["ns"]))
    title = ("## Sequential revisions against parallel sampling" if start.startswith("<!-- revisions:") else
             f"### The same with revision models of the other kind ({kind} attempts only)")
    lines = [start, "", title, "",
             f"`bench/revisions.py --attempts {kind}` (results: `bench/results/{outputs(kind)[0].name}`). Each policy "
             "P of the long run gets a revision model from search-train's revision stages "
             f"(`src/emergence/search/revise.py`): P samples {rev['samples']} solutions of each of "
             f"{rev['problems']:,} training problems at temperature 0.8; each problem gives one row with "
             + KIND_TEXT[kind].format(window=rev["window"]) + " in the revision prompt and the canonical solution "
             "as the completion; as many plain rows of other problems keep the first attempt; P is fine-tuned on "
             f"them (full, loss on the completions, one epoch, context raised to {rev['context']}). "
             f"{result['problems']} held-out problems ({p['per_difficulty']} per difficulty), temperature "
             f"{p['temperature']}, up to {p['max_tokens']} tokens an attempt; majority vote everywhere (no "
             f"verifier). A sequential run of N = {top} gives every smaller N (the answer and FLOPs after each "
             "attempt); its window is how many previous attempts the prompt shows.", ""]
    for name, r in result["revisers"].items():
        about = ([f"held-out loss {r['policy_val_loss']:.3f}"] if "policy_val_loss" in r else
                 ["policy M after bench/r1_zero.py's GRPO"])
        about += [f"greedy accuracy {100 * r['policy_greedy']:.1f}%"] if "policy_greedy" in r else []
        lines.append(f"- {name} ({result['params'][name]:,} parameters; {', '.join(about)}): its samples were right "
                     f"{r['samples_correct']:,} times in {r['samples']:,}; "
                     f"{r['revision_rows']:,} revision rows ({'/'.join(sorted(r['chains'], key=int))} attempts: "
                     + "/".join(f"{r['chains'][k]:,}" for k in sorted(r["chains"], key=int))
                     + f") + {r['plain_rows']:,} plain rows, {r['steps']:,} steps, held-out loss {r['val_loss']:.3f}.")
    lines.append("")
    for name in t:
        lines += [f"#### Policy {name}: accuracy (Wilson 95% interval) and FLOPs per problem", "",
                  "| all problems | " + " | ".join(f"N = {n}" for n in p["ns"]) + " |",
                  "|---|" + "---|" * len(p["ns"])]
        for key, label in labels.items():
            pts = t[name]["all"].get(key, {})
            lines.append(f"| {label.replace('P', name)} | " + " | ".join(
                f"{_ci(pts[str(n)])}, {pts[str(n)]['flops']:.2g}" if str(n) in pts else "-" for n in p["ns"]) + " |")
        lines += ["", "| at N = " + top + " | " + " | ".join(BINS) + " |", "|---|" + "---|" * len(BINS)]
        for key, label in labels.items():
            lines.append(f"| {label.replace('P', name)} | " + " | ".join(
                _ci(t[name][b][key][top]) if top in t[name][b].get(key, {}) else "-" for b in BINS) + " |")
        lines.append("")
    lines += [f"![accuracy against FLOPs: sequential revisions and parallel sampling, {kind} attempts]({png.name})",
              "", f"Run at {result['commit'][:12]} ({result['date']}): `bench/revisions.py --run RUN --attempts {kind} "
              f"--work DIR`, {result['total_seconds'] / 60:.0f} min of runs on {result['threads']} torch thread(s) "
              f"({result['machine']['cpu']}); the exact command is in the JSON.", "", end]
    return "\n".join(lines)


def update_doc(result: dict) -> None:
    text = DOC.read_text()
    block = render(result)
    _, _, start, end = outputs(result["attempts"])
    if start in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(text)


# ------------------------------------------------------------------------------ main
def revision_models(run_dir: Path, setting_name: str, only: list[str] | None = None,
                    attempts: str | None = None, extra: dict[str, Path] | None = None) -> dict[str, dict]:
    """search-train's revision stages for the setting's revisers (`only`: those of them), run now
    or found done; `extra`: other policies by name and model folder (the GRPO-trained one)."""
    from emergence.errors import InvalidArgument
    from emergence.search.train import SETTINGS, Pipeline, reviser_stage

    pipeline = Pipeline(run_dir, SETTINGS[setting_name], device="cpu", log=log, setting_name=setting_name)
    pipeline.check_setting()
    names = list(pipeline.setting.revisers) + list(extra or {})
    for name in only or []:
        if name not in names:
            raise InvalidArgument(f"--policies: {name} has no revision model in the {setting_name} setting "
                                  f"({', '.join(names)})")
    out = {}
    models = {name: (extra or {}).get(name) for name in only or names}
    for name, model in models.items():
        greedy = pipeline.trained_policy(name) if model is None else None  # (one of the run's policies)
        samples = pipeline.stage(f"revision-samples-{name}",
                                 lambda name=name, model=model: pipeline.revision_samples(name, model))
        kind = attempts or pipeline.setting.revision_attempts
        info = pipeline.stage(reviser_stage(name, kind),
                              lambda name=name, model=model: pipeline.train_reviser(name, kind, model))
        info["model"] = str(pipeline.reviser_dir(name, kind) / "run" / "model")
        info["policy"] = str(model or run_dir / "policies" / name / "model")
        out[name] = {**info, "samples": samples["samples"], "samples_correct": samples["correct"],
                     "problems": samples["problems"]}
        if greedy is not None:
            trained = json.loads((run_dir / "stages" / f"policy-{name}.json").read_text())
            out[name]["policy_val_loss"] = trained["val_loss"]
            out[name]["policy_greedy"] = greedy["accuracy"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=None, metavar="RUN", help="an `emergence search-train --setting long` folder "
                    "(the stages it lacks are run)")
    ap.add_argument("--work", default=None, help="cache of finished runs (default: a temporary folder)")
    ap.add_argument("--policies", default=None, metavar="S,M", help="only these policies' runs, into --work (the "
                    "results are written by a call without it, which finds them done)")
    ap.add_argument("--smoke", action="store_true", help="search-train's quick models, 2 problems per difficulty")
    ap.add_argument("--out-dir", default=None, help="--smoke: where the JSON, plot and page go (required)")
    ap.add_argument("--attempts", default=None, choices=("wrong", "sampled"),
                    help="the revision models' kind of training attempts (default: the setting's)")
    ap.add_argument("--grpo", default=None, metavar="DIR", help="the GRPO-trained policy (bench/r1_zero.py's), "
                    "given a revision model and measured as the others")
    ap.add_argument("--report-only", action="store_true", help="the page and plot from the committed JSON")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch

    from emergence.errors import InvalidArgument

    torch.set_num_threads(args.threads)
    if args.report_only:
        from emergence.search.revise import ATTEMPTS

        for kind in ATTEMPTS:
            path, png, _, _ = outputs(kind)
            if path.is_file():
                result = json.loads(path.read_text())
                plot(result, png)
                update_doc(result)
        return 0
    from test_time_compute import run_settings

    p, tmp, work = run_settings(ap, args, SMOKE, FULL)
    import emergence
    from emergence.problems import first_per_difficulty, load_problems
    from emergence.search.train import SETTINGS

    kind = args.attempts or SETTINGS[p["setting"]].revision_attempts

    try:
        run_dir = Path(args.run) if args.run else work / "run"
        only = args.policies.split(",") if args.policies else None
        extra = {"GRPO": Path(args.grpo)} if args.grpo else None
        revisers = revision_models(run_dir, p["setting"], only, kind, extra)
    except InvalidArgument as e:
        print(f"revisions: {e}", file=sys.stderr)
        return 2
    rows = first_per_difficulty(load_problems(run_dir / "problems" / "heldout.jsonl"), p["per_difficulty"])
    lms = {}
    for name in revisers:
        lms[name] = emergence.load(revisers[name].pop("policy"), device="cpu")
        lms[f"{name}-rev"] = emergence.load(revisers[name].pop("model"), device="cpu")
    plan = jobs(p, list(revisers))
    runs: dict[str, dict] = {}
    for i, job in enumerate(plan):
        cache = work / "runs" / f"{job['key']}.json"
        if cache.is_file():
            runs[job["key"]] = json.loads(cache.read_text())
            continue
        log(f"[{i + 1}/{len(plan)}] {job['key']}")
        res = run_job(job, lms, rows, p)
        cache.write_text(json.dumps(res) + "\n")
        runs[job["key"]] = res
    if args.policies:
        log(f"runs of {args.policies} done in {work}")
        return 0
    from provenance import write_result

    result = {"smoke": args.smoke, "settings": p, "attempts": kind, "problems": len(rows),
              "params": {name: lms[name].config.num_parameters() for name in revisers},
              "revision": _revision_settings(p["setting"]),
              "revisers": revisers, "date": time.strftime("%Y-%m-%d"),
              "total_seconds": sum(r["seconds"] for r in runs.values()),
              "tables": tables(runs, list(revisers), p["ns"]), "runs": summaries(runs)}
    out_json, png, _, _ = outputs(kind)
    if args.smoke:
        out_json = Path(args.out_dir) / "revisions.json"
    write_result(out_json, result, "bench/revisions.py", sys.argv[1:] if argv is None else argv, args.threads)
    result = json.loads(out_json.read_text())  # with its provenance, for the page
    write_csv(result, out_json.with_suffix(".csv"))
    if args.smoke:
        plot(result, Path(args.out_dir) / "revisions.png")
        (Path(args.out_dir) / "revisions.md").write_text(render(result))
        (Path(args.out_dir) / "records.json").write_text(json.dumps({k: r["records"] for k, r in runs.items()}))
    else:
        plot(result, png)
        update_doc(result)
    log(f"wrote {out_json}")
    if tmp is not None:
        tmp.cleanup()
    return 0


def _revision_settings(setting_name: str) -> dict:
    from emergence.search.train import SETTINGS

    s = SETTINGS[setting_name]
    return {"samples": s.revision_samples, "problems": s.revision_problems, "window": s.revision_window,
            "context": s.revision_context, "lr": s.revision_lr, "batch": s.revision_batch}


if __name__ == "__main__":
    sys.exit(main())
