"""emergence.align.data: preference rows -> chosen / rejected ids with completion masks, with the
real GPT-2 tokenizer of the shared data and the chatml template. Masks are checked by decoding
the trained tokens to exact strings. Nothing is downloaded."""

from __future__ import annotations

import json
from functools import lru_cache

import pytest
import torch

from emergence.align.data import PreferencePair, collate, load_pairs, to_pair
from emergence.chat import ChatTemplate
from emergence.errors import InvalidArgument
from emergence.tokenizer import Tokenizer

from conftest import SHARED_DATA  # noqa: E402

CHATML = ChatTemplate.builtin("chatml")
W = "prefs.jsonl:1"
EOT = "<|im_end|>\n"


@lru_cache(maxsize=None)
def gpt2() -> Tokenizer:
    return Tokenizer.load(SHARED_DATA / "gpt2_tokenizer")


def runs(ex) -> list[str]:
    """The decoded text of each maximal run of trained tokens."""
    out, current = [], []
    for token, trained in zip(ex.ids, ex.mask):
        if trained:
            current.append(token)
        elif current:
            out.append(current)
            current = []
    out += [current] if current else []
    return [gpt2().decode(r, skip_special_tokens=False) for r in out]


def untrained(ex) -> str:
    return gpt2().decode([t for t, m in zip(ex.ids, ex.mask) if not m], skip_special_tokens=False)


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_text_row_trains_each_completion_and_eos():
    pair = to_pair({"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Lyon, surely."},
                   W, gpt2(), CHATML)
    assert runs(pair.chosen) == [" Paris.<|endoftext|>"]
    assert runs(pair.rejected) == [" Lyon, surely.<|endoftext|>"]
    assert untrained(pair.chosen) == untrained(pair.rejected) == "The capital of France is"
    assert pair.chosen.ids == gpt2().encode("The capital of France is Paris.", add_bos=False) + [50256]
    assert pair.margin is None and pair.where == W


def test_chat_rows_train_only_the_completion_answer():
    tok = gpt2()
    prompt = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"},
              {"role": "user", "content": "What is 2+2?"}]
    pair = to_pair({"prompt": prompt, "chosen": [{"role": "assistant", "content": "4."}],
                    "rejected": [{"role": "assistant", "content": "5."}], "margin": 2}, W, tok, CHATML)
    # the earlier assistant turn of the prompt is context, not trained
    assert runs(pair.chosen) == ["4." + EOT]
    assert runs(pair.rejected) == ["5." + EOT]
    head = ("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there!<|im_end|>\n"
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert untrained(pair.chosen) == head
    rendered = CHATML.render(prompt + [{"role": "assistant", "content": "4."}])
    assert pair.chosen.ids == tok.encode(rendered, add_bos=False)
    assert pair.margin == 2.0


def test_mixed_forms_mean_the_same_conversation():
    tok = gpt2()
    msgs = to_pair({"prompt": [{"role": "user", "content": "Hi"}],
                    "chosen": [{"role": "assistant", "content": "Hello!"}],
                    "rejected": [{"role": "assistant", "content": "Go away."}]}, W, tok, CHATML)
    # a string prompt is one user message, a string completion one assistant message
    for row in ({"prompt": "Hi", "chosen": [{"role": "assistant", "content": "Hello!"}],
                 "rejected": [{"role": "assistant", "content": "Go away."}]},
                {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go away."}):
        assert to_pair(row, W, tok, CHATML) == msgs
    assert runs(msgs.chosen) == ["Hello!" + EOT] and runs(msgs.rejected) == ["Go away." + EOT]


def test_load_skips_identical_pairs_and_counts_them(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        {"prompt": "2+3=", "chosen": "5", "rejected": "5"},  # identical text
        "",
        {"prompt": "Hi", "chosen": [{"role": "assistant", "content": "Hey"}], "rejected": "Hey"},  # identical messages
        {"prompt": "Hi", "chosen": "Hello there, how can I help you today?", "rejected": "Hey"},
    ])
    pairs, report = load_pairs([path], gpt2(), CHATML)
    assert report == {"rows": 4, "pairs": 2, "identical": 2, "too_long": 0}
    assert [p.where for p in pairs] == [f"{path}:1", f"{path}:5"]
    assert runs(pairs[0].chosen) == ["4<|endoftext|>"]
    longest = max(len(pairs[1].chosen.ids), len(pairs[1].rejected.ids))
    pairs, report = load_pairs([path], gpt2(), CHATML, max_length=longest - 1)
    assert report == {"rows": 4, "pairs": 1, "identical": 2, "too_long": 1}
    only_same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "b"}])
    with pytest.raises(InvalidArgument, match="no preference pairs in .*same.jsonl: of 1 rows, 1 have chosen =="):
        load_pairs([only_same], gpt2(), CHATML)


