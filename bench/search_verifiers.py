"""Verifiers for test-time compute's headline (docs/test_time_compute.md): an ORM and a PRM of the
smallest policy's size, on more Math-Shepherd labels than search-train's run gives them.

    .venv/bin/python bench/search_verifiers.py --run RUN --out VRUN [--problems 1920] [--init S]

RUN is a finished `emergence search-train --setting long --out RUN` folder. VRUN gets the run's
finished stages (problems, tokenizer, shards, the three policies, the held-out samples and their
labels: linked or copied, never retrained) and a fresh verifier split: `--problems` problems of
seed `--seed`, none of them a question of RUN, in place of RUN's 192. Then search-train's own
pipeline runs the remaining stages with `rm_init = --init`: the sampler policy's samples of the
new split, their Math-Shepherd labels, the ORM and the PRM from the `--init` policy's decoder,
and the verifiers' held-out evaluation (the same 48 held-out problems and samples as RUN's, so
the figures compare). About 10 minutes on one core for 1,920 problems.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

KEPT_STAGES = ("problems", "tokenizer", "shards", "policy-S", "policy-M", "policy-L", "samples-heldout",
               "labels-heldout", "eval-S", "eval-M", "eval-L")


def prepare(run: Path, out: Path, problems: int, seed: int) -> int:
    """VRUN's folder: RUN's finished parts and a fresh verifier split; returns its size."""
    from emergence.errors import InvalidArgument
    from emergence.problems import generate_problems, load_problems, write_problems

    if not (run / "stages" / "labels-heldout.json").is_file():
        raise InvalidArgument(f"{run} is not a finished search-train run (no stages/labels-heldout.json)")
    if out.exists() and any(out.iterdir()):
        raise InvalidArgument(f"{out} exists and is not empty: choose another --out")
    (out / "stages").mkdir(parents=True, exist_ok=True)
    (out / "problems").mkdir()
    (out / "samples").mkdir()
    for name in ("tokenizer", "shards", "policies"):  # read only by the remaining stages
        (out / name).symlink_to((run / name).resolve(), target_is_directory=True)
    for split in ("train", "heldout"):
        shutil.copy(run / "problems" / f"{split}.jsonl", out / "problems")
    for name in ("heldout.jsonl", "heldout-labelled.jsonl"):
        shutil.copy(run / "samples" / name, out / "samples")
    for stage in KEPT_STAGES:
        shutil.copy(run / "stages" / f"{stage}.json", out / "stages")
    taken = {r["question"] for split in ("train", "verifier", "heldout")
             for r in load_problems(run / "problems" / f"{split}.jsonl")}
    rows = [r for r in generate_problems(problems + problems // 4 + 64, (1, 8), seed=seed)
            if r["question"] not in taken][:problems]
    write_problems(rows, out / "problems" / "verifier.jsonl")
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a finished `emergence search-train --setting long` folder")
    ap.add_argument("--out", required=True, help="the new verifiers' folder (VRUN/orm, VRUN/prm)")
    ap.add_argument("--problems", type=int, default=1920, help="verifier problems (default %(default)s; RUN has 192)")
    ap.add_argument("--seed", type=int, default=777, help="their generator seed (search-train's problems use 0)")
    ap.add_argument("--init", default="S", choices=("S", "M", "L"), help="the policy the verifiers start from")
    ap.add_argument("--setting", default="long", help="RUN's search-train setting (default long)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch

    from emergence.errors import InvalidArgument
    from emergence.search.train import SETTINGS, format_table, run

    torch.set_num_threads(args.threads)
    try:
        n = prepare(Path(args.run), Path(args.out), args.problems, args.seed)
        setting = dataclasses.replace(SETTINGS[args.setting], rm_init=args.init, verifier_problems=n)
        summary = run(args.out, setting, device="cpu", log=lambda m: print(m, file=sys.stderr, flush=True))
    except InvalidArgument as e:
        print(f"search_verifiers: {e}", file=sys.stderr)
        return 2
    print(format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
