"""GGUF vocabularies -> Tokenizer, checked against llama.cpp's own tokenizer test vectors.

The vectors are llama.cpp's `models/ggml-vocab-*.gguf.inp/.out`, read as its
tests/test-tokenizer-0.cpp reads them: inputs separated by "\\n__ggml_vocab_test__\\n" and
kept verbatim (no stripping), one line of expected ids per input, tokenized with
add_special=false and parse_special=false.

Vectors without a vocabulary file are not run: ggml-vocab-qwen2 and ggml-vocab-command-r
(their .gguf files were not obtainable). ggml-vocab-llama-bpe is run on a vocabulary built
from the Llama 3 encoder.json / vocab.bpe in llama3_tokenizer/.

The `gguf` package is used here only as a reference reader, to turn the files' metadata
into the plain mapping `tokenizer_from_gguf_metadata` takes.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import SHARED_DATA

from emergence.errors import CheckpointError
from emergence.gguf.vocab import tokenizer_from_gguf_metadata

DATA = SHARED_DATA
VOCAB_DIR = DATA / "gguf_vocab"
LLAMA3_DIR = DATA / "llama3_tokenizer"

# Every vocabulary file that has test vectors.
VOCABS = ["bert-bge", "falcon", "gpt-2", "llama-spm", "mpt", "refact"]
N_VECTORS = 46



# -- reading the reference data ---------------------------------------------------------------


def gguf_metadata(path: Path) -> dict:
    """GGUF key -> plain value; numeric arrays as numpy arrays, string arrays as lists."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # header fields (version, counts), not metadata
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY and field.types[-1] != gguf.GGUFValueType.STRING:
            out[key] = np.concatenate([field.parts[i] for i in field.data]) if field.data else np.array([])
        else:
            out[key] = field.contents()
    return out


def read_vectors(path: Path) -> list[tuple[str, list[int]]]:
    """(input, expected ids) pairs, split exactly as test-tokenizer-0.cpp does."""
    raw = Path(str(path) + ".inp").read_bytes().decode("utf-8")
    sep = "\n__ggml_vocab_test__\n"
    inputs, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(sep, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(sep)
    lines = Path(str(path) + ".out").read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    assert len(inputs) == len(lines), path
    return [(text, [int(t) for t in line.split()]) for text, line in zip(inputs, lines)]


@lru_cache(maxsize=None)
def metadata_of(name: str) -> dict:
    if name == "llama-bpe":
        return llama3_metadata()
    return gguf_metadata(VOCAB_DIR / f"ggml-vocab-{name}.gguf")


@lru_cache(maxsize=None)
def tokenizer_of(name: str, parse_special: bool = True):
    return tokenizer_from_gguf_metadata(metadata_of(name), parse_special=parse_special)


@lru_cache(maxsize=None)
def vectors_of(name: str):
    return read_vectors(VOCAB_DIR / f"ggml-vocab-{name}.gguf")


LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]


def llama3_metadata() -> dict:
    """The metadata llama.cpp's converter writes for Llama 3.x (pre-tokenizer "llama-bpe")."""
    encoder = json.loads((LLAMA3_DIR / "encoder.json").read_text(encoding="utf-8"))
    tokens = [""] * len(encoder)
    for piece, i in encoder.items():
        tokens[i] = piece
    lines = (LLAMA3_DIR / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    merges = [m for m in lines if m and not m.startswith("#version")]
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens + LLAMA3_SPECIALS,
        "tokenizer.ggml.token_type": [1] * len(tokens) + [3] * len(LLAMA3_SPECIALS),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 128000,
        "tokenizer.ggml.eos_token_id": 128009,
    }


ALL = [*VOCABS, "llama-bpe"]


# -- llama.cpp's detokenizer (llama_vocab::impl::token_to_piece + detokenize), for reference ---


def _gpt2_unicode_to_byte() -> dict[str, int]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


U2B = _gpt2_unicode_to_byte()
NO_CLEAN_SPACES_PRE = {"command-r", "qwen2", "deepseek-llm", "deepseek-coder", "poro-chat", "viking", "smollm"}


def llama_detokenize(meta: dict, ids: list[int], *, clean: bool = True) -> str:
    """common_detokenize(ctx, ids, special=true): pieces, leading-space removal, clean_spaces."""
    model = meta["tokenizer.ggml.model"]
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type")
    if model == "llama":
        remove_space, clean_spaces = bool(meta.get("tokenizer.ggml.add_space_prefix", True)), False
    elif model == "bert":
        remove_space, clean_spaces = bool(meta.get("tokenizer.ggml.add_space_prefix", False)), True
    else:
        remove_space = False
        clean_spaces = meta.get("tokenizer.ggml.pre", "default") not in NO_CLEAN_SPACES_PRE
    text = bytearray()
    for i in ids:
        piece, kind = tokens[i], 1 if types is None else int(types[i])
        if kind in (2, 3, 4):  # unknown, control, user-defined: the text itself (special=true)
            raw = piece.encode()
        elif kind == 1:
            raw = bytes(U2B[c] for c in piece) if model == "gpt2" else piece.replace("\u2581", " ").encode()
        elif kind == 6:
            raw = bytes([int(piece[3:5], 16)])
        else:
            raw = b""
        if remove_space and raw.startswith(b" "):
            raw = raw[1:]
        remove_space = False
        text += raw
    if clean and clean_spaces:
        text = _clean_spaces(text)
    return text.decode("utf-8", errors="replace")