def test_collate_pads_right_chosen_first():
    tok = gpt2()
    a = to_pair({"prompt": "2+2=", "chosen": "4", "rejected": " five", "margin": 0.5}, W, tok, CHATML)
    b = to_pair({"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "margin": -1}, W, tok, CHATML)
    batch = collate([a, b], pad_token_id=7)
    rows = [a.chosen, b.chosen, a.rejected, b.rejected]
    width = max(len(r.ids) for r in rows)
    assert batch.input_ids.shape == batch.completion_mask.shape == (4, width)
    for i, r in enumerate(rows):
        n = len(r.ids)
        assert batch.input_ids[i, :n].tolist() == r.ids and batch.input_ids[i, n:].eq(7).all()
        assert batch.completion_mask[i, :n].tolist() == r.mask and not batch.completion_mask[i, n:].any()
    torch.testing.assert_close(batch.margin, torch.tensor([0.5, -1.0]))
    assert collate([PreferencePair(a.chosen, a.rejected, None, W)], 0).margin is None
    with pytest.raises(InvalidArgument, match="prefs.jsonl:1: this row has no 'margin' but others in its batch do"):
        collate([a, PreferencePair(b.chosen, b.rejected, None, W)], 0)


USER = [{"role": "user", "content": "Hi"}]
ANSWER = [{"role": "assistant", "content": "Hey"}]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "x", "chosen": "y"}, "preference row is missing 'rejected'"),
    ({"chosen": "y", "rejected": "z"}, "preference row is missing 'prompt'"),
    ({"prompt": "x", "chosen": "y", "rejected": "z", "margin": "1"}, "'margin' must be a finite number, got '1'"),
    ({"prompt": "x", "chosen": "y", "rejected": "z", "margin": True}, "'margin' must be a finite number, got True"),
    ({"prompt": "x", "chosen": " ", "rejected": "z"}, "the completion is empty"),
    ({"prompt": 5, "chosen": "y", "rejected": "z"},
     "'prompt' must be a string or a non-empty list of messages, got int"),
    ({"prompt": USER, "chosen": [], "rejected": ANSWER}, "'chosen' must be a string or a non-empty list"),
    ({"prompt": USER, "chosen": [{"role": "assistant"}], "rejected": ANSWER},
     "chosen[0] must be an object with string 'role' and 'content'"),
    ({"prompt": [{"role": "bot", "content": "x"}], "chosen": ANSWER, "rejected": "no"},
     "prompt[0] has unknown role 'bot'"),
    ({"prompt": USER, "chosen": ANSWER, "rejected": [{"role": "user", "content": "?"}]},
     "'rejected' has no assistant message"),
    ({"prompt": USER, "chosen": ANSWER, "rejected": [{"role": "assistant", "content": " "}]},
     "assistant turn 1 (message 1) is empty"),
    ({"prompt": ANSWER, "chosen": ANSWER, "rejected": "no"}, "starts with an assistant turn"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "ok", "chosen": " a", "rejected": " b"}, "", row])
    with pytest.raises(InvalidArgument) as e:
        load_pairs([path], gpt2(), CHATML)
    text = str(e.value)
    assert "prefs.jsonl:3: " in text and message in text and "\n" not in text, text


def test_bad_files(tmp_path):
    with pytest.raises(InvalidArgument, match="data file not found"):
        load_pairs([tmp_path / "none.jsonl"], gpt2(), CHATML)
    path = write_jsonl(tmp_path / "prefs.jsonl", ["[1, 2]"])
    with pytest.raises(InvalidArgument, match="prefs.jsonl:1: expected a JSON object, got list"):
        load_pairs([path], gpt2(), CHATML)
    with pytest.raises(InvalidArgument, match="max_length must be an integer >= 2"):
        load_pairs([path], gpt2(), CHATML, max_length=0)
