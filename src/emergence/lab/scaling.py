"""`emergence lab scaling`: a scaling law whose floor is known.

    teacher (a shipped model) --samples at temperature 1--> corpus (token ids, never re-tokenized)
    teacher's mean entropy on the held-out samples = E, the loss no student can beat
    students of many sizes, each at its best learning rate --> L(N) = E + A / N^alpha
    one size, several data sizes                         --> L(D) = E + B / D^beta
    isoFLOP sweep: sizes per compute budget C = 6 N D    --> N*(C) ~ C^a (Chinchilla: a ~ 0.5)

Every sample is one context of the students: BOS then context - 1 sampled tokens, so a student
window sees exactly what the teacher saw when it sampled each token, and the teacher's
per-token entropy is exactly the irreducible part of the student's validation loss (the
window's last target, the next row's BOS, is certain: entropy 0). N counts non-embedding
parameters, as Kaplan et al. do.

Runs are recorded in OUT/runs.csv as each finishes; a rerun skips them (resume). OUT gets the
fits (fits.json), the points (runs.csv) and a plot (scaling.png).
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidArgument
from ..progress import Progress, duration
from . import fit


@dataclass(frozen=True)
class Setting:
    """One sweep: the teacher, the corpus and the student sizes (n_layer, n_embd, n_head)."""

    teacher: str = "stories260K"
    context: int = 128
    train_rows: int = 4096  # samples of `context` tokens for training
    val_rows: int = 256
    batch_size: int = 16
    sizes: tuple[tuple[int, int, int], ...] = ((1, 32, 2), (2, 48, 2), (2, 64, 4), (3, 96, 4), (4, 128, 4),
                                               (4, 160, 4))
    lrs: tuple[float, ...] = (3e-3, 1e-2)
    epochs: float = 1.0  # passes over the training rows for L(N)
    data_fractions: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0)  # L(D) at the middle size
    budgets: tuple[float, ...] = (3e11, 1e12, 3e12)  # isoFLOP budgets, FLOPs = 6 N D
    seed: int = 0


SETTINGS = {
    # six sizes spanning 48x, three learning rates each: under 20 minutes on 2 CPU cores
    "quick": Setting(train_rows=6144, sizes=((1, 24, 2), (1, 32, 2), (2, 40, 2), (2, 64, 4), (3, 72, 4),
                                             (3, 96, 4)), lrs=(3e-3, 6e-3, 1.2e-2), budgets=(1e11, 3e11, 1e12)),
    # a GPU's worth: a larger teacher, more data, more sizes and learning rates
    "full": Setting(teacher="emergence-6m", context=256, train_rows=65536, val_rows=1024, batch_size=64,
                    sizes=((1, 32, 2), (2, 64, 4), (3, 96, 4), (4, 128, 4), (6, 192, 6), (6, 256, 8), (8, 320, 8),
                           (8, 384, 8)),
                    lrs=(1e-3, 3e-3, 1e-2), data_fractions=(0.0625, 0.125, 0.25, 0.5, 1.0),
                    budgets=(1e13, 3e13, 1e14, 3e14)),
}
FIELDS = ("kind", "key", "n_layer", "n_embd", "n_head", "params", "tokens", "lr", "steps", "val_loss", "seconds")


def student_config(setting: Setting, vocab_size: int, n_layer: int, n_embd: int, n_head: int, eos_id: int,
                   bos_id: int | None, ternary: bool = False):
    """A student's shape; ternary: BitNet b1.58 linear layers in its blocks (lab bitnet)."""
    from ..config import Config

    return Config(name=f"student-{n_layer}x{n_embd}" + ("-ternary" if ternary else ""), vocab_size=vocab_size,
                  block_size=setting.context, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                  intermediate_size=4 * n_embd, tie_embeddings=True, bos_token_id=bos_id, eos_token_id=eos_id,
                  ternary=ternary)


def non_embedding_params(config) -> int:
    return config.num_parameters() - config.vocab_size * config.n_embd