def _clean_spaces(t: bytearray) -> bytearray:
    """llama.cpp's three in-place passes, transcribed index for index."""
    t = bytearray(t)
    total1 = len(t)
    total = 1 if total1 else 0
    for i in range(1, total1):
        x = t[i]
        if t[i - 1] == ord(" ") and x in b"?!.,":
            total -= 1
        t[total] = x
        total += 1
    total2 = total
    total = 1 if total else 0
    i = 1
    while i < total2:
        x = t[i]
        if x == ord("'") and i + 1 < total2 and t[i - 1] == ord(" ") and t[i + 1] == ord(" "):
            total -= 1
            i += 1
            t[i] = 0
        t[total] = x
        total += 1
        i += 1
    total3 = total
    total = 1 if total else 0
    for i in range(1, total3):
        x = t[i]
        if t[i - 1] == ord(" ") and x == ord("'") and i + 1 < total3:
            x1 = t[i + 1]
            if x1 in b"td":
                pass
            elif x1 in b"sm":
                total -= 1
            elif i + 2 < total3:
                x2 = t[i + 2]
                if (x1, x2) in ((ord("r"), ord("e")), (ord("v"), ord("e"))):
                    total -= 1
        t[total] = x
        total += 1
    return t[:total]


# -- encoding: llama.cpp's vectors --------------------------------------------------------------


def test_vector_files_are_as_expected():
    for name in VOCABS:
        assert (VOCAB_DIR / f"ggml-vocab-{name}.gguf").is_file()
        assert len(vectors_of(name)) == N_VECTORS
    texts = [t for t, _ in vectors_of("gpt-2")]
    assert "" in texts and "\n" in texts and " Hello" in texts  # nothing stripped


@pytest.mark.parametrize("name", ALL)
def test_encode_matches_llama_cpp_vectors(name):
    # test-tokenizer-0: add_special=false, parse_special=false
    tok = tokenizer_of(name, parse_special=False)
    failures = [
        (text, expected, got)
        for text, expected in vectors_of(name)
        if (got := tok.encode(text, add_bos=False)) != expected
    ]
    assert failures == []
    assert len(vectors_of(name)) == N_VECTORS


@pytest.mark.parametrize("name", ALL)
def test_parse_special_changes_nothing_without_special_text(name):
    tok = tokenizer_of(name)
    for text, expected in vectors_of(name):
        assert tok.encode(text, add_bos=False) == expected


@pytest.mark.parametrize("name", ALL)
def test_ids_and_pieces_are_the_gguf_ones(name):
    meta = metadata_of(name)
    tokens = meta["tokenizer.ggml.tokens"]
    tok = tokenizer_of(name)
    assert tok.vocab_size == len(tokens)
    for i in range(0, len(tokens), 97):
        assert tok.id_to_piece(i) == tokens[i]
    for i, t in enumerate(tokens):  # every special-looking token keeps its GGUF id
        if meta["tokenizer.ggml.token_type"][i] in (2, 3, 4):
            assert tok.backend.token_to_id(t) == i


# -- decoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_decode_round_trips_wherever_llama_cpp_does(name):
    meta = metadata_of(name)
    tok = tokenizer_of(name)
    llama_round_trips = 0
    for text, expected in vectors_of(name):
        if llama_detokenize(meta, expected) == text:
            llama_round_trips += 1
            assert tok.decode(tok.encode(text, add_bos=False)) == text
    # llama.cpp round-trips these many of the 46 inputs (BERT lowercases and splits words;
    # byte-level BPE loses the space in " ?" to clean_spaces).
    assert llama_round_trips == {"bert-bge": 4, "llama-spm": 46}.get(name, 44)


@pytest.mark.parametrize("name", ALL)
def test_decode_equals_llama_cpp_pieces(name):
    meta = metadata_of(name)
    tok = tokenizer_of(name)
    # WPM: llama.cpp's detokenizer as is. SPM: it never cleans spaces. Byte-level BPE: the
    # same pieces but without clean_spaces, so that decoding loses no text.
    clean = meta["tokenizer.ggml.model"] == "bert"
    for _, expected in vectors_of(name):
        assert tok.decode(expected, skip_special_tokens=False) == llama_detokenize(meta, expected, clean=clean)


@pytest.mark.parametrize("name", ["gpt-2", "falcon", "mpt", "refact", "llama-spm"])
def test_byte_level_and_spm_decode_is_lossless_on_the_vectors(name):
    tok = tokenizer_of(name)
    for text, _ in vectors_of(name):
        assert tok.decode(tok.encode(text)) == text


# -- special and user-defined tokens ------------------------------------------------------------


