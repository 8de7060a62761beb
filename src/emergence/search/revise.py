"""Training data for sequential revisions: a policy taught to write a right solution after its attempts.

The `revisions` strategy (strategies.py) prompts attempt k with the previous attempts
(prompt.revision_prompt); a policy pretrained only on `training_text` rows has never seen that
prompt. Snell et al. (2024, section 6.1) fine-tune a revision model on chains built after the
fact from parallel samples: for a training problem, sample several solutions at a high
temperature, put between one and four wrong ones in the context (the ones closest to the right
solution by character edit distance), and train the model to write the right solution after
them. Here the right solution is the problem's canonical one (`problems.solution_text`), which
the policy was pretrained on, and the loss covers it only (completion rows of the fine-tuning
issue's SFT, `emergence finetune`).

    revision_rows   (problem, its sampled attempts) -> {"prompt": revision prompt, "completion":
                    canonical solution}, at most one row a problem; Snell et al.'s wrong attempts
                    only, or the samples as they come ("sampled")
    plain_rows      {"prompt": PROMPT_TEMPLATE, "completion": canonical solution}: mixed in so
                    the first attempt (the plain prompt) stays what pretraining taught
    with_context    a copy of a model folder whose block_size is raised (RoPE: the weights do not
                    change, the fine-tuning teaches the longer positions), since a prompt with four
                    attempts of a difficulty-8 problem runs to ~700 tokens and the policies' is 320

The number of attempts in a prompt is drawn uniformly from 1..min(window, the attempts a
problem has of the kind), one seeded draw per problem, so a run's rows are a function of its
samples and seed. search-train's default kind is "sampled": with Snell et al.'s wrong attempts
only, the revision model of policy M revises worse, that of S no better (docs/test_time_compute.md,
"What the revisions show").
"""

from __future__ import annotations

import difflib
import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

from ..errors import InvalidArgument
from .prompt import format_prompt, revision_prompt


def closeness(attempt: str, target: str) -> float:
    """Similarity of two solutions' characters (difflib's ratio: 1.0 for equal texts): the edit-
    distance ordering Snell et al. use to pick the wrong attempts most related to the right one."""
    return difflib.SequenceMatcher(None, attempt, target, autojunk=False).ratio()


def pick_attempts(target: str, wrong: Sequence[str], count: int) -> list[str]:
    """The `count` distinct wrong attempts closest to `target`, least close first (so the last
    attempt in the prompt is the nearest miss); ties keep the samples' order."""
    distinct = list(dict.fromkeys(w for w in wrong if w.strip()))
    ranked = sorted(range(len(distinct)), key=lambda i: (-closeness(distinct[i], target), i))[:count]
    return [distinct[i] for i in reversed(ranked)]


ATTEMPTS = ("wrong", "sampled")  # what the prompt's attempts are: see revision_rows


def revision_rows(problems: Sequence[dict], attempts: Sequence[Sequence[tuple[str, bool]]], *, window: int,
                  seed: int, kind: str = "sampled") -> list[dict]:
    """Completion rows teaching revisions. problems[i]: a problem row ({"question", "steps",
    "answer", ...}); attempts[i]: its sampled solutions as (text, correct). Each problem gives at
    most one row: `c` attempts in the revision prompt, the canonical solution as the completion.

    kind "wrong" (Snell et al.): only wrong attempts, the c closest to the canonical solution (c
    uniform in 1..min(window, distinct wrong ones)); a problem without one gives no row.
    kind "sampled": the prompt's attempts are drawn as the strategy meets them, c of the problem's
    distinct samples right or wrong alike (c uniform in 1..min(window, distinct samples)), in a
    seeded random order, so a right attempt is followed by the right solution as often as the
    policy writes one (with only wrong attempts, a model learns that the previous answer is wrong)."""
    from ..problems import solution_text

    if window < 1:
        raise InvalidArgument(f"revision window must be >= 1, got {window}")
    if kind not in ATTEMPTS:
        raise InvalidArgument(f"revision attempts must be one of {', '.join(ATTEMPTS)}, got {kind!r}")
    if len(problems) != len(attempts):
        raise InvalidArgument(f"{len(problems)} problems but {len(attempts)} lists of attempts")
    rng = random.Random(seed)
    rows = []
    for row, tries in zip(problems, attempts):
        target = solution_text(row)
        pool = list(dict.fromkeys(t for t, ok in tries if (kind == "sampled" or not ok) and t.strip()))
        if not pool:
            continue
        count = rng.randint(1, min(window, len(pool)))
        chain = pick_attempts(target, pool, count) if kind == "wrong" else rng.sample(pool, count)
        rows.append({"prompt": revision_prompt(row["question"], chain, window), "completion": target})
    return rows


def plain_rows(problems: Sequence[dict]) -> list[dict]:
    """The first-attempt rows: the plain prompt, then the canonical solution."""
    from ..problems import solution_text

    return [{"prompt": format_prompt(r["question"]), "completion": solution_text(r)} for r in problems]


def with_context(model_dir: str | Path, out_dir: str | Path, block_size: int) -> Path:
    """Copy the model folder `model_dir` to `out_dir` with config.json's block_size (the context)
    raised to `block_size`; only RoPE models, whose weights hold no position table."""
    from ..weights.hf_config import config_from_hf

    src, dst = Path(model_dir), Path(out_dir)
    config = json.loads((src / "config.json").read_text())
    ours = config_from_hf(config)
    if ours.position != "rope":
        raise InvalidArgument(f"{src}: only a RoPE model's context can be raised without new weights")
    if block_size < ours.block_size:
        raise InvalidArgument(f"{src}: block_size {block_size} is below the model's {ours.block_size}")
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    config["max_position_embeddings"] = block_size
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst
