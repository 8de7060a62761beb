"""`emergence lab bitnet`: BitNet b1.58 against full precision, size by size, on the same tokens.

The BitNet b1.58 paper's claim is that ternary weights (absmean-quantized to {-1, 0, +1}, 8-bit
activations, latent full-precision weights trained through the straight-through estimator:
model.BitLinear, `Config.ternary`) match full precision, and that the gap closes as models grow.
Here students of several sizes are trained twice on the same teacher corpus as `lab scaling`
(its OUT/corpus, sampled once and reused), once with nn.Linear and once with BitLinear in every
block, each kind at each learning rate of the setting; each (size, kind) keeps its best. The gap
per size is ternary's best validation loss minus full precision's, in nats per token.

OUT gets bitnet.csv (every run; the resume point: finished runs are not redone), bitnet.json
(the best per size and kind, the gaps, the teacher's entropy as the floor) and bitnet.png (loss
against non-embedding parameters for both kinds, and the gap).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..errors import InvalidArgument
from . import scaling

KINDS = ("full", "ternary")


def runs_of(setting: scaling.Setting, vocab_size: int) -> list[scaling.Run]:
    """Every (kind, size, lr): the L(N) runs of the sweep, once per kind."""
    base = [r for r in scaling.plan(setting, vocab_size) if r.kind == "size"]
    return [dataclasses.replace(r, kind=kind) for kind in KINDS for r in base]


def best(rows: dict[str, dict]) -> dict[str, dict[int, dict]]:
    """kind -> non-embedding params -> the row with the lowest validation loss."""
    out: dict[str, dict[int, dict]] = {k: {} for k in KINDS}
    for row in rows.values():
        n, kind = int(float(row["params"])), row["kind"]
        if n not in out[kind] or float(row["val_loss"]) < float(out[kind][n]["val_loss"]):
            out[kind][n] = row
    return out


def sweep(setting: scaling.Setting, out: str | Path, *, log=print) -> dict:
    """Run (or finish) both kinds at every size in OUT; returns what OUT/bitnet.json holds."""
    from .. import load

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if len(setting.sizes) < 3:
        raise InvalidArgument(f"the BitNet gap against size needs at least 3 sizes, got {len(setting.sizes)}")
    scaling.check_corpus(setting, out)  # OUT may be a scaling sweep's: its corpus is reused, its setting kept
    if not (out / "setting.json").exists():
        (out / "setting.json").write_text(json.dumps(dataclasses.asdict(setting), indent=1) + "\n")
    info = scaling.teacher_corpus(setting, out)
    table = out / "bitnet.csv"
    done = scaling.read_runs(table)
    runs = runs_of(setting, load(setting.teacher, device="cpu").tokenizer.vocab_size)
    scaling.run_all(setting, info, runs, done, table, out, log)
    b = best(done)
    sizes = sorted(set(b["full"]) & set(b["ternary"]))
    result = {"teacher": setting.teacher, "teacher_entropy": info["entropy"], "train_tokens": info["train_tokens"],
              "sizes": [{"params": n, "shape": f"{b['full'][n]['n_layer']}x{b['full'][n]['n_embd']}",
                         "full": float(b["full"][n]["val_loss"]), "full_lr": float(b["full"][n]["lr"]),
                         "ternary": float(b["ternary"][n]["val_loss"]), "ternary_lr": float(b["ternary"][n]["lr"]),
                         "gap": float(b["ternary"][n]["val_loss"]) - float(b["full"][n]["val_loss"])}
                        for n in sizes]}
    (out / "bitnet.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "bitnet.png")
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [s["params"] for s in result["sizes"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(xs, [s["full"] for s in result["sizes"]], "o-", label="full precision (nn.Linear)")
    a.plot(xs, [s["ternary"] for s in result["sizes"]], "s-", label="BitNet b1.58 (ternary weights, 8-bit act.)")
    a.axhline(result["teacher_entropy"], color="gray", ls="--", lw=1, label="floor: the teacher's entropy")
    a.set(xscale="log", xlabel="non-embedding parameters", ylabel="validation loss (nats/token)",
          title=f"students of {result['teacher']}, each at its best lr")
    a.legend(fontsize=8)
    b.plot(xs, [s["gap"] for s in result["sizes"]], "o-", color="C3")
    b.axhline(0, color="gray", lw=1)
    b.set(xscale="log", xlabel="non-embedding parameters", ylabel="ternary - full (nats/token)",
          title="the gap against size")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
