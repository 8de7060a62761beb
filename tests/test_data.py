"""Corpus -> token shards (`emergence.data.shards`), the tokenizer's fingerprint and BPE training
from memory, and the `prepare` / `train-tokenizer` verbs of the command line.

Exact token counts come from a word-level tokenizer ("w0".."w63", EOS "<|endoftext|>"), so the
validation split can be worked out by hand; a small byte-level BPE covers real text.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import SHARED_DATA
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from emergence.cli import main
from emergence.data.shards import TokenShards, decode_text, expand_inputs, prepare_corpus, read_documents
from emergence.errors import CheckpointError, InvalidArgument
from emergence.tokenizer import GPT2_EOT, Tokenizer

EOT = GPT2_EOT


# ------------------------------------------------------------------------------ helpers
def word_tokenizer(n: int = 64) -> Tokenizer:
    """EOS "<|endoftext|>" is id 0; "w1".."w{n-1}" are ids 1..n-1, whitespace separated."""
    vocab = {EOT: 0, **{f"w{i}": i for i in range(1, n)}}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="w1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, eos_token=EOT)


def words(*ids: int) -> str:
    return " ".join(f"w{i}" for i in ids)


def stream(tokenizer: Tokenizer, docs: list[str]) -> list[int]:
    """The ids prepare should write: each document's ids followed by EOS."""
    out = []
    for d in docs:
        out += tokenizer.encode(d) + [tokenizer.eos_id]
    return out


def read_split(folder, split: str) -> list[int]:
    arrays = TokenShards(folder).split(split)
    return np.concatenate(arrays).tolist() if arrays else []


def prepare(inputs, tokenizer, out, **kw) -> dict:
    return prepare_corpus([str(i) for i in inputs], tokenizer, out, show_progress=False, **kw)


@pytest.fixture(scope="module")
def words_tok() -> Tokenizer:
    return word_tokenizer()


@pytest.fixture(scope="module")
def shakespeare() -> str:
    return (SHARED_DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:20_000]


@pytest.fixture(scope="module")
def bpe(shakespeare) -> Tokenizer:
    return Tokenizer.train_bpe_from_texts(shakespeare.split("\n\n"), 320)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("emergence: error:"), err
    for f in fragments:
        assert f in lines[0], err


# --------------------------------------------------------------------------- decode_text
def test_decode_text_counts_each_invalid_sequence():
    data = b"ab\xffcd\xfe\xfe"
    # Python's decoder reports three errors here: \xff, then each \xfe on its own.
    assert data.decode("utf-8", "replace") == "ab\ufffdcd\ufffd\ufffd"
    assert decode_text(data) == ("ab\ufffdcd\ufffd\ufffd", 3)
    assert decode_text(data, "replace") == ("ab\ufffdcd\ufffd\ufffd", 3)
    assert decode_text(data, "skip") == ("abcd", 3)
    # A truncated 3-byte sequence is one error (its maximal valid prefix), not two.
    assert decode_text(b"x\xe2\x82") == ("x\ufffd", 1)
    assert decode_text(b"x\xe2\x82", "skip") == ("x", 1)


def test_decode_text_valid_and_bad_mode():
    assert decode_text("héllo ✓".encode()) == ("héllo ✓", 0)
    assert decode_text(b"") == ("", 0)
    with pytest.raises(InvalidArgument, match="'replace' or 'skip'"):
        decode_text(b"abc", "ignore")
    # The count does not leak from one call into the next.
    assert decode_text(b"\xff") == ("\ufffd", 1)
    assert decode_text(b"\xff\xff", "skip") == ("", 2)


# ------------------------------------------------------------------------ read_documents
def test_txt_documents_split_on_eos_and_stripped(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text(f"  first doc\n{EOT}\nsecond one{EOT}   \n {EOT}third", encoding="utf-8")
    assert read_documents(p, EOT) == (["first doc", "second one", "third"], 0)
    # Without the EOS string in the text (or without an EOS) the file is one document.
    q = tmp_path / "b.txt"
    q.write_text("\n one long\n\ndocument \n", encoding="utf-8")
    assert read_documents(q, EOT) == (["one long\n\ndocument"], 0)
    assert read_documents(p, None) == ([p.read_text().strip()], 0)


def test_txt_invalid_utf8_is_counted(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"ab\xffcd\xfe\xfe")
    assert read_documents(p, EOT) == (["ab\ufffdcd\ufffd\ufffd"], 3)
    assert read_documents(p, EOT, "skip") == (["abcd"], 3)


def test_jsonl_documents(tmp_path):
    p = tmp_path / "a.jsonl"
    rows = [{"text": "  one  ", "id": 1}, {"text": "two\nlines"}, {"text": "   "}, {"text": "para\u2028sep \x85 nel"}]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    # \r\n endings and blank lines are fine; U+2028 / U+0085 inside a string do not end a line.
    p.write_text(lines[0] + "\r\n\n" + "\r\n".join(lines[1:]) + "\n", encoding="utf-8")
    assert read_documents(p, EOT) == (["one", "two\nlines", "para\u2028sep \x85 nel"], 0)


@pytest.mark.parametrize("line, why", [
    ("not json", "not JSON"),
    ('{"text": "unterminated', "not JSON"),
    ('["a list"]', 'expected an object with a "text" string'),
    ('{"body": "no text field"}', 'expected an object with a "text" string'),
    ('{"text": 42}', 'expected an object with a "text" string'),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, why):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "fine"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(InvalidArgument) as e:
        read_documents(p, EOT)
    assert str(e.value).startswith(f"{p}:3: {why}")


def test_read_documents_missing_file(tmp_path):
    with pytest.raises(InvalidArgument, match="cannot read .*nope.txt"):
        read_documents(tmp_path / "nope.txt", EOT)


# ------------------------------------------------------------------------- expand_inputs
def test_expand_inputs_files_folders_globs(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for name in ("b.txt", "a.jsonl", "notes.md", "sub/c.txt", "sub/deeper/d.jsonl", "sub/e.csv"):
        (tmp_path / name).write_text("x")
    # A folder gives its .txt / .jsonl files, recursively and sorted.
    assert expand_inputs([str(tmp_path)]) == [tmp_path / p for p in ("a.jsonl", "b.txt", "sub/c.txt",
                                                                     "sub/deeper/d.jsonl")]
    # A named file is taken whatever its suffix; globs expand; repeats are dropped, order kept.
    assert expand_inputs([str(tmp_path / "notes.md"), str(tmp_path / "*.txt"), str(tmp_path / "b.txt")]) == [
        tmp_path / "notes.md", tmp_path / "b.txt"]
    assert expand_inputs([str(tmp_path / "**" / "*.jsonl")]) == [tmp_path / "a.jsonl", tmp_path / "sub/deeper/d.jsonl"]


def test_expand_inputs_errors(tmp_path):
    with pytest.raises(InvalidArgument, match="no such file: .*missing.txt"):
        expand_inputs([str(tmp_path / "missing.txt")])
    with pytest.raises(InvalidArgument, match=r"no files matched '.*\*\.txt'"):
        expand_inputs([str(tmp_path / "*.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArgument, match="no text files found in .*empty"):
        expand_inputs([str(tmp_path / "empty")])
    with pytest.raises(InvalidArgument, match="no text files found in nothing"):
        expand_inputs([])


# ------------------------------------------------------------------------ prepare_corpus
def test_shards_decode_to_the_documents_with_eos(tmp_path, bpe, shakespeare):
    docs_a = [d.strip() for d in shakespeare[:3000].split("\n\n") if d.strip()]
    docs_b = ["Hello there, friend.", "Ünïcödé and emoji 🙂 survive byte-level BPE."]
    (tmp_path / "a.txt").write_text(f"\n{EOT}\n".join(docs_a), encoding="utf-8")
    (tmp_path / "b.txt").write_text(f"{EOT}".join(docs_b) + EOT, encoding="utf-8")
    out = tmp_path / "shards"
    m = prepare([tmp_path / "a.txt", tmp_path / "b.txt"], bpe, out, val_fraction=0.0)

    expected = stream(bpe, docs_a + docs_b)
    assert read_split(out, "train") == expected
    assert read_split(out, "val") == []
    assert m["dtype"] == "uint16" and TokenShards(out).dtype == np.uint16
    assert m["splits"]["train"] == {"tokens": len(expected), "shards": [{"file": "train-00000.bin",
                                                                         "tokens": len(expected)}]}
    assert m["splits"]["val"] == {"tokens": 0, "shards": []}
    assert (out / "train-00000.bin").stat().st_size == 2 * len(expected)
    assert not list(out.glob("val-*.bin"))
    assert m["tokenizer"] == {"hash": bpe.fingerprint(), "vocab_size": bpe.vocab_size, "eos_id": bpe.eos_id}
    assert [(s["documents"], s["tokens"], s["invalid_utf8"], s["val_documents"]) for s in m["sources"]] == [
        (len(docs_a), len(stream(bpe, docs_a)), 0, 0), (2, len(stream(bpe, docs_b)), 0, 0)]
    a = m["sources"][0]
    assert a["bytes"] == (tmp_path / "a.txt").stat().st_size
    assert a["sha256"] == hashlib.sha256((tmp_path / "a.txt").read_bytes()).hexdigest()
    # The manifest on disk is the one returned; the saved tokenizer is the same tokenizer.
    assert json.loads((out / "manifest.json").read_text()) == m
    shards = TokenShards(out)
    assert shards.tokenizer().fingerprint() == shards.tokenizer_hash == bpe.fingerprint()
    assert shards.vocab_size == bpe.vocab_size and shards.tokens("train") == len(expected)


def test_manifest_counts_equal_shard_lengths_and_sizes(tmp_path, words_tok):
    docs = [words(*range(1, 1 + n)) for n in (5, 9, 2, 7, 11, 3)]
    (tmp_path / "a.txt").write_text(EOT.join(docs), encoding="utf-8")
    out = tmp_path / "o"
    m = prepare([tmp_path / "a.txt"], words_tok, out, val_fraction=0.3, shard_tokens=8)
    total = sum(len(d.split()) + 1 for d in docs)
    assert m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"] == total == m["sources"][0]["tokens"]
    for split in ("train", "val"):
        shards = m["splits"][split]["shards"]
        assert sum(s["tokens"] for s in shards) == m["splits"][split]["tokens"]
        for s in shards:
            assert (out / s["file"]).stat().st_size == 2 * s["tokens"]
        assert sum(len(a) for a in TokenShards(out).split(split)) == m["splits"][split]["tokens"]


def test_validation_takes_whole_documents_from_the_end_of_each_file(tmp_path, words_tok):
    # File A: documents of 4, 6, 3, 5 tokens (with EOS): 18; want round(18 * .25) = 4 -> the last doc (5).
    a = [words(1, 2, 3), words(4, 5, 6, 7, 8), words(9, 10), words(11, 12, 13, 14)]
    # File B: 10, 2, 2 tokens: 14; want round(3.5) = 4 -> the last two docs (2 + 2).
    b = [words(*range(20, 29)), words(30), words(31)]
    (tmp_path / "a.txt").write_text(EOT.join(a), encoding="utf-8")
    (tmp_path / "b.txt").write_text(EOT.join(b), encoding="utf-8")
    out = tmp_path / "o"
    m = prepare([tmp_path / "a.txt", tmp_path / "b.txt"], words_tok, out, val_fraction=0.25)
    assert read_split(out, "train") == stream(words_tok, a[:3] + b[:1])
    assert read_split(out, "val") == stream(words_tok, a[3:] + b[1:])
    assert read_split(out, "val") == [11, 12, 13, 14, 0, 30, 0, 31, 0]
    assert [s["val_documents"] for s in m["sources"]] == [1, 2]
    assert m["splits"]["train"]["tokens"] == 13 + 10 and m["splits"]["val"]["tokens"] == 5 + 4


def test_validation_keeps_at_least_one_training_document(tmp_path, words_tok):
    docs = [words(1), words(2), words(3)]  # 2 tokens each; want round(6 * .9) = 5 > 4 available
    (tmp_path / "a.txt").write_text(EOT.join(docs), encoding="utf-8")
    m = prepare([tmp_path / "a.txt"], words_tok, tmp_path / "o", val_fraction=0.9)
    assert read_split(tmp_path / "o", "train") == [1, 0]
    assert read_split(tmp_path / "o", "val") == [2, 0, 3, 0]
    assert m["sources"][0]["val_documents"] == 2


def test_single_document_is_cut_at_the_right_token(tmp_path, words_tok):
    ids = list(range(1, 20))  # 19 words + EOS = 20 tokens; want round(20 * .25) = 5
    (tmp_path / "one.txt").write_text(words(*ids), encoding="utf-8")
    m = prepare([tmp_path / "one.txt"], words_tok, tmp_path / "o", val_fraction=0.25)
    assert read_split(tmp_path / "o", "train") == ids[:15]
    assert read_split(tmp_path / "o", "val") == ids[15:] + [0]
    assert m["sources"][0]["val_documents"] == 1
    assert (m["splits"]["train"]["tokens"], m["splits"]["val"]["tokens"]) == (15, 5)


def test_single_short_document_keeps_a_training_token(tmp_path, words_tok):
    # 2 tokens, val_fraction .75: round(1.5) = 2 would leave nothing to train on.
    (tmp_path / "one.txt").write_text(words(7), encoding="utf-8")
    prepare([tmp_path / "one.txt"], words_tok, tmp_path / "o", val_fraction=0.75)
    assert read_split(tmp_path / "o", "train") == [7]
    assert read_split(tmp_path / "o", "val") == [0]


def test_small_val_fraction_rounds_to_no_validation(tmp_path, words_tok):
    (tmp_path / "a.txt").write_text(EOT.join([words(1, 2), words(3)]), encoding="utf-8")
    m = prepare([tmp_path / "a.txt"], words_tok, tmp_path / "o", val_fraction=0.05)  # round(5 * .05) = 0
    assert read_split(tmp_path / "o", "train") == [1, 2, 0, 3, 0]
    assert m["splits"]["val"] == {"tokens": 0, "shards": []} and m["sources"][0]["val_documents"] == 0


def test_jsonl_input(tmp_path, bpe):
    texts = ["The first story.", "  A second one,\nover two lines.  ", "Third: done!"]
    rows = [json.dumps({"text": t, "meta": i}) for i, t in enumerate(texts)]
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    prepare([tmp_path / "d.jsonl"], bpe, tmp_path / "o", val_fraction=0.0)
    assert read_split(tmp_path / "o", "train") == stream(bpe, [t.strip() for t in texts])


def test_shard_tokens_splits_one_stream_into_files(tmp_path, words_tok):
    docs = [words(*range(1 + i, 6 + i)) for i in range(8)]  # 8 docs x 6 tokens = 48
    (tmp_path / "a.txt").write_text(EOT.join(docs), encoding="utf-8")
    whole = prepare([tmp_path / "a.txt"], words_tok, tmp_path / "whole", val_fraction=0.0)
    m = prepare([tmp_path / "a.txt"], words_tok, tmp_path / "split", val_fraction=0.0, shard_tokens=10)
    assert whole["splits"]["train"]["shards"] == [{"file": "train-00000.bin", "tokens": 48}]
    assert m["splits"]["train"]["shards"] == [{"file": f"train-{i:05d}.bin", "tokens": n}
                                              for i, n in enumerate([10, 10, 10, 10, 8])]
    arrays = TokenShards(tmp_path / "split").split("train")
    assert [len(a) for a in arrays] == [10, 10, 10, 10, 8]
    assert np.concatenate(arrays).tolist() == read_split(tmp_path / "whole", "train") == stream(words_tok, docs)
    assert sorted(p.name for p in (tmp_path / "split").glob("*.bin")) == [f"train-0000{i}.bin" for i in range(5)]


def test_uint32_when_the_vocabulary_needs_more_than_16_bits(tmp_path):
    vocab = {EOT: 0, **{f"w{i}": i for i in range(1, 65_600)}}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="w1"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big = Tokenizer(backend, eos_token=EOT)
    assert big.vocab_size == 65_600
    (tmp_path / "a.txt").write_text(f"w65599 w65536 w5{EOT}w65535", encoding="utf-8")
    m = prepare([tmp_path / "a.txt"], big, tmp_path / "o", val_fraction=0.0)
    assert m["dtype"] == "uint32"
    arrays = TokenShards(tmp_path / "o").split("train")
    assert arrays[0].dtype == np.uint32
    assert arrays[0].tolist() == [65599, 65536, 5, 0, 65535, 0]  # no id wrapped around 2**16
    assert (tmp_path / "o" / "train-00000.bin").stat().st_size == 4 * 6


@pytest.mark.parametrize("vocab_size, dtype", [(65_535, "uint16"), (65_536, "uint16"), (65_537, "uint32")])
def test_dtype_rule(tmp_path, words_tok, monkeypatch, vocab_size, dtype):
    monkeypatch.setattr(words_tok, "vocab_size", vocab_size)
    (tmp_path / "a.txt").write_text(words(3, 4), encoding="utf-8")
    m = prepare([tmp_path / "a.txt"], words_tok, tmp_path / "o", val_fraction=0.0)
    assert m["dtype"] == dtype
    assert read_split(tmp_path / "o", "train") == [3, 4, 0]
    assert (tmp_path / "o" / "train-00000.bin").stat().st_size == 3 * np.dtype(dtype).itemsize


def test_invalid_utf8_replaced_or_skipped(tmp_path, bpe, capsys):
    (tmp_path / "bad.txt").write_bytes(b"ab\xffcd\xfe\xfe")
    for mode, text, said in (("replace", "ab\ufffdcd\ufffd\ufffd", "replaced by U+FFFD"), ("skip", "abcd", "skipped")):
        capsys.readouterr()
        m = prepare([tmp_path / "bad.txt"], bpe, tmp_path / mode, val_fraction=0.0, invalid_utf8=mode)
        assert read_split(tmp_path / mode, "train") == bpe.encode(text) + [bpe.eos_id]
        assert m["sources"][0]["invalid_utf8"] == 3
        assert f"bad.txt: 3 invalid UTF-8 sequence(s) {said}" in capsys.readouterr().out
    with pytest.raises(InvalidArgument, match="'replace' or 'skip'"):
        prepare([tmp_path / "bad.txt"], bpe, tmp_path / "x", invalid_utf8="drop")
    assert not list((tmp_path / "x").glob("*.bin"))


# ------------------------------------------------------------------- prepare: bad input
def test_empty_corpus_is_refused_and_leaves_no_shards(tmp_path, words_tok):
    (tmp_path / "a.txt").write_text("  \n\t\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text(f"\n{EOT}\n  {EOT}", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text('{"text": "   "}\n\n', encoding="utf-8")
    out = tmp_path / "o"
    with pytest.raises(InvalidArgument, match=r"the corpus is empty: 3 file\(s\) hold no text"):
        prepare([tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.jsonl"], words_tok, out)
    assert not list(out.glob("*.bin")) and not (out / "manifest.json").exists()
    # Nothing blocks a second attempt in the same folder.
    (tmp_path / "a.txt").write_text(words(1), encoding="utf-8")
    prepare([tmp_path / "a.txt"], words_tok, out)
    assert read_split(out, "train") + read_split(out, "val") == [1, 0]


def test_a_failed_prepare_leaves_no_partial_shards(tmp_path, words_tok):
    (tmp_path / "a.txt").write_text(words(1, 2, 3), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "w4"}\n{oops\n', encoding="utf-8")
    out = tmp_path / "o"
    with pytest.raises(InvalidArgument, match=r"b\.jsonl:2: not JSON"):
        prepare([tmp_path / "a.txt", tmp_path / "b.jsonl"], words_tok, out, val_fraction=0.0)
    assert not list(out.glob("*.bin")) and not (out / "manifest.json").exists()
    (tmp_path / "b.jsonl").write_text('{"text": "w4"}\n', encoding="utf-8")
    prepare([tmp_path / "a.txt", tmp_path / "b.jsonl"], words_tok, out, val_fraction=0.0)
    assert read_split(out, "train") == [1, 2, 3, 0, 4, 0]


def test_a_folder_with_shards_is_refused(tmp_path, words_tok):
    (tmp_path / "a.txt").write_text(words(1, 2), encoding="utf-8")
    out = tmp_path / "o"
    prepare([tmp_path / "a.txt"], words_tok, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(InvalidArgument, match="already holds token shards; choose an empty folder"):
        prepare([tmp_path / "a.txt"], words_tok, out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "train-00000.bin").write_bytes(b"\0\0")  # shards without a manifest count too
    with pytest.raises(InvalidArgument, match="already holds token shards"):
        prepare([tmp_path / "a.txt"], words_tok, stray)


def test_prepare_argument_errors(tmp_path, words_tok):
    (tmp_path / "a.txt").write_text(words(1), encoding="utf-8")
    a = [tmp_path / "a.txt"]
    with pytest.raises(InvalidArgument, match="no such file: .*missing.txt"):
        prepare([tmp_path / "missing.txt"], words_tok, tmp_path / "o")
    with pytest.raises(InvalidArgument, match="no files matched"):
        prepare([tmp_path / "*.jsonl"], words_tok, tmp_path / "o")
    for vf in (1.0, -0.1):
        with pytest.raises(InvalidArgument, match=r"val fraction must be in \[0, 1\)"):
            prepare(a, words_tok, tmp_path / "o", val_fraction=vf)
    with pytest.raises(InvalidArgument, match="shard size must be positive"):
        prepare(a, words_tok, tmp_path / "o", shard_tokens=0)
    no_eos = Tokenizer(HFTokenizer(models.WordLevel({"w1": 0}, unk_token="w1")))
    with pytest.raises(InvalidArgument, match="no EOS token"):
        prepare(a, no_eos, tmp_path / "o")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(InvalidArgument, match="cannot create the folder .*a_file"):
        prepare(a, words_tok, tmp_path / "a_file")
    assert not (tmp_path / "o").exists()  # argument errors create nothing


def test_token_shards_errors(tmp_path, words_tok):
    with pytest.raises(CheckpointError, match="holds no token shards"):
        TokenShards(tmp_path)
    (tmp_path / "a.txt").write_text(words(1, 2, 3), encoding="utf-8")
    out = tmp_path / "o"
    prepare([tmp_path / "a.txt"], words_tok, out, val_fraction=0.0)
    with open(out / "train-00000.bin", "r+b") as f:
        f.truncate(6)  # 3 of the 4 ids
    with pytest.raises(CheckpointError, match="missing or not 8 bytes"):
        TokenShards(out).split("train")
    (out / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not an emergence token-shard manifest"):
        TokenShards(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read"):
        TokenShards(out)


# ------------------------------------------------------------------- tokenizer training
def test_fingerprint_tracks_the_vocabulary(tmp_path, bpe, words_tok):
    assert bpe.fingerprint() == bpe.fingerprint()
    assert len(bpe.fingerprint()) == 16 and int(bpe.fingerprint(), 16) >= 0
    bpe.save(tmp_path / "bpe")
    assert Tokenizer.load(tmp_path / "bpe").fingerprint() == bpe.fingerprint()
    words_tok.save(tmp_path / "words")
    assert Tokenizer.load(tmp_path / "words").fingerprint() == words_tok.fingerprint()
    # Any change to the vocabulary changes it, even one token's id.
    assert word_tokenizer(64).fingerprint() == words_tok.fingerprint()
    assert word_tokenizer(65).fingerprint() != words_tok.fingerprint()
    vocab = {EOT: 0, **{f"w{i}": i for i in range(1, 64)}}
    vocab["w1"], vocab["w2"] = 2, 1
    swapped = HFTokenizer(models.WordLevel(vocab, unk_token="w1"))
    swapped.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    assert Tokenizer(swapped, eos_token=EOT).fingerprint() != words_tok.fingerprint()
    # ... and so does which token is EOS.
    other_eos = word_tokenizer(64)
    assert Tokenizer(other_eos.backend, eos_token="w1").fingerprint() != words_tok.fingerprint()
    assert bpe.fingerprint() != words_tok.fingerprint()


def test_train_bpe_from_texts(bpe, shakespeare):
    assert 257 < bpe.vocab_size <= 320
    assert bpe.eos_token == EOT and bpe.eos_id == 0 and bpe.id_to_piece(0) == EOT
    for text in (shakespeare[:500], "never seen: Ωμέγα 🙂 \x00\t"):
        assert bpe.decode(bpe.encode(text)) == text  # every byte is encodable
    # Merges learned from the text make it shorter than one token per byte.
    assert len(bpe.encode(shakespeare[:2000])) < 0.7 * len(shakespeare[:2000].encode())
    # Same texts, same tokenizer.
    again = Tokenizer.train_bpe_from_texts(shakespeare.split("\n\n"), 320)
    assert again.fingerprint() == bpe.fingerprint()


def test_train_bpe_from_texts_keeps_documents_apart():
    tok = Tokenizer.train_bpe_from_texts(["ab"] * 50 + ["cd"] * 50, 300)
    vocab = tok.backend.get_vocab()
    # 256 bytes + EOS + the only two merges there are ("ab", "cd"): none spans two texts ("bc").
    assert tok.vocab_size == 256 + 1 + 2
    assert "ab" in vocab and "cd" in vocab and "bc" not in vocab
    assert tok.encode("abcd") == [vocab["ab"], vocab["cd"]]


def test_train_bpe_from_texts_bad_vocab_size():
    with pytest.raises(InvalidArgument, match="vocab_size must be at least 257"):
        Tokenizer.train_bpe_from_texts(["abc"], 256)
    with pytest.raises(InvalidArgument, match="at least 258"):
        Tokenizer.train_bpe_from_texts(["abc"], 257, special_tokens=[EOT, "<pad>"])
    tok = Tokenizer.train_bpe_from_texts(["abc"], 258, special_tokens=[EOT, "<pad>"])
    assert tok.eos_id == 0 and tok.backend.token_to_id("<pad>") == 1


# ---------------------------------------------------------------------------------- CLI
def test_cli_prepare(tmp_path, capsys, bpe):
    docs = ["One document.", "Another, longer document with more words in it.", "A third."]
    (tmp_path / "a.txt").write_text(EOT.join(docs), encoding="utf-8")
    bpe.save(tmp_path / "tok")
    out = tmp_path / "shards"
    code, stdout, err = run_main(capsys, "prepare", str(tmp_path / "*.txt"), "--tokenizer", str(tmp_path / "tok"),
                                 "--out", str(out), "--val-fraction", "0", "--shard-tokens", "7")
    assert code == 0, err
    expected = stream(bpe, docs)
    assert stdout == (f"wrote {out}: {len(expected):,} train + 0 val tokens (uint16) from 1 file(s), 3 documents; "
                      f"tokenizer {bpe.fingerprint()}\n")
    assert read_split(out, "train") == expected
    sizes = [s["tokens"] for s in TokenShards(out).manifest["splits"]["train"]["shards"]]
    assert sizes == [7] * (len(expected) // 7) + ([len(expected) % 7] if len(expected) % 7 else [])
    # Preparing into the same folder again is refused, on one line.
    code, stdout, err = run_main(capsys, "prepare", str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "tok"),
                                 "--out", str(out))
    assert code == 1 and stdout == ""
    assert_one_error_line(err, "already holds token shards")


def test_cli_prepare_bad_input(tmp_path, capsys, words_tok):
    words_tok.save(tmp_path / "tok")
    tok = ["--tokenizer", str(tmp_path / "tok")]
    (tmp_path / "blank.txt").write_text(" \n \n", encoding="utf-8")
    (tmp_path / "good.txt").write_text(words(1, 2), encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text('{"text": "w1"}\n{"text": }\n', encoding="utf-8")
    cases = [
        ([str(tmp_path / "missing.txt")], "no such file"),
        ([str(tmp_path / "*.nothing")], "no files matched"),
        ([str(tmp_path / "blank.txt")], "the corpus is empty: 1 file(s) hold no text"),
        ([str(tmp_path / "good.txt"), str(tmp_path / "bad.jsonl")], "bad.jsonl:2: not JSON"),
        ([str(tmp_path / "good.txt"), "--val-fraction", "1"], "val fraction must be in [0, 1)"),
        ([str(tmp_path / "good.txt"), "--shard-tokens", "-5"], "shard size must be positive"),
    ]
    for i, (args, why) in enumerate(cases):
        out = tmp_path / f"o{i}"
        code, stdout, err = run_main(capsys, "prepare", *args, *tok, "--out", str(out))
        assert code == 1, (args, err)
        assert_one_error_line(err, why)
        assert not list(out.glob("*.bin"))
    code, _, err = run_main(capsys, "prepare", str(tmp_path / "good.txt"),
                            "--tokenizer", str(tmp_path / "no-tok"), "--out", str(tmp_path / "o"))
    assert code == 1
    assert_one_error_line(err, "no-tok")


def test_cli_usage_errors_are_one_line(tmp_path, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["prepare", "x.txt", "--tokenizer", "t", "--out", str(tmp_path), "--invalid-utf8", "drop"])
    assert e.value.code == 1
    assert_one_error_line(capsys.readouterr().err, "--invalid-utf8")
    with pytest.raises(SystemExit) as e:
        main(["train-tokenizer", "x.txt", "--out", str(tmp_path)])  # --vocab-size is required
    assert e.value.code == 1
    assert_one_error_line(capsys.readouterr().err, "--vocab-size")


def test_cli_train_tokenizer(tmp_path, capsys, shakespeare):
    stories = [p.strip() for p in shakespeare[:8000].split("\n\n") if p.strip()]
    (tmp_path / "a.txt").write_text(f"\n{EOT}\n".join(stories[:10]), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in stories[10:]),
                                      encoding="utf-8")
    (tmp_path / "c.txt").write_bytes(b"caf\xc3\xa9 \xff ok")
    out = tmp_path / "tok"
    code, stdout, err = run_main(capsys, "train-tokenizer", str(tmp_path), "--vocab-size", "300", "--out", str(out))
    assert code == 0, err
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 300 and tok.eos_token == EOT and tok.eos_id == 0
    assert f"{tmp_path / 'c.txt'}: 1 invalid UTF-8 sequence(s) replaced by U+FFFD\n" in stdout
    last = stdout.splitlines()[-1]
    assert last.startswith(f"trained a byte-level BPE of 300 tokens on {len(stories) + 1} documents")
    assert last.endswith(f"wrote {out} (tokenizer {tok.fingerprint()})")
    # The trained tokenizer prepares a corpus.
    code, _, err = run_main(capsys, "prepare", str(tmp_path / "a.txt"), "--tokenizer", str(out),
                            "--out", str(tmp_path / "shards"), "--val-fraction", "0")
    assert code == 0, err
    assert read_split(tmp_path / "shards", "train") == stream(tok, stories[:10])


def test_cli_train_tokenizer_bad_input(tmp_path, capsys):
    (tmp_path / "blank.txt").write_text(f"  {EOT}\n\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("some text", encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text("[1, 2]\n", encoding="utf-8")
    cases = [
        ([str(tmp_path / "blank.txt"), "--vocab-size", "300"], "the corpus is empty"),
        ([str(tmp_path / "a.txt"), "--vocab-size", "100"], "vocab_size must be at least 257"),
        ([str(tmp_path / "missing.txt"), "--vocab-size", "300"], "no such file"),
        ([str(tmp_path / "*.nothing"), "--vocab-size", "300"], "no files matched"),
        ([str(tmp_path / "bad.jsonl"), "--vocab-size", "300"], "bad.jsonl:1: expected an object"),
    ]
    for args, why in cases:
        code, stdout, err = run_main(capsys, "train-tokenizer", *args, "--out", str(tmp_path / "tok"))
        assert code == 1, (args, err)
        assert_one_error_line(err, why)
        assert not (tmp_path / "tok").exists()
