"""bench/instruction_tune.py: its rows, its graders, and its --smoke run end to end.

The rows are made from the shared TinyStories sample with emergence-6m's tokenizer; every
target must pass its own grader, and the graders must turn down hand-written wrong answers.
The smoke run (about 50 rows, 3 steps of LoRA r=8, the base model and the tuned one graded on
8 held-out rows) runs as users run it, in a subprocess, into tmp_path."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA

import emergence

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "instruction_tune.py"
TRAIN_TEXT = SHARED_DATA / "tinystories" / "train" / "TinyStories-train.head2MiB.txt"
VALID_TEXT = SHARED_DATA / "tinystories" / "valid" / "hf_TinyStories_validation.head.txt"


@pytest.fixture(scope="module")
def it():
    spec = importlib.util.spec_from_file_location("instruction_tune", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def count_tokens():
    tok = emergence.load("emergence-6m", device="cpu").tokenizer
    return lambda text: len(tok.encode(text, add_bos=False))


@pytest.fixture(scope="module")
def rows(it, count_tokens):
    stories = it.train_stories(TRAIN_TEXT)[:400]
    return it.build_rows(stories, it.Lexicon(stories), 80, count_tokens, 1, per_kind=False)


@pytest.fixture(scope="module")
def held(it, count_tokens):
    stories = [s for s, _ in it.valid_stories(VALID_TEXT)]
    return it.build_rows(stories, it.Lexicon(stories), 5, count_tokens, 2, per_kind=True)


def test_targets_pass_their_graders(it, rows, held):
    assert len(rows) == 80 and {r["kind"] for r in rows} == set(it.KINDS)
    assert [r["kind"] for r in held] == [k for k in it.KINDS for _ in range(5)]
    for r in rows + held:
        user, answer = r["messages"]
        assert user["role"] == "user" and answer["role"] == "assistant"
        assert it.grade(r["kind"], r["check"], answer["content"]), r
    for r in rows + held:  # the story is in the user turn, except for the kind that asks for one
        if r["kind"] != "words":
            assert "\n\n" in r["messages"][0]["content"]
        else:
            assert r["messages"][1]["content"].count(".") >= 2  # a story, several sentences


def test_rows_are_deterministic(it, count_tokens, rows):
    stories = it.train_stories(TRAIN_TEXT)[:400]
    assert it.build_rows(stories, it.Lexicon(stories), 80, count_tokens, 1, per_kind=False) == rows


def test_valid_stories_start_where_stories_start(it):
    stories = it.valid_stories(VALID_TEXT)
    assert len(stories) > 500
    assert all(s.startswith(it.STORY_STARTS) for s, _ in stories)
    assert stories[0][1] > 0  # the partial story at the top of the file is skipped
    assert all(a[1] < b[1] for a, b in zip(stories, stories[1:]))


def test_excerpt_keeps_whole_sentences(it, count_tokens):
    story = ('Tom had a red ball. He liked it a lot. One day, Mom said, "Where is it? I cannot see it." '
             "Tom looked under the bed.\nHe found it! They played all day. The end.")
    cut = it.excerpt(story, count_tokens, 30)
    assert cut is not None and story.startswith(cut) and count_tokens(cut) <= 30
    assert cut.count('"') % 2 == 0 and cut.endswith((".", "!", "?", '."'))
    assert it.excerpt("One. Two.", count_tokens, 100) is None  # fewer than 3 sentences


@pytest.mark.parametrize("kind, check, answer, ok", [
    ("words", {"animal": "cat", "words": ["ball", "happy", "park"]},
     "A cat found a ball in the park. She was happy.", True),
    ("words", {"animal": "cat", "words": ["ball", "happy", "park"]},
     "A Cat found a BALL in the Park. Happy day!", True),  # case-insensitive
    ("words", {"animal": "cat", "words": ["ball", "happy", "park"]},
     "A cat found a ball in the garden. She was happy.", False),  # no "park"
    ("words", {"animal": "cat", "words": ["ball", "happy", "park"]},
     "A dog found a ball in the park. He was happy.", False),  # no cat
    ("words", {"animal": "cat", "words": ["ball", "happy", "park"]},
     "The catalog had balls, a parking lot and unhappy people.", False),  # whole words only
    ("title", {}, "The Little Cat", True),
    ("title", {}, "Lily and the Needle", True),
    ("title", {}, "the little cat", False),  # not title case
    ("title", {}, "The little cat", False),
    ("title", {}, "The Little Cat.", False),  # a period at the end
    ("title", {}, "Cat", False),  # one word
    ("title", {}, "A Very Long Title With Far Too Many Words", False),  # 9 words
    ("title", {}, "The Cat\nThe Dog", False),  # two lines
    ("title", {}, "The Cat, The Dog", False),  # punctuation inside
    ("retell", {"n": 2}, "Tom had a ball. He lost it in the park.", True),
    ("retell", {"n": 2}, 'Tom said, "I lost my ball!" Mom helped him find it.', True),
    ("retell", {"n": 2}, "Tom had a ball. He lost it. Mom found it.", False),  # three
    ("retell", {"n": 2}, "Tom had a ball.", False),  # one
    ("retell", {"n": 2}, "Tom had a ball. He lost it in the", False),  # unfinished
    ("retell", {"n": 1}, "Tom had a ball and lost it.", True),
    ("character", {"name": "Lily"}, "The main character is Lily.", True),
    ("character", {"name": "Lily"}, "Lily", True),
    ("character", {"name": "Lily"}, "The main character is Tom.", False),
    ("character", {"name": "Lily"}, "The main character is lily.", False),  # the name, capitalised
    ("character", {"name": "Lily"}, "Lilyanne is the main character.", False),  # whole word
    ("character", {"name": "Lily"}, "Once upon a time there was a girl named Lily who liked to play in the sun "
                                    "with her mom.", False),  # too long: a story, not an answer
    ("character", {"name": "Lily"}, "", False),
])
def test_grader(it, kind, check, answer, ok):
    assert it.grade(kind, check, answer) is ok


def test_an_answer_cut_at_the_cap_fails(it):
    rows = [{"kind": "title", "check": {}}, {"kind": "title", "check": {}}]
    s = it.score(rows, [("The Little Cat", True), ("The Little Cat", False)])
    assert s["ok"] == [True, False] and s["overall"] == 0.5 and s["grader_only"] == 1.0


def test_smoke_run(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out-json", str(out), "--work",
                           str(tmp_path / "work")], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["model"] == "emergence-6m" and r["model_parameters"] == 5_868_800
    assert r["commit"] and r["machine"]["cores"] >= 1 and r["machine"]["torch"]
    d = r["data"]
    assert d["train_rows"] == 48 and d["held_out_rows"] == 8 and d["template"] in ("chatml", "vicuna")
    assert d["template_tokens"][d["template"]] == min(d["template_tokens"].values())
    rows = [json.loads(x) for x in (tmp_path / "work" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 48 and all(list(x) == ["messages"] for x in rows)

    def rates(s):
        assert 0 <= s["overall"] <= 1 and set(s["by_kind"]) == {"words", "title", "retell", "character"}
        assert all(v is None or 0 <= v <= 1 for v in s["by_kind"].values())

    rates(r["base"])
    assert len(r["configs"]) == 1
    c = r["configs"][0]
    assert c["name"] == "lora-r8" and c["method"] == "lora" and c["r"] == 8 and c["alpha"] == 16
    rates(c["after"])
    rates(c["before"])
    assert c["before"]["overall"] == r["base"]["overall"]
    assert 0 < c["trainable_fraction"] < 0.1 and c["trainable"] == 6 * 8 * (3 * (256 + 256) + 256 + 256
                                                                           + 2 * (256 + 704) + (704 + 256))
    for key in ("peak_rss_mib", "rss_after_imports_mib", "tokens_per_s", "train_wall_s", "eval_s",
                "final_train_loss", "final_val_loss"):
        assert math.isfinite(c[key]) and c[key] > 0, key
    assert c["peak_rss_mib"] >= c["rss_after_imports_mib"]
    assert [s for s, _ in c["train_loss"]] == [1, 2, 3] and all(math.isfinite(x) for _, x in c["train_loss"])
    assert c["val_loss"] and all(math.isfinite(x) for _, x in c["val_loss"])
    assert [e["kind"] for e in r["examples"]] == ["words", "title", "retell", "character"]
    for e in r["examples"]:
        assert set(e["answers"]) == {"base", "lora-r8"} and e["target"] and e["instruction"]
    assert r["keep"] is None and math.isfinite(r["total_wall_s"])