def test_control_tokens_match_only_with_parse_special():
    on, off = tokenizer_of("gpt-2"), tokenizer_of("gpt-2", parse_special=False)
    text = "a<|endoftext|>b"
    assert on.encode(text) == [64, 50256, 65]
    plain = off.encode(text)
    assert 50256 not in plain and len(plain) > 3
    assert off.decode(plain) == text
    assert on.decode([64, 50256, 65]) == "ab"  # control tokens are left out of text
    assert on.decode([64, 50256, 65], skip_special_tokens=False) == text


def test_spm_prefixes_a_space_after_special_tokens_and_adds_bos():
    tok = tokenizer_of("llama-spm")
    hello = tok.encode("Hello", add_bos=False)
    assert tok.encode("Hello") == [1, *hello]  # add_bos_token=true in the file
    assert tok.encode("<s>Hello", add_bos=False) == [1, *hello]
    assert tok.encode("Hello</s>Hello", add_bos=False) == [*hello, 2, *hello]
    assert tokenizer_of("llama-spm", parse_special=False).encode("<s>", add_bos=False) != [1]
    assert tok.eos_id == 2 and tok.bos_id == 1


def test_user_defined_tokens_match_even_without_parse_special():
    # MPT's vocabulary stores runs of spaces as user-defined tokens ("  " ... 24 spaces).
    tok = tokenizer_of("mpt", parse_special=False)
    assert tok.encode("x" + " " * 30 + "y") == [89, 50254, 50272, 90]
    assert tok.decode([89, 50254, 50272, 90]) == "x" + " " * 30 + "y"


def test_bert_special_ids():
    tok = tokenizer_of("bert-bge")
    assert (tok.bos_id, tok.pad_id, tok.eos_id) == (101, 0, None)
    assert tok.encode("Hello") == [101, 7592]
    assert tok.encode("[CLS] hi", add_bos=False)[0] == 101
    assert tokenizer_of("bert-bge", parse_special=False).encode("[CLS]", add_bos=False) != [101]


# -- other files and inputs ---------------------------------------------------------------------


def test_missing_pre_tokenizer_is_default():
    # gpt-neox's file predates tokenizer.ggml.pre; llama.cpp then uses "default".
    meta = gguf_metadata(VOCAB_DIR / "ggml-vocab-gpt-neox.gguf")
    assert "tokenizer.ggml.pre" not in meta
    tok = tokenizer_from_gguf_metadata(meta)
    assert tok.vocab_size == 50432
    # "default" splits numbers off their space and into runs of three digits.
    ids = tok.encode("Hello world 12345")
    assert [tok.id_to_piece(i) for i in ids] == ["Hello", "Ġworld", "Ġ", "123", "45"]
    assert ids == [12092, 1533, 209, 10683, 1857]
    for text, _ in vectors_of("mpt"):
        assert tok.decode(tok.encode(text)) == text


def test_plain_lists_and_numpy_arrays_give_the_same_tokenizer():
    meta = dict(metadata_of("llama-spm"))
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        assert isinstance(meta[key], np.ndarray)
        meta[key] = meta[key].tolist()
    tok = tokenizer_from_gguf_metadata(meta)
    for text, expected in vectors_of("llama-spm"):
        assert tok.encode(text, add_bos=False) == expected


def test_unknown_pre_tokenizer_is_a_clear_error():
    meta = dict(metadata_of("gpt-2"), **{"tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(CheckpointError, match="no-such-pre"):
        tokenizer_from_gguf_metadata(meta)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokenizer.ggml.model": "t5"}, "unsupported GGUF tokenizer model 't5'"),
        ({"tokenizer.ggml.model": None}, "no tokenizer.ggml.model"),
        ({"tokenizer.ggml.tokens": None}, "no tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.merges": None}, "no tokenizer.ggml.merges"),
        ({"tokenizer.ggml.token_type": [1, 2]}, "token_type has 2 entries"),
        ({"tokenizer.ggml.tokens": ["a", "b", "a"]}, "duplicate token"),
        ({"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": 10**9}, None),
    ],
)
def test_bad_metadata(change, message):
    meta = dict(metadata_of("gpt-2"))
    for key, value in change.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    if "tokenizer.ggml.tokens" in change and change["tokenizer.ggml.tokens"] is not None:
        meta.pop("tokenizer.ggml.token_type")
        meta["tokenizer.ggml.merges"] = []
    if message is None:  # an out-of-range BOS id falls back to the default (11), as in llama.cpp
        assert tokenizer_from_gguf_metadata(meta).bos_id == 11
        return
    with pytest.raises(CheckpointError, match=message):
        tokenizer_from_gguf_metadata(meta)


def test_metadata_must_be_a_mapping():
    with pytest.raises(CheckpointError):
        tokenizer_from_gguf_metadata([("tokenizer.ggml.model", "gpt2")])


def test_llama3_builds_fast_and_adds_bos():
    meta = metadata_of("llama-bpe")
    start = time.perf_counter()
    tok = tokenizer_from_gguf_metadata(meta)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"building a 128k-token tokenizer took {elapsed:.1f} s"
    assert tok.add_bos and tok.bos_id == 128000 and tok.eos_id == 128009
    assert tok.encode("<|start_header_id|>user<|end_header_id|>") == [128000, 128006, 882, 128007]
