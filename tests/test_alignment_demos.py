"""bench/instructgpt.py and bench/r1_zero.py (docs/alignment.md): the hidden rule and the win
rate on fixed stories, and each script's --smoke run end to end in a subprocess, as users run
it, checked against values known without the code under test: the KL of a policy that has not
moved is 0, DPO's first loss is log 2, every pair's chosen story scores higher under the rule,
and R1-zero's held-out accuracy equals the same problems solved through `emergence search`'s
policy (another decode path)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def igpt():
    return _module("instructgpt")


def _run(script: str, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ------------------------------------------------------------------------ the hidden rule
def test_the_hidden_rule_counts_the_asked_for_words_of_a_story_that_ends_in_time(igpt):
    check = {"animal": "cat", "words": ["ball", "red", "tree"]}
    story = "The cat saw a red ball. It ran to the tree. Then it slept."
    assert igpt.hidden_score(story, check, True) == 4
    assert igpt.hidden_score("A dog saw a Red ball.", check, True) == 2  # whole words, any case
    assert igpt.hidden_score("The cats played.", check, True) == 0  # "cats" is not "cat"
    assert igpt.hidden_score(story, check, False) == 0  # cut at the token cap
    long = " ".join(["The cat saw a red ball by the tree."] * (igpt.MAX_SENTENCES + 1))
    assert igpt.hidden_score(long, check, True) == 0  # past MAX_SENTENCES sentences
    assert igpt.win_rate([2, 1, 0, 4], [1, 1, 1, 4]) == (1 + 0.5 + 0 + 0.5) / 4


def test_instructgpt_smoke_run(igpt, tmp_path):
    work, out = tmp_path / "work", tmp_path / "igpt.json"
    _run("instructgpt.py", "--smoke", "--work", str(work), "--out-json", str(out))
    r = json.loads(out.read_text())
    igpt.REQUIRE_END = r["require_end"]
    pairs = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == r["pairs"]["pairs"] >= 1
    for pr in pairs:  # the preferences follow the rule (recomputed from the texts)
        c, rj = (pr[k][:-len(igpt.STOP)] for k in ("chosen", "rejected"))
        assert pr["chosen"].endswith(igpt.STOP) and pr["rejected"].endswith(igpt.STOP)
        assert igpt.hidden_score(c, pr["check"], True) == pr["score_chosen"]
        assert igpt.hidden_score(rj, pr["check"], True) == pr["score_rejected"] < pr["score_chosen"]
    assert sum(r["pairs"]["score_counts"]) == r["prompts"]["train"] * r["settings"]["samples"]
    assert [run["kl_coef"] for run in r["ppo"]] == r["settings"]["kl_coefs"]
    for run in r["ppo"]:
        steps = [pt["step"] for pt in run["curve"]]
        assert steps == list(range(0, r["settings"]["ppo_steps"] + 1))
        start = run["curve"][0]
        assert start["kl"] == 0.0  # the policy before its first update is the SFT model
        assert 0.0 <= start["win_rate"] <= 1.0 and math.isfinite(start["rm"])
    assert abs(r["dpo"]["first_loss"] - math.log(2)) < 1e-5  # policy == reference: -logsigmoid(0)
    assert r["sft_eval"]["kl"] == 0.0


# ------------------------------------------------------------------------------ R1-zero
@pytest.fixture(scope="module")
def policy_run(tmp_path_factory):
    from emergence.search.train import run

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("search-train")
        run(out, "quick", device="cpu", log=lambda m: None)
    finally:
        torch.set_num_threads(before)
    return out


def test_r1_zero_smoke_run(policy_run, tmp_path, one_thread):
    import emergence
    from emergence.search.policy import LocalPolicy
    from emergence.search.prompt import format_prompt
    from emergence.search.train import is_correct, normalize_solution

    work, out = tmp_path / "work", tmp_path / "r1.json"
    policy = policy_run / "policies" / "L" / "model"
    _run("r1_zero.py", "--smoke", "--policy", str(policy), "--work", str(work), "--out-json", str(out))
    r = json.loads(out.read_text())
    held = [json.loads(line) for line in (work / "held_out.jsonl").read_text().splitlines()]
    seen = {json.loads(line)["question"] for line in (policy_run / "problems" / "train.jsonl").read_text().splitlines()}
    assert held and not seen & {h["question"] for h in held}  # held out from the policy's own problems
    assert len(held) == r["held_out"] == 16 - r["held_out_dropped"]
    # the accuracy before training, recounted through emergence search's policy (LocalPolicy)
    lm = emergence.load(str(policy), device="cpu")
    gens = LocalPolicy(lm).generate([format_prompt(h["question"]) for h in held], 1, temperature=0.0,
                                    max_tokens=r["settings"]["max_new"])
    right = [is_correct(normalize_solution(g.samples[0].text), h["answer"]) for g, h in zip(gens, held)]
    assert r["before"]["right"] == sum(right)
    for d, v in r["before"]["by_difficulty"].items():
        assert v["right"] == sum(ok for ok, h in zip(right, held) if h["difficulty"] == int(d))
    assert [c["step"] for c in r["curve"]] == [1, 2] and [e["step"] for e in r["evals"]] == [0, 1, 2]
    assert all(0.0 <= c["reward"] <= 1.0 for c in r["curve"])
    assert Path(r["saved"]).name == "model" and (Path(r["saved"]) / "config.json").exists()


def test_the_committed_page_shows_the_committed_results(igpt):
    """docs/alignment.md carries the tables rendered from bench/results/instructgpt.json, and the
    over-optimisation it describes is in those results: past step 20 of the high-learning-rate run
    the reward-model score ends higher and the hidden rule's win rate and score end lower."""
    result = json.loads((ROOT / "bench" / "results" / "instructgpt.json").read_text())
    page = (ROOT / "docs" / "alignment.md").read_text()
    assert igpt.table(result) in page and igpt.curves_table(result) in page
    curve = result["ppo_hot"]["curve"]
    first, last = next(p for p in curve if p["step"] == 20), curve[-1]
    assert last["rm"] > first["rm"] and last["win_rate"] < first["win_rate"] < 0.55
    assert last["hidden"] < first["hidden"] / 4 and last["win_rate"] < 0.5