# ------------------------------------------------------------------------------ the corpus
@torch.no_grad()
def teacher_corpus(setting: Setting, out: Path) -> dict:
    """Sample the corpus from the teacher into OUT/corpus (shards) and measure its entropy on the
    held-out rows; cached in OUT/corpus.json (a rerun reuses it)."""
    from .. import load
    from ..data.shards import write_token_shards
    from ..generate import generate
    from ..sampling import SamplingParams

    record = out / "corpus.json"
    if record.exists():
        return json.loads(record.read_text())
    lm = load(setting.teacher, device="cpu")
    tok, c = lm.tokenizer, setting.context
    start = tok.bos_id if tok.bos_id is not None else tok.eos_id
    rows_needed = setting.train_rows + setting.val_rows
    rows: list[list[int]] = []
    progress = Progress(rows_needed * c, "tok", desc=f"sampling {setting.teacher}")
    batch = 64
    while len(rows) < rows_needed:
        n = min(batch, rows_needed - len(rows))
        params = [SamplingParams(temperature=1.0, max_new_tokens=c - 1, ignore_eos=True,
                                 seed=setting.seed * 1_000_003 + len(rows) + i) for i in range(n)]
        for completion in generate(lm.model, tok, [[start]] * n, params):
            rows.append([start] + completion.token_ids)
        progress.update(n * c)
    progress.close()
    ids = np.asarray(rows, dtype=np.int64)  # (rows, c)
    val = ids[setting.train_rows:]
    # the teacher's entropy at every position a student window predicts: positions 0 .. c-2 of
    # each held-out row but the last (the last row has no next BOS to end a window with)
    entropies = []
    for i in range(0, len(val) - 1, 64):
        chunk = torch.from_numpy(val[i:min(i + 64, len(val) - 1)])
        logp = lm.model(chunk)[:, :-1].float().log_softmax(-1)  # (b, c-1, V)
        entropies.append(-(logp.exp() * logp).sum(-1).double())
    h = torch.cat(entropies)  # (rows - 1, c - 1)
    E = float(h.sum() / (h.shape[0] * c))  # the BOS target of each window: entropy 0
    write_token_shards({"train": ids[:setting.train_rows].reshape(-1), "val": val.reshape(-1)}, tok,
                       out / "corpus", source=f"{setting.teacher} samples, temperature 1, seed {setting.seed}")
    info = {"teacher": setting.teacher, "rows": rows_needed, "context": c, "train_tokens": setting.train_rows * c,
            "val_tokens": setting.val_rows * c, "entropy": E, "vocab_size": tok.vocab_size}
    record.write_text(json.dumps(info, indent=1) + "\n")
    return info


# ------------------------------------------------------------------------------ the runs
@dataclass
class Run:
    kind: str  # "size" (L(N), one per lr), "data" (L(D)), "isoflop"; lab bitnet: "full", "ternary"
    n_layer: int
    n_embd: int
    n_head: int
    tokens: int
    lr: float
    budget: float | None = None

    @property
    def key(self) -> str:
        extra = f"-C{self.budget:.0e}" if self.budget else ""
        return f"{self.kind}-{self.n_layer}x{self.n_embd}-D{self.tokens}-lr{self.lr:g}{extra}"


