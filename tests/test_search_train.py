"""Training the search policies and verifiers (emergence.search.train): Math-Shepherd step labels
with a fake policy of known continuations, the ORM and PRM losses on fixed tensors against
hand-computed values, the AUC, and the quick pipeline end to end (its files, resume skipping
the finished stages, and the PRM and ORM scores read back through search.verifier equal to the
trained heads' values)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from emergence.cli import main
from emergence.errors import InvalidArgument
from emergence.search import Generation, Sample, Usage, format_prompt
from emergence.search.train import (SETTINGS, Pipeline, auc, is_correct, math_shepherd_labels, orm_loss, prm_loss,
                                    run, verifier_inputs)


def _bce(logit: float, label: float) -> float:
    """-[y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))], written out."""
    p = 1 / (1 + math.exp(-logit))
    return -(label * math.log(p) + (1 - label) * math.log(1 - p))


# ------------------------------------------------------------------------------ the losses
def test_orm_loss_is_the_mean_binary_cross_entropy_of_the_last_token_scores():
    scores = torch.tensor([0.0, 2.0, -1.0])
    labels = torch.tensor([1.0, 0.0, 1.0])
    # ln 2, ln(1 + e^2), ln(1 + e): 0.693147 + 2.126928 + 1.313262 = 4.133337, over 3 rows
    assert orm_loss(scores, labels).item() == pytest.approx(4.133337 / 3, abs=1e-5)
    assert orm_loss(scores, labels).item() == pytest.approx(sum(map(_bce, [0.0, 2.0, -1.0], [1, 0, 1])) / 3)
    # soft labels (a fraction of rollouts) are allowed
    assert orm_loss(torch.tensor([0.0]), torch.tensor([0.25])).item() == pytest.approx(math.log(2))


def test_prm_loss_reads_only_the_step_positions():
    scores = torch.tensor([[5.0, 0.0, 9.0, 1.0],
                           [-3.0, 7.0, -2.0, 8.0]])
    mask = torch.tensor([[False, True, False, True],
                         [False, False, True, False]])
    labels = torch.tensor([[9.0, 1.0, 9.0, 0.0],  # the 9s sit where no step ends: never read
                           [9.0, 9.0, 0.0, 9.0]])
    # steps: (0, label 1): ln 2 = 0.693147; (1, 0): ln(1 + e) = 1.313262; (-2, 0): ln(1 + e^-2) = 0.126928
    expected = (0.693147 + 1.313262 + 0.126928) / 3
    assert prm_loss(scores, mask, labels).item() == pytest.approx(expected, abs=1e-5)
    other = scores.clone()
    other[~mask] = 100.0  # what the head says elsewhere does not matter
    assert prm_loss(other, mask, labels).item() == pytest.approx(expected, abs=1e-5)
    # no step at all: zero, with a gradient path
    empty = prm_loss(scores.requires_grad_(), torch.zeros_like(mask), labels)
    assert empty.item() == 0.0
    empty.backward()


def test_auc_counts_pairs_and_ties():
    assert auc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
    assert auc([0.1, 0.9], [1, 0]) == 0.0
    assert auc([0.5, 0.5, 0.2], [1, 0, 0]) == pytest.approx(0.75)  # one win, one tie of two pairs
    assert auc([0.3, 0.4], [1, 1]) is None


# ------------------------------------------------------------------- Math-Shepherd labels
class ContinuationPolicy:
    """Sample j of a prompt continues it with table[last line of the prompt][j]."""

    name = "fake"

    def __init__(self, table):
        self.table, self.usage, self.calls = table, Usage(), []

    def generate(self, prompts, n, *, temperature=1.0, top_p=1.0, max_tokens=256, stop=()):
        self.calls.append((list(prompts), n))
        out = []
        for p in prompts:
            last = p.rstrip("\n").split("\n")[-1]
            out.append(Generation(p, [Sample(self.table[last][j], 1, "eos") for j in range(n)]))
        return out


PROMPT = format_prompt("Ana has 2 bags of 3 apples and buys 4 times as many. How many apples?")


def test_a_step_is_positive_iff_a_rollout_from_it_reaches_the_answer():
    wrong = "Step 1: 2 × 3 = 6\nStep 2: 6 × 5 = 30\nStep 3: 30 - 6 = 24\nAnswer: 25"
    right = "Step 1: 2 × 3 = 6\nStep 2: 6 × 4 = 24\nAnswer: 24"
    policy = ContinuationPolicy({
        "Step 1: 2 × 3 = 6": ["Step 2: 6 × 4 = 24\nAnswer: 24", "Answer: 7"],  # one of two reaches 24
        "Step 2: 6 × 5 = 30": ["Answer: 30", "Step 3: 30 + 1 = 31\nAnswer: 31"],  # none does
        "Step 3: 30 - 6 = 24": ["Answer: 24\nStep 9: 1 + 1 = 2", "Answer: 24"],  # both (text after Answer: ignored)
    })
    items = [{"prompt": PROMPT, "solution": wrong, "answer": 24}, {"prompt": PROMPT, "solution": right, "answer": 24}]
    labels = math_shepherd_labels(policy, items, rollouts=2, temperature=0.7, max_tokens=32, chunk=2)
    first, second = labels
    assert first["labels"] == [1, 0, 1, 0]  # hard estimation: any success; a later step may recover
    assert first["successes"] == [1, 0, 2, None]  # the answer line is graded, not rolled out
    assert first["rollouts"] == [2, 2, 2, 0]
    # a right solution is its own successful rollout from every step: all positive, no rollouts
    assert second == {"steps": right.split("\n"), "labels": [1, 1, 1], "successes": [None] * 3, "rollouts": [0] * 3}
    # the rollouts continue exactly prompt + steps 1..i + newline, two per prefix, two prefixes per call
    prompts = [p for call, _ in policy.calls for p in call]
    assert prompts == [PROMPT + "Step 1: 2 × 3 = 6\n", PROMPT + "Step 1: 2 × 3 = 6\nStep 2: 6 × 5 = 30\n",
                       PROMPT + "Step 1: 2 × 3 = 6\nStep 2: 6 × 5 = 30\nStep 3: 30 - 6 = 24\n"]
    assert [n for _, n in policy.calls] == [2, 2] and [len(c) for c, _ in policy.calls] == [2, 1]


def test_a_wrong_answer_line_is_negative_and_a_solution_without_one_is_rolled_out():
    policy = ContinuationPolicy({"Step 1: 2 × 3 = 6": ["Answer: 5"]})
    (lab,) = math_shepherd_labels(policy, [{"prompt": PROMPT, "solution": "Step 1: 2 × 3 = 6", "answer": 24}],
                                  rollouts=1, temperature=1.0, max_tokens=8)
    assert lab["labels"] == [0] and lab["successes"] == [0]


# --------------------------------------------------------------------- the quick pipeline
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest (and the others' tests keep theirs)
    try:
        out = tmp_path_factory.mktemp("search-train")
        logs = []
        summary = run(out, "quick", device="cpu", log=logs.append)
    finally:
        torch.set_num_threads(before)
    return out, summary, logs


def test_the_quick_pipeline_writes_every_stage(quick):
    out, summary, logs = quick
    for split in ("train", "verifier", "heldout"):
        assert (out / "problems" / f"{split}.jsonl").is_file()
    for name in ("S", "M", "L"):
        assert (out / "policies" / name / "model" / "model.safetensors").is_file()
    for kind in ("orm", "prm"):
        assert (out / kind / "model.safetensors").is_file() and (out / kind / "tokenizer.json").is_file()
        config = json.loads((out / kind / "config.json").read_text())
        assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    train_rows = [json.loads(line) for line in (out / "problems" / "train.jsonl").read_text().splitlines()]
    assert sorted({r["difficulty"] for r in train_rows}) == list(range(1, 9))
    held = {json.loads(line)["question"] for line in (out / "problems" / "heldout.jsonl").read_text().splitlines()}
    assert not held & {r["question"] for r in train_rows}
    sizes = [p["params"] for p in summary["policies"]]
    assert sizes == sorted(sizes) and len(sizes) == 3
    for p in summary["policies"]:
        assert set(p["greedy"]["by_difficulty"]) == {str(d) for d in range(1, 9)}
        assert p["tokens"] == p["steps"] * SETTINGS["quick"].batch_size * SETTINGS["quick"].context
    labelled = [json.loads(line) for line in (out / "samples" / "verifier-labelled.jsonl").read_text().splitlines()]
    assert labelled and all(len(r["step_labels"]) == len(r["solution"].split("\n")) for r in labelled if r["solution"])
    assert set(summary["verifiers"]) == {"orm", "prm"}
    assert any("[prm] " in line for line in logs)


def test_a_rerun_skips_the_finished_stages(quick):
    out, summary, _ = quick
    logs = []
    pipeline = Pipeline(out, SETTINGS["quick"], device="cpu", log=logs.append, setting_name="quick")
    again = pipeline.run()
    assert pipeline.ran == []
    assert again["policies"] == summary["policies"] and again["verifiers"] == summary["verifiers"]
    # a stage whose record is gone runs again (a policy already trained is not retrained)
    (out / "stages" / "eval-verifiers.json").unlink()
    (out / "stages" / "policy-L.json").unlink()
    model = (out / "policies" / "L" / "model" / "model.safetensors").stat().st_mtime_ns
    pipeline = Pipeline(out, SETTINGS["quick"], device="cpu", log=logs.append, setting_name="quick")
    pipeline.run()
    assert pipeline.ran == ["policy-L", "eval-verifiers"]
    assert (out / "policies" / "L" / "model" / "model.safetensors").stat().st_mtime_ns == model
    # another setting in the same folder is refused
    other = dataclasses.replace(SETTINGS["quick"], rollouts=3)
    with pytest.raises(InvalidArgument, match="another setting"):
        Pipeline(out, other, device="cpu").run()


def test_the_revision_model_learns_from_its_policys_samples(quick):
    from emergence.problems import solution_text
    from emergence.weights.hf import load_hf

    out, summary, _ = quick
    s = SETTINGS["quick"]
    train = [json.loads(line) for line in (out / "problems" / "train.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (out / "revisions" / "S" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == s.revision_problems * s.revision_samples
    for r in samples:  # each sample graded as search grades it
        assert r["correct"] == is_correct(r["solution"], train[r["problem"]]["answer"])
    assert s.revision_attempts == "sampled"  # (the default kind: the attempts as the policy wrote them)
    sampled = sorted({r["problem"] for r in samples if r["solution"].strip()})
    (rev,) = summary["revisers"]
    assert rev["name"] == "S" and rev["attempts"] == "sampled"
    assert rev["revision_rows"] == rev["plain_rows"] == len(sampled) > 0
    assert sum(rev["chains"].values()) == len(sampled) and set(rev["chains"]) == {"1", "2"}
    folder = out / "revisions" / "S" / "sampled"
    data = [json.loads(line) for line in (folder / "data.jsonl").read_text().splitlines()]
    revise, plain = data[:len(sampled)], data[len(sampled):]
    for i, row in zip(sampled, revise):  # the problems with a sample, in order: attempts, then the solution
        problem = train[i]
        attempts = {r["solution"] for r in samples if r["problem"] == i}
        shown = row["prompt"].split("\nAttempt ")[1:]
        assert all(a.split(":\n", 1)[1].rsplit("\nRevise:", 1)[0].rstrip("\n") in attempts for a in shown)
        assert row["prompt"].startswith(f"Question: {problem['question']}\nAttempt 1:\n")
        assert row["prompt"].endswith("Revise: answer step by step.\n")
        assert row["completion"] == solution_text(problem)
    for problem, row in zip(train[s.revision_problems:], plain):  # as many plain rows of the next problems
        assert row == {"prompt": format_prompt(problem["question"]), "completion": solution_text(problem)}
    _, config = load_hf(folder / "run" / "model")
    assert config.block_size == s.revision_context and rev["steps"] > 0
    assert math.isfinite(rev["val_loss"])


def test_a_policy_from_elsewhere_gets_a_revision_model_of_its_own(quick, tmp_path):
    """revision_samples / train_reviser on a model folder that is not one of the run's policies (the
    GRPO-trained one): its own samples and folder; a model of another tokenizer is refused."""
    import shutil

    from emergence.config import Config
    from emergence.model import Transformer
    from emergence.tokenizer import Tokenizer
    from emergence.weights.hf import load_hf, save_hf

    out, _, _ = quick
    pipeline = Pipeline(out, SETTINGS["quick"], device="cpu", log=lambda m: None, setting_name="quick")
    other = tmp_path / "other"
    shutil.copytree(out / "policies" / "M" / "model", other)  # a policy of the run's tokenizer, under another name
    info = pipeline.revision_samples("X", other)
    assert info["samples"] == SETTINGS["quick"].revision_samples * SETTINGS["quick"].revision_problems
    assert (out / "revisions" / "X" / "samples.jsonl").is_file()
    rev = pipeline.train_reviser("X", "sampled", other)
    assert rev["name"] == "X" and rev["revision_rows"] > 0
    _, config = load_hf(out / "revisions" / "X" / "sampled" / "run" / "model")
    assert config.n_embd == json.loads((other / "config.json").read_text())["hidden_size"]
    stranger = tmp_path / "stranger"
    save_hf(Transformer(Config.from_name("tiny-gpt2", n_layer=1, vocab_size=512)), stranger)
    Tokenizer.train_bpe_from_texts(["some other text", "with other tokens"], 300).save(stranger)
    with pytest.raises(InvalidArgument, match="its tokenizer is not the run's"):
        pipeline.revision_samples("Y", stranger)


def test_verifier_scores_read_back_equal_the_trained_heads(quick):
    from emergence.align.reward import load_reward_model
    from emergence.search.verifier import load_verifier
    from emergence.tokenizer import Tokenizer

    out, _, _ = quick
    tok = Tokenizer.load(out / "tokenizer")
    for kind in ("orm", "prm"):
        checks = json.loads((out / kind / "check.json").read_text())
        assert checks
        verifier = load_verifier(str(out / kind), kind=kind, device="cpu")
        model = load_reward_model(out / kind)
        for c in checks:
            (read,) = verifier.score(c["prompt"], [c["solution"]])
            assert read == pytest.approx(c["scores"], abs=1e-5)  # as trained, before saving
            ids, positions = verifier_inputs(tok, kind, c["prompt"], c["solution"])
            with torch.inference_mode():
                head = torch.sigmoid(model.token_scores(torch.tensor([ids]))[0])
            assert read == pytest.approx([head[p].item() for p in positions], abs=1e-5)
            if kind == "prm":  # one score per step, each read at the newline ending the step
                assert len(read) == len(c["solution"].split("\n"))
                assert all(tok.decode([ids[p]]) == "\n" for p in positions)


def test_the_command_prints_the_table(quick, capsys):
    out, _, _ = quick
    before = torch.get_num_threads()
    try:  # --threads sets the process's torch threads: this process's other tests keep theirs
        assert main(["search-train", "--quick", "--out", str(out), "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(before)
    table = capsys.readouterr().out
    assert "ORM" in table and "PRM" in table and "parameter span" in table
    assert "revision model of S (sampled attempts)" in table
    assert main(["search-train", "--quick", "--out", str(out), "--threads", "0"]) == 1
