"""bench/t5_tasks.py: its task rows on hand-worked sentences, and its --smoke run end to end
(span-corruption pretraining through `emergence.train`, fine-tuning, exact match) in a
subprocess, as users run it."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "t5_tasks.py"


@pytest.fixture(scope="module")
def tasks():
    spec = importlib.util.spec_from_file_location("t5_tasks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sentences_are_plain_words_with_a_final_period(tasks):
    text = 'Lily ran to the park. "Hi!" she said. It was a very sunny day in the town.\nThe end'
    assert tasks.sentences(text) == ["Lily ran to the park.", "It was a very sunny day in the town."]


@pytest.mark.parametrize("task,source,target", [
    ("fill in", "fill in: Lily ran to the {S0}.", "park"),
    ("last word", "last word: Lily ran to the park.", "park"),
])
def test_rows_of_a_sentence(tasks, task, source, target):
    class OnlyLast(random.Random):  # the fill-in word: the last of length >= 4
        def choice(self, seq):
            return seq[-1]

    assert tasks.make_row(task, "Lily ran to the park.", OnlyLast()) == (source, target)


def test_reverse_and_count_rows_are_right(tasks):
    rng = random.Random(0)
    for _ in range(50):
        source, target = tasks.make_row("reverse words", "one two three four five six seven.", rng)
        words = source.removeprefix("reverse words: ").split()
        assert 3 <= len(words) <= 6 and target.split() == words[::-1]
        source, target = tasks.make_row("count words", "one two three four five six seven.", rng)
        assert int(target) == len(source.removeprefix("count words: ").split())


def test_fill_in_source_holds_the_first_sentinel(tasks):
    from emergence.tokenizer import Tokenizer

    tok = Tokenizer.load(SHARED_DATA / "gpt2_tokenizer")
    row = {"task": "fill in", "source": "fill in: Lily ran to the {S0}.", "target": "park"}
    source, target = tasks.encode_row(row, tok, sentinel=60000, eos=50256)
    assert source == tok.encode("fill in: Lily ran to the ") + [60000] + tok.encode(".") + [50256]
    assert target == tok.encode("park") + [50256]


def test_held_out_rows_come_from_the_validation_stories(tasks):
    train = tasks.build_rows(tasks.TRAIN_TEXT.read_text(encoding="utf-8"), 30, seed=1)
    held = tasks.build_rows(tasks.VALID_TEXT.read_text(encoding="utf-8"), 30, seed=2)
    assert [r["task"] for r in held] == [t for t in tasks.TASKS for _ in range(30)]
    assert len({r["source"] for r in held}) == len(held)
    assert not {r["source"] for r in train} & {r["source"] for r in held}


def test_smoke_run_pretrains_fine_tunes_and_scores(tmp_path):
    out = tmp_path / "t5.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out-json", str(out), "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    pre = r["pretraining"]
    assert pre["steps"] == 4 and pre["last_train_loss"] < pre["first_train_loss"]
    assert [step for step, _ in pre["val_loss"]] == [1, 2, 3, 4] and pre["val_loss"][-1][1] < pre["val_loss"][0][1]
    for losses in r["finetune_loss"].values():
        assert losses[1] < losses[0]
    assert r["train_rows"] == 160 and r["held_rows"] == 20
    for scores in r["exact_match"].values():
        assert set(scores) == {"fill in", "reverse words", "count words", "last word"}
        assert all(0 <= v <= 1 for v in scores.values())
    assert [e["source"].split(":")[0] for e in r["examples"]] == ["fill in", "reverse words", "count words",
                                                                   "last word"]
