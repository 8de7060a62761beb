"""emergence.finetune.data: SFT rows -> ids + loss mask -> packed batches, with the real GPT-2
and Llama 3 tokenizers and chat templates of the shared data. The masks are checked by
decoding the trained tokens to exact strings. Nothing is downloaded."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from emergence.chat import ChatTemplate, template_variables
from emergence.errors import InvalidArgument
from emergence.finetune.data import (FORMATS, Example, Packed, SFTBatch, _first_fit, batch, detect_format,
                                     load_examples, pack, read_jsonl, split_held_out, to_example)
from emergence.gguf.vocab import tokenizer_from_gguf_metadata
from emergence.tokenizer import Tokenizer
from emergence.train.objectives import IGNORE_INDEX

from conftest import SHARED_DATA  # noqa: E402

GPT2 = SHARED_DATA / "gpt2_tokenizer"
LLAMA3 = SHARED_DATA / "llama3_tokenizer"
TEMPLATES = SHARED_DATA / "chat_templates"
W = "file.jsonl:1"

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there!"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
]


@lru_cache(maxsize=None)
def gpt2() -> Tokenizer:
    return Tokenizer.load(GPT2)


@lru_cache(maxsize=None)
def llama3() -> Tokenizer:
    """Llama 3 as llama.cpp's converter describes it: BOS <|begin_of_text|>, EOS <|eot_id|>, add BOS."""
    encoder = json.loads((LLAMA3 / "encoder.json").read_text(encoding="utf-8"))
    tokens = [""] * len(encoder)
    for piece, i in encoder.items():
        tokens[i] = piece
    merges = [m for m in (LLAMA3 / "vocab.bpe").read_text(encoding="utf-8").split("\n") if m and not m.startswith("#")]
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    return tokenizer_from_gguf_metadata({
        "general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens + specials,
        "tokenizer.ggml.token_type": [1] * len(tokens) + [3] * len(specials),
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 128000,
        "tokenizer.ggml.eos_token_id": 128009,
    })


CHATML = ChatTemplate.builtin("chatml")


def trained_runs(tok: Tokenizer, ex: Example) -> list[str]:
    """The decoded text of each maximal run of trained tokens."""
    runs, current = [], []
    for token, trained in zip(ex.ids, ex.mask):
        if trained:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def untrained_text(tok: Tokenizer, ex: Example) -> str:
    return tok.decode([t for t, m in zip(ex.ids, ex.mask) if not m], skip_special_tokens=False)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------ formats
@pytest.mark.parametrize("row, fmt", [
    ({"instruction": "Add", "input": "2 and 2", "output": "4"}, "alpaca"),
    ({"instruction": "Say hi", "output": "hi", "id": 7}, "alpaca"),
    ({"messages": [{"role": "user", "content": "a"}]}, "chat"),
    ({"conversations": [{"from": "human", "value": "a"}]}, "sharegpt"),
    ({"prompt": "Once", "completion": " upon"}, "completion"),
])
def test_detect_format(row, fmt):
    assert fmt in FORMATS
    assert detect_format(row, W) == fmt


def test_unknown_format_names_the_line_and_the_formats():
    with pytest.raises(InvalidArgument, match="file.jsonl:12: unknown row format") as e:
        detect_format({"question": "q", "answer": "a"}, "file.jsonl:12")
    for name in FORMATS:
        assert name in str(e.value)
    with pytest.raises(InvalidArgument, match="file.jsonl:3: alpaca row is missing 'output'"):
        detect_format({"instruction": "x"}, "file.jsonl:3")


# ------------------------------------------------------------------ the mask
def test_chatml_trains_each_answer_and_its_end_of_turn_only():
    tok = gpt2()
    ex = to_example({"messages": CHAT}, "chat", W, tok, CHATML)
    text = CHATML.render(CHAT)
    assert ex.ids == tok.encode(text, add_bos=False)  # the whole rendering, tokenized once
    assert trained_runs(tok, ex) == ["Hi there!<|im_end|>\n", "4.<|im_end|>\n"]
    rest = untrained_text(tok, ex)
    assert rest == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
                    "<|im_start|>assistant\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_llama3_tokenizer_and_template():
    tok = llama3()
    template = ChatTemplate.from_tokenizer_config(TEMPLATES / "llama3.json")
    ex = to_example({"messages": CHAT}, "chat", W, tok, template)
    assert trained_runs(tok, ex) == ["Hi there!<|eot_id|>", "4.<|eot_id|>"]
    assert ex.ids[0] == tok.bos_id == 128000 and ex.ids.count(tok.bos_id) == 1  # the template wrote BOS: not doubled
    assert ex.ids[-1] == tok.eos_id == 128009 and ex.mask[-1]  # the end of turn is the model's EOS: trained
    assert untrained_text(tok, ex).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.")
    # A template without BOS, with a tokenizer that adds it: BOS first, untrained.
    ex = to_example({"messages": CHAT}, "chat", W, tok, CHATML)
    assert ex.ids[:2] == [128000, *tok.encode("<|im_start|>", add_bos=False)[:1]] and ex.mask[0] is False
    assert trained_runs(tok, ex) == ["Hi there!<|im_end|>\n", "4.<|im_end|>\n"]


def test_straddling_tokens():
    tok = gpt2()
    # The generation prompt ends with a space that GPT-2 merges into the answer (" Hi"): trained.
    spaced = ChatTemplate("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                          "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    ex = to_example({"messages": [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Hi"}]},
                    "chat", W, tok, spaced)
    assert trained_runs(tok, ex) == [" Hi\n"]
    # Mistral writes "answer</s> " then "[INST]": the token " [" begins in the answer's span but
    # carries the next user's text: not trained.
    msgs = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "Of Italy?"}, {"role": "assistant", "content": "Rome."}]
    ex = to_example({"messages": msgs}, "chat", W, tok, ChatTemplate.builtin("mistral"))
    assert trained_runs(tok, ex) == ["Paris.<|endoftext|>", "Rome.<|endoftext|> "]
    assert " [INST] Of Italy? [/INST]" in untrained_text(tok, ex)


@pytest.mark.parametrize("row, user", [
    ({"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"}, "Add the numbers.\n\n2 and 2"),
    ({"instruction": "Say hi.", "input": "", "output": "4"}, "Say hi."),
    ({"instruction": "Say hi.", "output": "4"}, "Say hi."),
    ({"instruction": "Say hi.", "input": None, "output": "4", "system": "Be kind."}, "Say hi."),
])
def test_alpaca(row, user):
    tok = gpt2()
    ex = to_example(row, "alpaca", W, tok, CHATML)
    msgs = ([{"role": "system", "content": row["system"]}] if "system" in row else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": "4"}]
    assert ex.ids == tok.encode(CHATML.render(msgs), add_bos=False)
    assert trained_runs(tok, ex) == ["4<|im_end|>\n"]
    assert f"<|im_start|>user\n{user}<|im_end|>" in untrained_text(tok, ex)


def test_sharegpt_roles_map_to_chat_roles():
    tok = gpt2()
    conversations = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hello"},
                     {"from": "gpt", "value": "Hi there!"}, {"from": "user", "value": "What is 2+2?"},
                     {"from": "chatgpt", "value": "4."}]
    shared = to_example({"conversations": conversations}, "sharegpt", W, tok, CHATML)
    assert shared == to_example({"messages": CHAT}, "chat", W, tok, CHATML)
    assert trained_runs(tok, shared) == ["Hi there!<|im_end|>\n", "4.<|im_end|>\n"]


def test_completion_trains_on_completion_and_eos():
    tok = gpt2()
    ex = to_example({"prompt": "The capital of France is", "completion": " Paris."}, "completion", W, tok, CHATML)
    assert ex.ids == tok.encode("The capital of France is Paris.") + [tok.eos_id]
    assert trained_runs(tok, ex) == [" Paris.<|endoftext|>"]
    assert untrained_text(tok, ex) == "The capital of France is"
    ex = to_example({"prompt": "The capital of France is", "completion": " Paris."}, "completion", W, llama3(), CHATML)
    assert ex.ids[0] == 128000 and not ex.mask[0]  # add_bos tokenizer: BOS first
    assert trained_runs(llama3(), ex) == [" Paris.<|eot_id|>"]


# ------------------------------------------------------------------ loading, dropping, truncating
def test_load_examples_drops_or_truncates(tmp_path):
    tok = gpt2()
    short = {"instruction": "Hi", "output": "Hello!"}
    long_answer = {"instruction": "Count", "output": " ".join(["one"] * 40)}
    long_question = {"instruction": " ".join(["why"] * 40), "output": "Because."}
    path = write_jsonl(tmp_path / "file.jsonl", [short, long_answer, short, long_question])
    lengths = [len(to_example(r, "alpaca", W, tok, CHATML).ids) for r in (short, long_answer, long_question)]
    context = 45
    assert lengths[0] <= context + 1 < min(lengths[1:])

    kept, report = load_examples([path], tok, CHATML, context=context)
    assert [e.where for e in kept] == [f"{path}:1", f"{path}:3"]
    trained = sum(to_example(short, "alpaca", W, tok, CHATML).mask[1:])
    assert report == {"rows": 4, "tokens": 2 * lengths[0], "trained_tokens": 2 * trained, "dropped": 2,
                      "truncated": 0, "formats": {str(path): "alpaca"}}

    kept, report = load_examples([path], tok, CHATML, context=context, truncate=True)
    # The long answer is cut and kept; the long question leaves no answer token before the cut: dropped.
    assert [e.where for e in kept] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    cut = kept[1]
    assert len(cut.ids) == context + 1
    assert cut.ids == to_example(long_answer, "alpaca", W, tok, CHATML).ids[:context + 1]
    assert (report["dropped"], report["truncated"], report["tokens"]) == (1, 1, 2 * lengths[0] + context + 1)
    assert report["trained_tokens"] == 2 * trained + sum(cut.mask[1:])

    with pytest.raises(InvalidArgument, match=r"all 2 rows were dropped.*context\+1 = 11 tokens \(context 10\)"):
        load_examples([write_jsonl(tmp_path / "long.jsonl", [long_answer, long_question])], tok, CHATML, context=10)


def test_load_examples_one_format_per_file(tmp_path):
    tok = gpt2()
    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": CHAT}, "", {"messages": CHAT[:3]}])  # a blank line 2
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "x", "completion": " y"}])
    kept, report = load_examples([a, b], tok, CHATML, context=512)
    assert report["formats"] == {str(a): "chat", str(b): "completion"}
    assert [e.where for e in kept] == [f"{a}:1", f"{a}:3", f"{b}:1"]
    mixed = write_jsonl(tmp_path / "file.jsonl",
                        [{"messages": CHAT}, {"messages": CHAT}, {"prompt": "x", "completion": "y"}])
    with pytest.raises(InvalidArgument, match=r"file.jsonl:3: a completion row in a chat file"):
        load_examples([mixed], tok, CHATML, context=512)


# ------------------------------------------------------------------ splitting, packing, batching
def examples_of_lengths(lengths: list[int]) -> list[Example]:
    """Distinct ids per example; mask: every other token from the second one."""
    out, start = [], 1
    for k, n in enumerate(lengths):
        out.append(Example(list(range(start, start + n)), [i % 2 == 1 for i in range(n)], f"file.jsonl:{k + 1}"))
        start += n
    return out


def test_split_held_out_is_seeded():
    examples = examples_of_lengths([3] * 20)
    train, held = split_held_out(examples, 0.25, seed=1)
    assert (len(train), len(held)) == (15, 5)
    assert split_held_out(examples, 0.25, seed=1) == (train, held)
    assert split_held_out(examples, 0.25, seed=2)[1] != held
    assert sorted(e.where for e in train + held) == sorted(e.where for e in examples)
    assert [e.where for e in held] == sorted((e.where for e in held), key=lambda w: int(w.split(":")[1]))
    assert [len(p) for p in split_held_out(examples[:2], 0.01, seed=0)] == [1, 1]
    assert split_held_out(examples, 0.0, seed=0) == (examples, [])
    assert split_held_out(examples[:1], 0.5, seed=0) == (examples[:1], [])
    with pytest.raises(InvalidArgument):
        split_held_out(examples, 1.0, seed=0)


def test_first_fit_matches_the_plain_algorithm():
    import random

    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 20) for _ in range(rng.randint(0, 60))]
        bins: list[int] = []
        expected = []
        for n in lengths:
            b = next((i for i, used in enumerate(bins) if used + n <= 20), len(bins))
            bins += [0] if b == len(bins) else []
            bins[b] += n
            expected.append(b)
        assert _first_fit(lengths, 20) == expected


def pairs(ids_row: torch.Tensor, targets_row: torch.Tensor) -> list[tuple[int, int]]:
    return [(int(i), int(t)) for i, t in zip(ids_row, targets_row)]


def test_pack_keeps_each_examples_pairs_and_never_crosses_a_boundary():
    context = 15
    examples = examples_of_lengths([10, 6, 5, 9, 3, 16, 2, 7])
    packed = pack(examples, context)
    # First fit into rows of 16: [10, 6], [5, 9, 2], [3, 7], [16].
    assert [p.segments for p in packed] == [[0] * 10 + [1] * 6, [0] * 5 + [1] * 9 + [2] * 2, [0] * 3 + [1] * 7, [0] * 16]
    assert all(len(p.ids) <= context + 1 for p in packed)
    assert sorted(t for p in packed for t in p.ids) == sorted(t for e in examples for t in e.ids)
    got = batch(packed, length=context)
    assert isinstance(got, SFTBatch) and got.inputs.shape == got.targets.shape == got.segments.shape == (len(packed), 15)
    assert got.inputs.dtype == got.targets.dtype == got.segments.dtype == torch.int64
    # Each example's scored (input, target) pairs, alone, are found in its packed row, and no other.
    alone = {e.where: [(i, t) for i, t in pairs(*(x[0] for x in batch([e])[:2])) if t != IGNORE_INDEX] for e in examples}
    from_packed = []
    for r, p in enumerate(packed):
        for i, (inp, tgt) in enumerate(pairs(got.inputs[r], got.targets[r])):
            if tgt != IGNORE_INDEX:
                assert got.segments[r, i] == p.segments[i] == p.segments[i + 1]  # never across a boundary
                from_packed.append((inp, tgt))
    assert sorted(from_packed) == sorted(pair for v in alone.values() for pair in v)
    # Boundaries: the last token of a segment predicts nothing.
    row = packed[0]
    assert got.targets[0, 9] == IGNORE_INDEX and got.inputs[0, 9] == row.ids[9] and got.inputs[0, 10] == row.ids[10]
    with pytest.raises(InvalidArgument, match="file.jsonl:1: 17 tokens"):
        pack(examples_of_lengths([17]), context)


def test_batch_pads_on_the_right():
    tok = gpt2()
    a = to_example({"prompt": "Hello", "completion": " world"}, "completion", W, tok, CHATML)
    b = to_example({"prompt": "Hi", "completion": " you there"}, "completion", W, tok, CHATML)
    assert (len(a.ids), len(b.ids)) == (3, 4)  # Hello| world|EOS, Hi| you| there|EOS
    got = batch([a, b])
    e = tok.eos_id
    assert got.inputs.tolist() == [a.ids[:2] + [0], b.ids[:3]]
    assert got.targets.tolist() == [[a.ids[1], e, IGNORE_INDEX], [b.ids[1], b.ids[2], e]]
    assert got.segments.tolist() == [[0, 0, -1], [0, 0, 0]]
    assert batch([a], length=5).targets.tolist() == [[a.ids[1], e] + [IGNORE_INDEX] * 3]
    with pytest.raises(InvalidArgument, match="does not fit length 2"):
        batch([a, b], length=2)
    assert isinstance(pack([a, b], 10)[0], Packed)


# ------------------------------------------------------------------ bad input
USER = {"role": "user", "content": "Hi"}
GOOD_CHAT = {"messages": [USER, {"role": "assistant", "content": "Hello"}]}


@pytest.mark.parametrize("lines, line, message", [
    (['{"instruction": "x", "output": "y"}', '{"instruction": '], 2, "not valid JSON"),
    (["[1, 2]"], 1, "expected a JSON object, got list"),
    ([{"question": "q", "answer": "a"}], 1, "unknown row format"),
    ([{"instruction": "x", "output": "y"}, {"instruction": "x"}], 2, "alpaca row is missing 'output'"),
    ([{"instruction": 5, "output": "y"}], 1, "'instruction' must be a string, got int"),
    ([{"instruction": "x", "input": ["a"], "output": "y"}], 1, "'input' must be a string, got list"),
    ([GOOD_CHAT, {"messages": "hi"}], 2, "'messages' must be a non-empty list"),
    ([GOOD_CHAT, {"messages": [USER, {"role": "assistant", "content": 3}]}], 2, "messages[1].content must be a string"),
    ([GOOD_CHAT, {"messages": [USER, {"role": "assistant"}]}], 2, "messages[1] must be an object with 'role' and 'content'"),
    ([GOOD_CHAT, {"messages": [USER, {"role": "assistant", "content": " \n"}]}], 2, "assistant turn 1 (message 1) is empty"),
    ([{"instruction": "x", "output": ""}], 1, "assistant turn 1 (message 1) is empty"),
    ([GOOD_CHAT, {"messages": [USER]}], 2, "no assistant turn"),
    ([GOOD_CHAT, "", {"messages": [{"role": "bot", "content": "x"}]}], 3, "unknown role 'bot'"),
    ([{"conversations": [{"from": "human", "value": "x"}, {"from": "model", "value": "y"}]}], 1, "unknown role 'model'"),
    ([{"messages": [{"role": "assistant", "content": "x"}]}], 1, "starts with an assistant turn"),
    ([{"prompt": "x", "completion": " "}], 1, "the completion is empty"),
    ([{"prompt": None, "completion": "y"}], 1, "'prompt' must be a string, got NoneType"),
    ([GOOD_CHAT, {"prompt": "x", "completion": "y"}], 2, "a completion row in a chat file"),
])
def test_bad_rows_name_file_and_line(tmp_path, lines, line, message):
    path = write_jsonl(tmp_path / "file.jsonl", lines)
    with pytest.raises(InvalidArgument) as e:
        load_examples([path], gpt2(), CHATML, context=64)
    text = str(e.value)
    assert f"file.jsonl:{line}: " in text and message in text and "\n" not in text, text


def test_bad_files(tmp_path):
    with pytest.raises(InvalidArgument, match="data file not found: .*nothing.jsonl"):
        read_jsonl(tmp_path / "nothing.jsonl")
    (tmp_path / "file.jsonl").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(InvalidArgument, match="file.jsonl is empty"):
        load_examples([tmp_path / "file.jsonl"], gpt2(), CHATML, context=64)
    with pytest.raises(InvalidArgument, match="context must be a positive integer"):
        load_examples([tmp_path / "file.jsonl"], gpt2(), CHATML, context=0)


def test_a_template_that_does_not_render_incrementally_is_refused(tmp_path):
    counting = ChatTemplate("{{ messages | length }} messages\n{% for m in messages %}{{ m.role }}: {{ m.content }}\n"
                            "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}", name="counting")
    path = write_jsonl(tmp_path / "file.jsonl", [GOOD_CHAT])
    with pytest.raises(InvalidArgument, match=r"file.jsonl:1: chat template counting does not render "
                                              r"conversations incrementally"):
        load_examples([path], gpt2(), counting, context=64)
    # A template refusing the conversation (Mistral has no system role): its message, with the line.
    sys_row = {"messages": [{"role": "system", "content": "s"}, *GOOD_CHAT["messages"]]}
    with pytest.raises(InvalidArgument, match=r"file.jsonl:1: chat template mistral refused the conversation"):
        load_examples([write_jsonl(path, [sys_row])], gpt2(), ChatTemplate.builtin("mistral"), context=64)


def test_template_sees_the_tokenizers_special_tokens():
    # Llama 2's template writes bos_token / eos_token: the tokenizer's own, not the template's defaults.
    tok = gpt2()
    ex = to_example(GOOD_CHAT, "chat", W, tok, ChatTemplate.builtin("llama2"))
    assert template_variables(tok)["eos_token"] == "<|endoftext|>"
    assert trained_runs(tok, ex) == [" Hello <|endoftext|>"]
    assert untrained_text(tok, ex) == "<|endoftext|>[INST] Hi [/INST]"