def plan(setting: Setting, vocab_size: int, best_lr: dict[tuple, float] | None = None) -> list[Run]:
    """The runs of a sweep. L(N) tries every lr per size; L(D) and the isoFLOP runs use each
    size's best lr from the L(N) runs (best_lr; the first lr until those are known)."""
    c = setting.context
    tokens = int(setting.train_rows * c * setting.epochs) // (setting.batch_size * c) * setting.batch_size * c
    runs = [Run("size", *size, tokens, lr) for size in setting.sizes for lr in setting.lrs]
    best = best_lr or {}
    middle = setting.sizes[len(setting.sizes) // 2]
    for f in setting.data_fractions:
        if f < 1.0:  # the full fraction is the L(N) run itself
            runs.append(Run("data", *middle, int(tokens * f) // (setting.batch_size * c) * setting.batch_size * c,
                            best.get(middle, setting.lrs[0])))
    for budget in setting.budgets:
        for size in setting.sizes:
            n = non_embedding_params(student_config(setting, vocab_size, *size, 0, None))
            d = int(budget / (6 * n)) // (setting.batch_size * c) * setting.batch_size * c
            if setting.batch_size * c * 20 <= d <= setting.train_rows * c * 4:  # 20 steps .. 4 epochs
                runs.append(Run("isoflop", *size, d, best.get(size, setting.lrs[0]), budget))
    return runs


def read_runs(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    with path.open() as f:
        return {row["key"]: row for row in csv.DictReader(f)}


def train_student(setting: Setting, info: dict, run: Run, out: Path) -> dict:
    """One run of the sweep (a "ternary" run of lab bitnet trains BitLinear layers)."""
    from ..data.shards import TokenShards
    from ..train import TrainConfig, train

    shards = TokenShards(out / "corpus")
    tok = shards.tokenizer()
    config = student_config(setting, info["vocab_size"], run.n_layer, run.n_embd, run.n_head, tok.eos_id, tok.bos_id,
                            ternary=run.kind == "ternary")
    steps = max(1, run.tokens // (setting.batch_size * setting.context))
    val_windows = setting.val_rows - 1
    tc = TrainConfig(data=str(out / "corpus"), out=str(out / "runs" / run.key), context=setting.context,
                     batch_size=setting.batch_size, max_steps=steps, lr=run.lr, min_lr=run.lr / 10,
                     warmup_steps=max(1, steps // 20), eval_every=steps, eval_batches=math.ceil(val_windows /
                                                                                                setting.batch_size),
                     checkpoint_every=0, log_every=max(1, steps // 4), seed=setting.seed + 1, progress=False,
                     device="auto")
    started = time.perf_counter()
    result = train(config, tc)
    return {"kind": run.kind, "key": run.key, "n_layer": run.n_layer, "n_embd": run.n_embd, "n_head": run.n_head,
            "params": non_embedding_params(config), "tokens": steps * setting.batch_size * setting.context,
            "lr": run.lr, "steps": steps, "val_loss": result.val_loss, "seconds": time.perf_counter() - started}


# ------------------------------------------------------------------------------ the sweep
def check_corpus(setting: Setting, out: Path) -> None:
    """Refuse an OUT whose corpus (OUT/setting.json) was sampled with other corpus settings."""
    path = out / "setting.json"
    if not path.exists():
        return
    before = json.loads(path.read_text())
    changed = [k for k in ("teacher", "context", "train_rows", "val_rows", "seed") if before.get(k) != getattr(setting, k)]
    if changed:
        raise InvalidArgument(f"{out} holds a sweep over another corpus ({', '.join(f'{k} {before.get(k)}' for k in changed)}); "
                              "use another --out")


def sweep(setting: Setting, out: str | Path, *, log=print) -> dict:
    """Run (or finish) the sweep in OUT; returns the fits (also written to OUT/fits.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_corpus(setting, out)  # a resumed sweep must train on the corpus it sampled; sizes may be added
    (out / "setting.json").write_text(json.dumps(asdict(setting), indent=1) + "\n")
    from .. import load

    check_setting(setting, load(setting.teacher, device="cpu").tokenizer.vocab_size)
    info = teacher_corpus(setting, out)
    log(f"corpus: {info['train_tokens']:,} training tokens from {setting.teacher}; its entropy on the held-out "
        f"samples, the floor: E = {info['entropy']:.4f} nats/token")
    table = out / "runs.csv"
    done = read_runs(table)
    first = plan(setting, info["vocab_size"])
    size_runs = [r for r in first if r.kind == "size"]
    run_all(setting, info, size_runs, done, table, out, log)
    best_lr = best_lrs(done)
    rest = [r for r in plan(setting, info["vocab_size"], best_lr) if r.kind != "size"]
    run_all(setting, info, rest, done, table, out, log)
    fits = fit_all(setting, info, done)
    (out / "fits.json").write_text(json.dumps(fits, indent=1) + "\n")
    plot(setting, info, done, fits, out / "scaling.png")
    return fits


def run_all(setting: Setting, info: dict, runs: list[Run], done: dict, table: Path, out: Path, log) -> None:
    """Train the runs not in `done`, appending each finished one to `table` (the resume point)."""
    todo = [r for r in runs if r.key not in done]
    if not todo:
        return
    started, total = time.perf_counter(), len(todo)
    for i, run in enumerate(todo):
        row = train_student(setting, info, run, out)
        done[run.key] = {k: str(v) for k, v in row.items()}
        new = not table.exists()
        with table.open("a", newline="") as f:  # one line per finished run: the resume point
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        elapsed = time.perf_counter() - started
        eta = elapsed / (i + 1) * (total - i - 1)
        log(f"[{i + 1}/{total}] {run.key}: {row['params']:,} params, val loss {row['val_loss']:.4f} "
            f"({row['seconds']:.0f} s; ETA {duration(eta)})")


def best_lrs(done: dict) -> dict[tuple, float]:
    best: dict[tuple, tuple[float, float]] = {}
    for row in done.values():
        if row["kind"] != "size":
            continue
        size = (int(row["n_layer"]), int(row["n_embd"]), int(row["n_head"]))
        loss = float(row["val_loss"])
        if size not in best or loss < best[size][0]:
            best[size] = (loss, float(row["lr"]))
    return {size: lr for size, (_, lr) in best.items()}


def _points(done: dict, kind: str) -> list[dict]:
    return [{k: (float(v) if k in ("params", "tokens", "lr", "val_loss", "seconds") else v) for k, v in r.items()}
            for r in done.values() if r["kind"] == kind]


def fit_all(setting: Setting, info: dict, done: dict) -> dict:
    E = info["entropy"]
    sizes = {}
    for p in _points(done, "size"):  # each size at its best learning rate
        if p["params"] not in sizes or p["val_loss"] < sizes[p["params"]]["val_loss"]:
            sizes[p["params"]] = p
    n = sorted(sizes)
    loss_n = [sizes[k]["val_loss"] for k in n]
    free = fit.power_law(n, loss_n)
    fixed = fit.power_law(n, loss_n, E=E)
    fits = {"teacher_entropy": E,
            "L(N)": {"points": [[k, sizes[k]["val_loss"], sizes[k]["lr"]] for k in n],
                     "fitted": asdict(free), "with_E_fixed_at_the_teacher_entropy": asdict(fixed),
                     "span": n[-1] / n[0]}}
    middle = next(iter(p for p in sizes.values() if (int(p["n_layer"]), int(p["n_embd"]), int(p["n_head"]))
                       == setting.sizes[len(setting.sizes) // 2]), None)
    data = _points(done, "data") + ([middle] if middle else [])
    if len(data) >= 3:
        d = sorted(data, key=lambda p: p["tokens"])
        law = fit.power_law([p["tokens"] for p in d], [p["val_loss"] for p in d], E=E)
        fits["L(D)"] = {"params": d[0]["params"], "points": [[p["tokens"], p["val_loss"]] for p in d],
                        "with_E_fixed_at_the_teacher_entropy": asdict(law)}
    by_budget: dict[float, list[dict]] = {}
    for p in _points(done, "isoflop"):
        budget = float(p["key"].rsplit("-C", 1)[1])
        by_budget.setdefault(budget, []).append(p)
    optima = []
    for budget, points in sorted(by_budget.items()):
        if len(points) >= 3:
            points.sort(key=lambda p: p["params"])
            optima.append([budget, fit.isoflop_optimum([p["params"] for p in points], [p["val_loss"] for p in points]),
                           [[p["params"], p["val_loss"]] for p in points]])
    if len(optima) >= 2:
        slope, _ = fit.loglog_slope([o[0] for o in optima], [o[1] for o in optima])
        fits["isoFLOP"] = {"budgets": optima, "N_opt_exponent": slope, "chinchilla_exponent": 0.5}
    return fits


def plot(setting: Setting, info: dict, done: dict, fits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    E = info["entropy"]
    panels = 1 + ("L(D)" in fits) + ("isoFLOP" in fits)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    pts = np.asarray([p[:2] for p in fits["L(N)"]["points"]])
    ax.loglog(pts[:, 0], pts[:, 1] - E, "o", label="students (best lr): loss - E")
    grid = np.geomspace(pts[:, 0].min(), pts[:, 0].max(), 100)
    law = fits["L(N)"]["with_E_fixed_at_the_teacher_entropy"]
    ax.loglog(grid, law["A"] * grid ** -law["alpha"],
              label=f"E + A/N^{law['alpha']:.2f} (E = teacher entropy), R² {law['r2']:.3f}")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel(f"validation loss - E (E = {E:.3f} nats)")
    ax.set_title(f"L(N): students of {setting.teacher}")
    ax.legend(fontsize=8)
    i = 1
    if "L(D)" in fits:
        ax = axes[0][i]
        i += 1
        pts = np.asarray(fits["L(D)"]["points"])
        law = fits["L(D)"]["with_E_fixed_at_the_teacher_entropy"]
        ax.loglog(pts[:, 0], pts[:, 1] - E, "o")
        grid = np.geomspace(pts[:, 0].min(), pts[:, 0].max(), 100)
        ax.loglog(grid, law["A"] * grid ** -law["alpha"], label=f"B/D^{law['alpha']:.2f}, R² {law['r2']:.3f}")
        ax.set_xlabel("training tokens D")
        ax.set_title(f"L(D) at N = {fits['L(D)']['params']:,.0f}")
        ax.legend(fontsize=8)
    if "isoFLOP" in fits:
        ax = axes[0][i]
        for budget, best, points in fits["isoFLOP"]["budgets"]:
            pts = np.asarray(points)
            ax.semilogx(pts[:, 0], pts[:, 1], "o-", label=f"C = {budget:.0e}")
            ax.axvline(best, color=ax.lines[-1].get_color(), linestyle=":", linewidth=1)
        ax.set_xlabel("non-embedding parameters N")
        ax.set_ylabel("validation loss")
        ax.set_title(f"isoFLOP: N* ~ C^{fits['isoFLOP']['N_opt_exponent']:.2f} (Chinchilla ~0.5)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_setting(setting: Setting, vocab_size: int) -> None:
    """Bad sweeps, said before any training: too few sizes for a fit, a budget that fewer than 3
    sizes fit (between 20 steps and 4 epochs of the corpus), with what does fit."""
    if len(setting.sizes) < 4:
        raise InvalidArgument(f"a scaling fit needs at least 4 student sizes, got {len(setting.sizes)}")
    if len(setting.lrs) < 1 or len(setting.data_fractions) < 2:
        raise InvalidArgument("give at least one learning rate and two data fractions")
    isoflop = [r for r in plan(setting, vocab_size) if r.kind == "isoflop"]
    params = {s: non_embedding_params(student_config(setting, vocab_size, *s, 0, None)) for s in setting.sizes}
    step_tokens = setting.batch_size * setting.context
    for budget in setting.budgets:
        fits = [r for r in isoflop if r.budget == budget]
        if len(fits) < 3:
            lo = 6 * min(params.values()) * 20 * step_tokens
            hi = 6 * max(params.values()) * 4 * setting.train_rows * setting.context
            raise InvalidArgument(
                f"the isoFLOP budget {budget:.0e} fits {len(fits)} of the sizes "
                f"({', '.join(f'{r.n_layer}x{r.n_embd}' for r in fits) or 'none'}; a size fits when its run lasts "
                f"20 steps to 4 epochs); an optimum needs 3: give budgets between {lo:.0e} and {hi:.0e}")
