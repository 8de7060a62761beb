"""Revision training data (search/revise.py): the attempts chosen by closeness to the right
solution (Snell et al.'s wrong attempts) or drawn as sampled, the rows built from them on
hand-worked problems, and the context-raised model copy."""

from __future__ import annotations

import json
import random

import pytest
import torch

from emergence.errors import InvalidArgument
from emergence.search.prompt import format_prompt
from emergence.search.revise import closeness, pick_attempts, plain_rows, revision_rows, with_context

ROW = {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
       "steps": ["Step 1: 3 + 4 = 7"], "answer": 7, "difficulty": 1}
RIGHT = "Step 1: 3 + 4 = 7\nAnswer: 7"
NEAR = "Step 1: 3 + 4 = 8\nAnswer: 8"  # one digit off, twice
FAR = "Step 1: 3 × 4 = 12\nAnswer: 12"
GARBAGE = "Answer: 0"


def test_closeness_is_one_for_equal_texts_and_orders_the_misses():
    assert closeness(RIGHT, RIGHT) == 1.0
    assert closeness(NEAR, RIGHT) > closeness(FAR, RIGHT) > closeness(GARBAGE, RIGHT)
    # difflib's ratio: 2 x matching characters / both lengths
    assert closeness("abcd", "abce") == pytest.approx(2 * 3 / 8)


def test_pick_attempts_keeps_the_closest_distinct_misses_least_close_first():
    assert pick_attempts(RIGHT, [GARBAGE, NEAR, FAR, NEAR, "  "], 2) == [FAR, NEAR]
    assert pick_attempts(RIGHT, [GARBAGE, NEAR, FAR], 3) == [GARBAGE, FAR, NEAR]
    assert pick_attempts(RIGHT, [GARBAGE, NEAR], 5) == [GARBAGE, NEAR]  # fewer than asked: all of them
    assert pick_attempts(RIGHT, [GARBAGE, GARBAGE], 1) == [GARBAGE]  # ties and repeats: one copy


def test_revision_rows_put_wrong_attempts_before_the_canonical_solution():
    other = {"question": "Ann had 10 pens and gave away 6. How many are left?", "steps": ["Step 1: 10 - 6 = 4"],
             "answer": 4, "difficulty": 1}
    attempts = [[(RIGHT, True), (NEAR, False), (FAR, False), (NEAR, False)],
                [("Step 1: 10 - 6 = 4\nAnswer: 4", True)]]  # all right: nothing to revise, no row
    rows = revision_rows([ROW, other], attempts, window=4, seed=3, kind="wrong")
    count = random.Random(3).randint(1, 2)  # the chain length drawn for the first problem (2 distinct misses)
    assert len(rows) == 1
    chain = [FAR, NEAR][-count:]
    body = "".join(f"Attempt {k + 1}:\n{a}\n" for k, a in enumerate(chain))
    assert rows[0] == {"prompt": f"Question: {ROW['question']}\n{body}Revise: answer step by step.\n",
                       "completion": RIGHT}
    # every length 1..min(window, misses) is drawn over many problems; window caps it
    many = revision_rows([ROW] * 200, [attempts[0]] * 200, window=4, seed=0, kind="wrong")
    assert {r["prompt"].count("\nAttempt ") for r in many} == {1, 2}
    assert {r["prompt"].count("\nAttempt ") for r in revision_rows([ROW] * 50, [attempts[0]] * 50, window=1,
                                                                    seed=0, kind="wrong")} == {1}
    # "sampled": the problem's distinct samples, right or wrong alike, in a seeded random order
    rows = revision_rows([ROW, other], attempts, window=4, seed=5, kind="sampled")
    rng = random.Random(5)
    pool = [RIGHT, NEAR, FAR]
    first = rng.sample(pool, rng.randint(1, 3))
    second = rng.sample(["Step 1: 10 - 6 = 4\nAnswer: 4"], rng.randint(1, 1))
    assert [r["prompt"] for r in rows] == [
        f"Question: {ROW['question']}\n" + "".join(f"Attempt {k + 1}:\n{a}\n" for k, a in enumerate(first))
        + "Revise: answer step by step.\n",
        f"Question: {other['question']}\nAttempt 1:\n{second[0]}\nRevise: answer step by step.\n"]
    assert [r["completion"] for r in rows] == [RIGHT, "Step 1: 10 - 6 = 4\nAnswer: 4"]
    many = revision_rows([ROW] * 300, [attempts[0]] * 300, window=4, seed=0, kind="sampled")
    assert {r["prompt"].count("\nAttempt ") for r in many} == {1, 2, 3}
    assert sum(f"\n{RIGHT}\nRevise" in r["prompt"] for r in many) > 50  # a right last attempt, then the solution
    with pytest.raises(InvalidArgument, match="revision attempts must be one of wrong, sampled"):
        revision_rows([ROW], attempts[:1], window=2, seed=0, kind="right")
    with pytest.raises(InvalidArgument, match="window must be >= 1"):
        revision_rows([ROW], attempts[:1], window=0, seed=0)
    with pytest.raises(InvalidArgument, match="1 problems but 2 lists"):
        revision_rows([ROW], attempts, window=2, seed=0)


def test_plain_rows_are_the_pretraining_text_split_at_the_solution():
    (row,) = plain_rows([ROW])
    assert row == {"prompt": format_prompt(ROW["question"]), "completion": RIGHT}
    from emergence.search.prompt import training_text

    assert row["prompt"] + row["completion"] == training_text(ROW)


def test_with_context_raises_a_rope_models_block_size_and_keeps_its_weights(tmp_path):
    from emergence.config import Config
    from emergence.model import Transformer
    from emergence.weights.hf import load_hf, save_hf

    torch.manual_seed(0)
    config = Config(name="t", family="llama", norm="rmsnorm", mlp="swiglu", position="rope", vocab_size=64,
                    block_size=32, n_layer=1, n_head=2, n_embd=16, intermediate_size=32)
    model = Transformer(config).eval()
    save_hf(model, tmp_path / "src")
    out = with_context(tmp_path / "src", tmp_path / "long", 96)
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 96
    longer, longer_config = load_hf(out, dtype=torch.float32)
    assert longer_config.block_size == 96
    longer.eval()
    ids = torch.randint(0, 64, (1, 32))
    with torch.inference_mode():
        assert torch.equal(longer(ids), model(ids))  # the same weights, the same logits within the old context
        assert longer(torch.randint(0, 64, (1, 80))).shape == (1, 80, 64)
    with pytest.raises(InvalidArgument, match="below the model's 32"):
        with_context(tmp_path / "src", tmp_path / "short", 16)
    save_hf(Transformer(Config.from_name("tiny-gpt2", n_layer=1)), tmp_path / "gpt2")
    with pytest.raises(InvalidArgument, match="only a RoPE model"):
        with_context(tmp_path / "gpt2", tmp_path / "g2", 64)
