"""`emergence lab emergence`: abilities against scale, and the metric that makes them look sudden.

Schaeffer et al. (2023) argued that "emergent" abilities are often a property of the metric: a
model's per-token accuracy p can grow smoothly with scale while exact match on an answer of L
tokens, about p^L, stays near 0 and then jumps. Two parts, each a table per model size:

- **Arithmetic** (policies of `emergence search-train`, or any folders of policies trained on its
  format): on held-out problems, per difficulty (steps), the discontinuous metric, exact match
  of the greedy final answer (search.LocalPolicy, as `emergence search` scores), beside the
  continuous ones, teacher-forced on the canonical solution after the prompt: the mean per-token
  log-likelihood of the solution and the per-token accuracy (argmax = the canonical token), and,
  as a second sharp metric, the probability of writing the whole canonical solution (the product
  of its tokens' probabilities, p^L in Schaeffer's terms).
- **Stories** (students of `emergence lab scaling`, each size at its best learning rate): samples
  from each student (the teacher's BOS start, temperature 1), graded by programs: the teacher's
  mean per-token log-likelihood of the student's samples, and the repeated 4-gram rate (the
  share of a sample's token 4-grams that already occurred earlier in it; loops and stutters).

OUT gets emergence.json (every figure), emergence.csv (one row per model and difficulty) and
emergence.png (exact match and per-token figures against parameters, side by side). Finished
models are kept in OUT/models/NAME.json; a rerun skips them (resume).
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Sequence

import torch

from ..errors import InvalidArgument
from ..progress import Progress

NGRAM = 4


# ------------------------------------------------------------------------------ arithmetic
def solution_targets(tokenizer, row: dict) -> tuple[list[int], int, list[int]]:
    """(ids, first, answer): the token ids of prompt + canonical solution, the index of the first
    solution token, and the indices of the tokens of the final answer's number. The text is
    encoded whole, as the policies were trained; the prompt ends in a newline, which no merge
    crosses in this format (checked: the prompt's own encoding must be a prefix)."""
    from ..problems import solution_text
    from ..search.prompt import format_prompt

    prompt, solution = format_prompt(row["question"]), solution_text(row)
    enc = tokenizer.backend.encode(prompt + solution, add_special_tokens=False)
    ids, offsets = list(enc.ids), list(enc.offsets)
    head = list(tokenizer.backend.encode(prompt, add_special_tokens=False).ids)
    if ids[:len(head)] != head:
        raise InvalidArgument("the prompt's tokens are not a prefix of the prompt + solution's: a merge crosses them")
    shift = 0
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        ids, offsets, shift = [tokenizer.bos_id, *ids], [(0, 0), *offsets], 1
    start = len(prompt) + solution.rindex("Answer:") + len("Answer:")
    answer = [i for i, (a, b) in enumerate(offsets) if b > start and i >= len(head) + shift]
    return ids, len(head) + shift, answer


@torch.no_grad()
def teacher_forced(model, tokenizer, row: dict) -> dict:
    """The teacher-forced metrics of one problem: mean log-likelihood per solution token, per-token
    accuracy (argmax), the log-probability of the whole solution, and of the answer's tokens given
    the canonical steps. A text longer than the model's context is read in its last window (the
    question's start dropped), as a sliding window would."""
    ids, first, answer = solution_targets(tokenizer, row)
    drop = max(0, len(ids) - model.config.block_size)  # longer than the context: its last window
    if drop:
        ids, first, answer = ids[drop:], max(1, first - drop), [i - drop for i in answer if i - drop >= 1]
    x = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    logits = model(x)[0].float()  # (T, V): position t predicts token t + 1
    logp = torch.log_softmax(logits[:-1], dim=-1)
    target = x[0, 1:]
    token_logp = logp.gather(1, target[:, None])[:, 0]  # log p(token t + 1)
    hit = logp.argmax(dim=-1) == target
    sol = slice(first - 1, len(ids) - 1)  # predictions of the solution's tokens
    ans = [i - 1 for i in answer]
    return {"tokens": len(ids) - first, "logp_per_token": token_logp[sol].mean().item(),
            "token_accuracy": hit[sol].float().mean().item(), "solution_logp": token_logp[sol].sum().item(),
            "answer_logp": token_logp[ans].sum().item(),
            "answer_tokens": len(ans)}


def arithmetic(lm, rows: Sequence[dict], max_tokens: int = 160, progress: Progress | None = None) -> dict:
    """One policy on the problems: per-problem records and their means, overall and per difficulty."""
    from ..search import LocalPolicy
    from ..search.run import run_search
    from ..search.strategies import SearchConfig

    greedy = run_search(rows, "majority", LocalPolicy(lm, seed=0), None,
                        SearchConfig(n=1, temperature=0.0, max_tokens=max_tokens))
    records = []
    for row, rec in zip(rows, greedy["records"]):
        records.append({"difficulty": row["difficulty"], "exact": bool(rec["correct"]),
                        **teacher_forced(lm.model, lm.tokenizer, row)})
        if progress is not None:
            progress.update(1)
    return {"params": lm.config.num_parameters(), "overall": summarize(records),
            "by_difficulty": {str(d): summarize([r for r in records if r["difficulty"] == d])
                              for d in sorted({r["difficulty"] for r in records})}}


def summarize(records: Sequence[dict]) -> dict:
    from ..search.flops import wilson_interval

    n = len(records)
    exact = sum(r["exact"] for r in records)
    return {"problems": n, "exact_match": exact / n, "exact_ci95": list(wilson_interval(exact, n)),
            "logp_per_token": sum(r["logp_per_token"] for r in records) / n,
            "token_accuracy": sum(r["token_accuracy"] for r in records) / n,
            "solution_prob": sum(math.exp(r["solution_logp"]) for r in records) / n,
            "answer_prob_given_steps": sum(math.exp(r["answer_logp"]) for r in records) / n}


# ------------------------------------------------------------------------------ stories
def repeated_ngram_rate(tokens: Sequence[int], n: int = NGRAM) -> float:
    """The share of the token n-grams of a sample that already occurred earlier in it (0 for a
    sample with no repeats, near 1 for a loop)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


@torch.no_grad()
def stories(student, teacher, samples: int, new_tokens: int, seed: int) -> dict:
    """`samples` stories of the student from BOS (temperature 1), graded: the teacher's mean
    log-likelihood per sampled token, and the repeated 4-gram rate."""
    from ..generate import generate
    from ..sampling import SamplingParams

    bos = student.tokenizer.bos_id
    start = [bos if bos is not None else student.tokenizer.eos_id]
    params = [SamplingParams(temperature=1.0, max_new_tokens=new_tokens, seed=seed + k) for k in range(samples)]
    done = generate(student.model, student.tokenizer, [start] * samples, params)
    scores, repeats, texts = [], [], []
    for c in done:
        new = list(c.token_ids)
        x = torch.tensor([start + new])
        logp = torch.log_softmax(teacher.model(x)[0, :-1].float(), dim=-1).gather(1, x[0, 1:, None])[:, 0]
        scores.append(logp[len(start) - 1:].mean().item())
        repeats.append(repeated_ngram_rate(new))
        texts.append(student.tokenizer.decode(new))
    return {"params": student.config.num_parameters(), "samples": samples, "new_tokens": new_tokens,
            "teacher_logp_per_token": sum(scores) / samples, "repeated_4gram_rate": sum(repeats) / samples,
            "example": texts[0][:300]}


def best_students(lab_out: Path) -> list[tuple[str, Path]]:
    """The L(N) students of an `emergence lab scaling` folder, each size at its best learning rate."""
    path = lab_out / "runs.csv"
    if not path.is_file():
        raise InvalidArgument(f"{lab_out} is not an `emergence lab scaling` folder (no runs.csv)")
    best: dict[tuple[int, int], dict] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row["kind"] != "size":
                continue
            shape = (int(row["n_layer"]), int(row["n_embd"]))
            if shape not in best or float(row["val_loss"]) < float(best[shape]["val_loss"]):
                best[shape] = row
    out = [(f"{r['n_layer']}x{r['n_embd']}", lab_out / "runs" / r["key"] / "model")
           for _, r in sorted(best.items(), key=lambda kv: int(kv[1]["params"]))]
    missing = [str(p) for _, p in out if not p.is_dir()]
    if missing:
        raise InvalidArgument(f"students missing from {lab_out}: {', '.join(missing)}")
    return out


# ------------------------------------------------------------------------------ the sweep
def policies_of(run: Path) -> list[tuple[str, Path]]:
    """A search-train run's policies, smallest first."""
    folder = run / "policies"
    names = sorted(p.name for p in folder.iterdir() if (p / "model").is_dir()) if folder.is_dir() else []
    if not names:
        raise InvalidArgument(f"{run} is not an `emergence search-train` folder (no policies/NAME/model)")
    from ..config import Config

    def size(name: str) -> int:
        return Config.from_hf(folder / name / "model" / "config.json").num_parameters()

    return sorted(((n, folder / n / "model") for n in names), key=lambda x: size(x[0]))


def run(out: str | Path, *, policies: Sequence[tuple[str, Path]] = (), problems: Sequence[dict] = (),
        students: Sequence[tuple[str, Path]] = (), teacher: str | None = None, samples: int = 16,
        new_tokens: int = 128, device: str = "cpu", seed: int = 0) -> dict:
    """Both parts into OUT (resumable per model); returns the JSON written to OUT/emergence.json."""
    import emergence

    out = Path(out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    if policies and not problems:
        raise InvalidArgument("the arithmetic part needs problems (--problems FILE.jsonl, or a run's held-out ones)")
    if students and teacher is None:
        raise InvalidArgument("the stories part needs the students' teacher (--teacher, as in lab scaling)")
    result: dict = {"arithmetic": {}, "stories": {}, "problems": len(problems)}
    progress = Progress(len(policies) * len(problems) + len(students) * samples, "items", desc="lab emergence")
    for name, path in policies:
        cache = out / "models" / f"arithmetic-{name}.json"
        if cache.is_file():
            result["arithmetic"][name] = json.loads(cache.read_text())
            progress.update(len(problems))
            continue
        t = time.perf_counter()
        lm = emergence.load(str(path), device=device)
        res = arithmetic(lm, problems, progress=progress)
        res.update(path=str(path), seconds=time.perf_counter() - t)
        cache.write_text(json.dumps(res) + "\n")
        result["arithmetic"][name] = res
    if students:
        judge = emergence.load(teacher, device=device)
        for name, path in students:
            cache = out / "models" / f"stories-{name}.json"
            if cache.is_file():
                result["stories"][name] = json.loads(cache.read_text())
                progress.update(samples)
                continue
            student = emergence.load(str(path), device=device)
            if student.tokenizer.vocab_size != judge.tokenizer.vocab_size:
                raise InvalidArgument(f"student {name} and teacher {teacher} have different vocabularies")
            res = stories(student, judge, samples, new_tokens, seed)
            res["path"] = str(path)
            cache.write_text(json.dumps(res) + "\n")
            result["stories"][name] = res
            progress.update(samples)
        result["teacher"] = teacher
    progress.close()
    (out / "emergence.json").write_text(json.dumps(result, indent=1) + "\n")
    write_csv(result, out / "emergence.csv")
    plot(result, out / "emergence.png")
    return result


def write_csv(result: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["part", "model", "parameters", "difficulty", "problems", "exact_match", "logp_per_token",
                     "token_accuracy", "solution_prob", "teacher_logp_per_token", "repeated_4gram_rate"])
        for name, r in result["arithmetic"].items():
            for d, s in [("all", r["overall"]), *r["by_difficulty"].items()]:
                w.writerow(["arithmetic", name, r["params"], d, s["problems"], f"{s['exact_match']:.4f}",
                            f"{s['logp_per_token']:.4f}", f"{s['token_accuracy']:.4f}", f"{s['solution_prob']:.4f}",
                            "", ""])
        for name, r in result["stories"].items():
            w.writerow(["stories", name, r["params"], "", "", "", "", "", "", f"{r['teacher_logp_per_token']:.4f}",
                        f"{r['repeated_4gram_rate']:.4f}"])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ar, st = result["arithmetic"], result["stories"]
    panels = (3 if ar else 0) + (2 if st else 0)
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
    axes = list(axes[0])
    if ar:
        names = sorted(ar, key=lambda n: ar[n]["params"])
        xs = [ar[n]["params"] for n in names]
        diffs = sorted({d for n in names for d in ar[n]["by_difficulty"]}, key=int)
        for key, ax, title in (("exact_match", axes[0], "exact match (greedy answer)"),
                               ("token_accuracy", axes[1], "per-token accuracy (teacher-forced)"),
                               ("logp_per_token", axes[2], "log-likelihood per solution token")):
            for d in diffs:
                ax.plot(xs, [ar[n]["by_difficulty"][d][key] for n in names], "o-", ms=3, lw=1, label=f"{d} steps")
            ax.plot(xs, [ar[n]["overall"][key] for n in names], "ks-", lw=2, label="all")
            ax.set_xscale("log")
            ax.set_xlabel("parameters")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, ncol=2)
        axes = axes[3:]
    if st:
        names = sorted(st, key=lambda n: st[n]["params"])
        xs = [st[n]["params"] for n in names]
        for key, ax, title in (("teacher_logp_per_token", axes[0], "teacher log-likelihood per token"),
                               ("repeated_4gram_rate", axes[1], "repeated 4-gram rate")):
            ax.plot(xs, [st[n][key] for n in names], "o-")
            ax.set_xscale("log")
            ax.set_xlabel("parameters")
            ax.set_title(f"stories: {title}", fontsize=10)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
