"""Every pre-tokenizer llama.cpp knows, judged by llama.cpp itself.

For each tokenizer.ggml.pre name that llama.cpp's src/llama-vocab.cpp accepts, a GGUF
vocabulary tagged with that name is loaded by llama-cpp-python (vocab_only) and by emergence,
and both tokenize every held-out text of tests/data/pretokenizer_heldout.txt (many scripts,
code, CRLF, digit runs, contractions, emoji sequences, odd whitespace): the ids must be the
same for every text. The vocabularies are BPEs trained here, at test time, on
tests/data/pretokenizer_corpus.txt, with paragraphs as words and every pair merged down to
pairs seen once, so that their tokens cross spaces, digits, punctuation and scripts (a split
that differs from llama.cpp's then tends to change the ids):

* a byte-level BPE (GPT-2's byte characters), for every name but four;
* a raw UTF-8 BPE with <0xXX> byte tokens, for the four names llama.cpp tokenizes without
  the byte map (byte_encode=false): gemma4, granite-embed-multi-311m and sarvam-moe
  (SentencePiece-style: spaces become "▁", only newlines split) and whitespace.

Whatever the vocabulary, the pieces themselves are compared too: llama.cpp's own splitter
(unicode_regex_split, called in libllama) against emergence's pre-tokenizer, on the held-out
texts and on random strings of the characters the pre-tokenizers treat differently.

With "whitespace" llama.cpp aborts the process on a run of white space that holds a space
(test_llama_cpp_aborts_on_spaces_with_the_whitespace_pre_tokenizer), so those texts are not
compared for it. The agreement per name (texts that agree / texts compared) and per regex
list (texts and pieces) is printed at the end of the run.
"""

from __future__ import annotations

import ast
import ctypes
import json
import os
import platform
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
from tokenizers import Regex, models, pre_tokenizers, trainers

import llama_cpp  # noqa: E402  (a test dependency, built from source)

from emergence.errors import CheckpointError
from emergence.gguf import write_gguf
from emergence.gguf.format import GGUFValue, GGUFValueType
from emergence.gguf.vocab import _REGEXES, PRE_TOKENIZERS, tokenizer_from_gguf_metadata

DATA = Path(__file__).resolve().parent / "data"
LLAMA_CPP_SOURCE = Path(__file__).resolve().parents[1] / "build" / f"llama.cpp-{llama_cpp.__version__}"

# Every tokenizer.ggml.pre name of llama_vocab::impl::load in llama.cpp's src/llama-vocab.cpp
# (llama-cpp-python 0.3.36), in its order. Checked against the installed library's strings
# (test_names_are_llama_cpps) and against the source (build/llama.cpp-<version>, fetched by
# `make test`: bench/llama_cpp_source.py) with each name's flags and regexes
# (test_names_flags_and_regexes_...).
PRE_NAMES = [
    "default", "minicpm5",
    "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano",
    "deepseek-llm", "deepseek-coder", "deepseek-v3", "spark2_5", "youtu", "falcon", "mpt", "starcoder",
    "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum", "modern-bert",
    "jais-2", "gemma4", "granite-embed-multi-311m", "sarvam-moe", "jina-v1-en", "jina-v2-code", "roberta-bpe",
    "whitespace", "refact", "command-r", "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "qwen35", "stablelm2",
    "olmo", "dbrx", "smaug-bpe", "poro-chat", "chatglm-bpe", "glm4", "glm5", "viking", "jais", "tekken", "smollm",
    "codeshell", "bloom", "gpt3-finnish", "exaone", "exaone4", "exaone-moe", "chameleon", "minerva-7b", "megrez",
    "gpt-4o", "llama4", "kanana2", "talkie", "granite-embed-multi-97m", "tiny_aya", "cohere2moe", "superbpe",
    "trillion", "granite-docling", "bailingmoe", "bailingmoe2", "llada-moe", "seed-coder", "hunyuan",
    "hunyuan-dense", "hy_v4", "joyai-llm", "kimi-k2", "ufakzeka", "grok-2", "afmoe", "laguna", "minimax-m2",
    "solar-open", "mellum2",
]
# The names llama.cpp tokenizes on raw UTF-8 (byte_encode = false in llm_tokenizer_bpe), and of
# those, the ones whose spaces it writes as "▁" first (escape_whitespaces).
RAW_UTF8 = {"gemma4", "granite-embed-multi-311m", "sarvam-moe", "whitespace"}
ESCAPES_SPACES = {"gemma4", "granite-embed-multi-311m", "sarvam-moe"}

EOT = "<|endoftext|>"
SPACE = "\u2581"
AGREEMENT: dict[str, tuple[int, int]] = {}  # name -> texts with llama.cpp's ids, texts compared
PIECES: dict[str, tuple[int, int, int]] = {}  # regex list -> texts split as llama.cpp, texts, pieces


# -- the texts ------------------------------------------------------------------------------------

_ESCAPE = re.compile(r"\\(t|r|n|\\|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8})")


def _unescape(text: str) -> str:
    def one(m: re.Match) -> str:
        code = m[1]
        return {"t": "\t", "r": "\r", "n": "\n", "\\": "\\"}.get(code) or chr(int(code[1:], 16))

    return _ESCAPE.sub(one, text)


def heldout_texts() -> list[str]:
    raw = (DATA / "pretokenizer_heldout.txt").read_text(encoding="utf-8")
    body = raw[raw.index("\n~~~~\n") + len("\n~~~~\n"):]
    body = body[:-1] if body.endswith("\n") else body
    return [_unescape(t) for t in body.split("\n~~~~\n")]


HELDOUT = heldout_texts()


# -- the vocabularies -----------------------------------------------------------------------------


def _train(texts: list[str], pre: pre_tokenizers.PreTokenizer, **options) -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(min_frequency=1, show_progress=False, special_tokens=[EOT], **options)
    backend.train_from_iterator(texts, trainer)
    return backend


def _vocab_and_merges(backend: tokenizers.Tokenizer) -> tuple[list[str], list[str]]:
    spec = json.loads(backend.to_str())["model"]
    tokens = [""] * len(spec["vocab"])
    for piece, i in spec["vocab"].items():
        tokens[i] = piece
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    return tokens, merges


@pytest.fixture(scope="module")
def vocabularies() -> dict[str, dict]:
    return train_vocabularies()


def train_vocabularies() -> dict[str, dict]:
    """GGUF tokenizer metadata (without tokenizer.ggml.pre) of the two trained vocabularies."""
    corpus = (DATA / "pretokenizer_corpus.txt").read_text(encoding="utf-8")
    paragraphs = pre_tokenizers.Split(Regex(r"\n\n+"), behavior="isolated")

    byte_level = _train(
        [corpus],
        pre_tokenizers.Sequence([paragraphs, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        vocab_size=8000,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokens, merges = _vocab_and_merges(byte_level)
    types = [3 if t == EOT else 1 for t in tokens]
    byte_meta = {"tokens": tokens, "token_type": types, "merges": merges}

    # Raw UTF-8: both spellings of spaces, newlines apart (the split gemma4 makes); the rarer
    # characters are left out of the alphabet, so that they fall back to <0xXX> tokens.
    raw = _train(
        [corpus, corpus.replace(" ", SPACE)],
        pre_tokenizers.Split(Regex(r"[^\n]+|\n+"), behavior="isolated"),
        vocab_size=3000,
        limit_alphabet=150,
    )
    tokens, merges = _vocab_and_merges(raw)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    raw_meta = {
        "tokens": tokens + byte_tokens,
        "token_type": [3 if t == EOT else 1 for t in tokens] + [6] * 256,
        "merges": merges,
    }
    return {"byte": byte_meta, "raw": raw_meta}


def gguf_metadata(vocab: dict, pre: str) -> dict:
    return {
        "general.architecture": "llama",
        "general.name": f"pre-{pre}",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": vocab["tokens"],
        "tokenizer.ggml.token_type": GGUFValue(vocab["token_type"], GGUFValueType.ARRAY, GGUFValueType.INT32),
        "tokenizer.ggml.merges": vocab["merges"],
    }


def plain(meta: dict) -> dict:
    """The metadata as tokenizer_from_gguf_metadata takes it (plain lists, no GGUFValue)."""
    return {k: (v.value if isinstance(v, GGUFValue) else v) for k, v in meta.items()}


def load_llama_cpp(meta: dict, folder: Path) -> llama_cpp.Llama:
    path = folder / f"{meta['general.name']}.gguf"
    write_gguf(path, meta, [])
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def llama_cpp_ids(llm: llama_cpp.Llama, text: str, *, add_bos: bool = False) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)


# -- the comparison -------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def agreement_report(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not (AGREEMENT or PIECES):
        return
    with capture.global_and_fixture_disabled():
        _report(reporter)


def _report(reporter) -> None:
    reporter.write_line("")
    version = llama_cpp.__version__
    reporter.write_line(f"pre-tokenizers, held-out texts with llama.cpp {version}'s ids (agree/compared):")
    cells = [f"{name} {ok}/{total}" for name, (ok, total) in AGREEMENT.items()]
    for i in range(0, len(cells), 6):
        reporter.write_line("  " + "; ".join(cells[i:i + 6]))
    if "whitespace" in AGREEMENT:
        reporter.write_line(f"  (whitespace: not compared, llama.cpp aborts: {ABORTS} texts)")
    if PIECES:
        reporter.write_line("pre-tokenizers, llama.cpp's own split (texts agree/compared, pieces):")
        cells = [f"{kind} {ok}/{total} ({pieces})" for kind, (ok, total, pieces) in PIECES.items()]
        for i in range(0, len(cells), 5):
            reporter.write_line("  " + "; ".join(cells[i:i + 5]))


# llama.cpp itself aborts (GGML_ASSERT in llama_vocab::find_bpe_rank) when a raw-UTF-8 piece of
# two or more characters holds a space: with "whitespace" that is any run of white space of two
# or more characters with a space in it. Those texts cannot be compared; see
# test_llama_cpp_aborts_on_spaces_with_the_whitespace_pre_tokenizer.
_WHITE_SPACE_RUN = re.compile("[\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]{2,}")


def llama_cpp_aborts_on(pre: str, text: str) -> bool:
    return pre == "whitespace" and any(" " in run for run in _WHITE_SPACE_RUN.findall(text))


ABORTS = sum(llama_cpp_aborts_on("whitespace", t) for t in HELDOUT)


@pytest.mark.parametrize("pre", PRE_NAMES)
def test_same_ids_as_llama_cpp(pre, vocabularies, tmp_path):
    meta = gguf_metadata(vocabularies["raw" if pre in RAW_UTF8 else "byte"], pre)
    llm = load_llama_cpp(meta, tmp_path)
    tok = tokenizer_from_gguf_metadata(plain(meta), parse_special=False)

    texts = [t for t in HELDOUT if not llama_cpp_aborts_on(pre, t)]
    differ = []
    for text in texts:
        ours, theirs = tok.encode(text, add_bos=False), llama_cpp_ids(llm, text)
        if ours != theirs:
            differ.append((text, ours, theirs))
    AGREEMENT[pre] = (len(texts) - len(differ), len(texts))
    assert differ == [], f"{len(differ)} of {len(texts)} texts differ, first: {differ[0]!r}"
    assert len(texts) == len(HELDOUT) - (ABORTS if pre == "whitespace" else 0)

    # BOS: llama.cpp's default for the name (add_special=true adds BOS and nothing else here).
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    bos = llama_cpp.llama_vocab_bos(vocab)
    assert tok.bos_id == (None if bos < 0 else bos)
    assert tok.add_bos == llama_cpp.llama_vocab_get_add_bos(vocab)
    for text in texts[:3]:
        assert tok.encode(text) == llama_cpp_ids(llm, text, add_bos=True)


def test_llama_cpp_aborts_on_spaces_with_the_whitespace_pre_tokenizer(vocabularies, tmp_path):
    meta = gguf_metadata(vocabularies["raw"], "whitespace")
    path = tmp_path / "whitespace.gguf"
    write_gguf(path, meta, [])
    code = (
        "import sys, llama_cpp\n"
        "llm = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)\n"
        "print(llm.tokenize(sys.argv[2].encode(), add_bos=False, special=False), flush=True)\n"
    )
    run = [sys.executable, "-c", code, str(path)]
    options = dict(capture_output=True, text=True, timeout=60, cwd=tmp_path,
                   env={**os.environ, "GGML_NO_BACKTRACE": "1"})  # (no gdb on the abort)
    fine = subprocess.run([*run, "a b\tc"], **options)
    assert fine.returncode == 0, fine.stderr[-2000:]
    aborted = subprocess.run([*run, "a  b"], **options)
    assert aborted.returncode != 0 and "find(' ') == std::string::npos" in aborted.stderr
    tok = tokenizer_from_gguf_metadata(plain(meta), parse_special=False)
    assert tok.encode("a b\tc", add_bos=False) == ast.literal_eval(fine.stdout.strip())
    assert tok.decode(tok.encode("a  b", add_bos=False)) == "a  b"  # emergence tokenizes it


# -- llama.cpp's split, piece by piece --------------------------------------------------------------
#
# llama.cpp's unicode_regex_split (src/unicode.cpp), exported by libllama, called through ctypes
# with libstdc++'s std::string and std::vector layouts: the pieces llama.cpp's pre-tokenizer
# makes, compared with those emergence's pre-tokenizer makes, whatever the vocabulary.

_SPLIT_SYMBOL = (
    "_Z19unicode_regex_splitRKNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEERKSt6vectorIS4_SaIS4_EEb"
)


class _StdString(ctypes.Structure):  # pointer, length, then capacity or a short string's bytes
    _fields_ = [("data", ctypes.c_void_p), ("size", ctypes.c_size_t), ("capacity", ctypes.c_size_t),
                ("spare", ctypes.c_size_t)]


class _StdVector(ctypes.Structure):
    _fields_ = [("begin", ctypes.c_void_p), ("end", ctypes.c_void_p), ("capacity_end", ctypes.c_void_p)]


def _llama_cpp_split_function():
    if platform.machine() not in ("x86_64", "AMD64"):  # the calling convention below is x86-64's
        return None
    library = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libllama.so"))
    try:
        function = library[_SPLIT_SYMBOL]
    except AttributeError:
        return None
    # The std::vector result comes back through a hidden first pointer argument.
    function.restype = None
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_bool]
    return function


SPLIT = _llama_cpp_split_function()


def llama_cpp_split(text: str, regexes: list[str], byte_encode: bool) -> list[str]:
    """unicode_regex_split(text, regexes, byte_encode), its empty pieces (no tokens) left out."""
    if not text:  # never split by llama.cpp, whose hand-coded splits would throw on it
        return []
    keep = []

    def std_string(value: str) -> _StdString:
        data = value.encode("utf-8")
        buffer = ctypes.create_string_buffer(data)
        keep.append(buffer)
        return _StdString(ctypes.addressof(buffer), len(data), len(data), 0)

    array = (_StdString * len(regexes))(*[std_string(r) for r in regexes])
    end = ctypes.addressof(array) + ctypes.sizeof(array)
    vector, out = _StdVector(ctypes.addressof(array), end, end), _StdVector()
    SPLIT(ctypes.byref(out), ctypes.byref(std_string(text)), ctypes.byref(vector), byte_encode)
    pieces = []
    for address in range(out.begin or 0, out.end or 0, ctypes.sizeof(_StdString)):  # (the result is leaked)
        piece = _StdString.from_address(address)
        pieces.append(ctypes.string_at(piece.data, piece.size).decode("utf-8"))
    return [p for p in pieces if p]


def llama_cpp_notation(regex: str) -> str:
    r"""A regex of emergence's table as llama.cpp's source writes it (\x{..} -> the character)."""
    return re.sub(r"\\x\{([0-9A-F]+)\}", lambda m: chr(int(m[1], 16)), regex)


def _fuzz_texts(n: int, seed: int = 16) -> list[str]:
    """Random strings of the characters and pieces that pre-tokenizers treat differently."""
    pool = [
        *"aAzZsStTdDmMlLrReEvV0123456789", *"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        " ", " ", "  ", "    ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "\x00", "\x7f",
        *"éÉßẞǅİıΣσςΑωЖжЁёاعबिक्षาเ่ิก中文漢𠀀豈〇々〆かなカナｶﾅ한글ㄱㅏ", *"٣१๑０²½Ⅻ€£¥©°±×÷∞√≠≤←★☀❤😀👍🏽🇫🇷🫩",
        "\u0301", "\u0308", "\u20e3", "\ufe0f", "\u200d", "\u200b", "\ufeff", "\u00ad",
        "\u00a0", "\u3000", "\u2003", "\u0085", "\u2028", "\u2029", "\u1680", "\u202f", "\u205f",
        "\u1c89", "\U0001fae9", "\u2427", "\u31ef", "\U0002ebf0", "\u0378", "\U0001fffe", "\ue000",
        *"—…、。，！？「」（）《》؟،۔।॥", "<sentinel:12>", "IMGIMG", "ABCZ", "the", "THE", "'s", "'LL", "1234",
    ]
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


FUZZ = _fuzz_texts(150)


@pytest.mark.skipif(SPLIT is None, reason="no x86-64 libllama exporting unicode_regex_split (C++11 ABI)")
@pytest.mark.parametrize("kind", sorted(set(_REGEXES)))
def test_same_pieces_as_llama_cpp(kind, vocabularies):
    name = next(n for n in PRE_NAMES if PRE_TOKENIZERS[n].regexes == kind)
    spec = PRE_TOKENIZERS[name]
    tok = tokenizer_from_gguf_metadata(plain(gguf_metadata(vocabularies["raw" if name in RAW_UTF8 else "byte"], name)))
    regexes = [llama_cpp_notation(r) for r in _REGEXES[kind]]
    differ, pieces = [], 0
    for text in HELDOUT + FUZZ:
        if spec.escape_spaces:  # llama.cpp escapes before it splits; emergence's normalizer does it
            text = text.replace(" ", SPACE)
        theirs = llama_cpp_split(text, regexes, spec.byte_level)
        ours = [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str(text)]
        pieces += len(theirs)
        if ours != theirs:
            differ.append((text, ours, theirs))
    total = len(HELDOUT) + len(FUZZ)
    PIECES[kind] = (total - len(differ), total, pieces)
    assert differ == []


def test_the_texts_are_varied():
    joined = "".join(HELDOUT)
    assert len(HELDOUT) >= 45 and "" in HELDOUT
    for needle in ("\r\n", "\t", "\u00a0", "\u200d", "\U0001F3FD", "'S", "'ll", "1234567", "    ", "\n\n\n"):
        assert needle in joined, needle
    scripts = [r"\p{Cyrillic}", r"\p{Greek}", r"\p{Han}", r"\p{Hiragana}", r"\p{Hangul}", r"\p{Arabic}",
               r"\p{Devanagari}", r"\p{Thai}", r"\p{Latin}"]
    for script in scripts:
        found = pre_tokenizers.Split(Regex(script), behavior="removed").pre_tokenize_str(joined)
        assert "".join(p for p, _ in found) != joined, script


def test_gemma4_takes_newline_tokens_whole_where_merges_do_not_build_them(vocabularies, tmp_path):
    # llama.cpp's gemma4 rule: a piece of newlines that is a token is that token, merges or
    # not. Here the merges that build newline tokens are gone and the vocabulary has a token
    # for each run of 1 to 16 newlines (the texts' longest is 8).
    vocab = dict(vocabularies["raw"])
    runs = ["\n" * k for k in range(1, 17)]
    vocab["tokens"] = [t for t in vocab["tokens"] if t not in runs] + runs
    vocab["token_type"] = [3 if t == EOT else 6 if re.fullmatch(r"<0x..>", t) else 1 for t in vocab["tokens"]]
    vocab["merges"] = [m for m in vocab["merges"] if not (m.count(" ") == 1 and set(m) == {"\n", " "})]
    assert max(len(m) for t in HELDOUT for m in re.findall(r"\n+", t)) <= 16
    for pre in ("gemma4", "sarvam-moe"):  # sarvam-moe has no such rule: it merges
        meta = gguf_metadata(vocab, pre)
        llm = load_llama_cpp(meta, tmp_path)
        tok = tokenizer_from_gguf_metadata(plain(meta), parse_special=False)
        for text in HELDOUT:
            assert tok.encode(text, add_bos=False) == llama_cpp_ids(llm, text), (pre, text)
        ids = tok.encode("a\n\n\nb", add_bos=False)
        assert (vocab["tokens"].index("\n\n\n") in ids) == (pre == "gemma4")
    # With the trained vocabulary's merges, which build every newline token, gemma4 merges.
    tok = tokenizer_from_gguf_metadata(plain(gguf_metadata(vocabularies["raw"], "gemma4")))
    assert "\n\n" in vocabularies["raw"]["tokens"]
    assert not any(t.content.strip("\n") == "" for t in tok.backend.get_added_tokens_decoder().values())


def test_gemma4_vocabulary_type(vocabularies, tmp_path):
    # tokenizer.ggml.model "gemma4": the gemma4 pre-tokenizer whatever tokenizer.ggml.pre says,
    # no default BOS (11 for "gpt2") and BOS always added.
    meta = gguf_metadata(vocabularies["raw"], "default")
    meta["tokenizer.ggml.model"] = "gemma4"
    meta["tokenizer.ggml.add_bos_token"] = False
    meta["tokenizer.ggml.bos_token_id"] = vocabularies["raw"]["tokens"].index(EOT)
    llm = load_llama_cpp(meta, tmp_path)
    tok = tokenizer_from_gguf_metadata(plain(meta), parse_special=False)
    for text in HELDOUT:
        assert tok.encode(text, add_bos=False) == llama_cpp_ids(llm, text)
        assert tok.encode(text) == llama_cpp_ids(llm, text, add_bos=True)
    assert tok.encode("a")[0] == tok.bos_id == meta["tokenizer.ggml.bos_token_id"]
    del meta["tokenizer.ggml.bos_token_id"]
    with pytest.raises(CheckpointError, match="bos_token_id is not set"):  # llama.cpp would assert
        tokenizer_from_gguf_metadata(plain(meta))


def test_kimi_k2_needs_no_merges(vocabularies, tmp_path):
    meta = gguf_metadata(vocabularies["byte"], "kimi-k2")
    del meta["tokenizer.ggml.merges"]
    llm = load_llama_cpp(meta, tmp_path)
    tok = tokenizer_from_gguf_metadata(plain(meta), parse_special=False)
    for text in HELDOUT:
        assert tok.encode(text, add_bos=False) == llama_cpp_ids(llm, text)


def test_decoding_gives_the_text_back(vocabularies):
    for pre in ("gpt-2", "llama3", "deepseek-llm", "gemma4", "whitespace"):
        meta = gguf_metadata(vocabularies["raw" if pre in RAW_UTF8 else "byte"], pre)
        tok = tokenizer_from_gguf_metadata(plain(meta), parse_special=False)
        for text in HELDOUT:
            assert tok.decode(tok.encode(text, add_bos=False)) == text, (pre, text)


# -- the list of names ----------------------------------------------------------------------------


def test_unknown_name_is_a_one_line_error_naming_the_supported_ones(vocabularies, tmp_path):
    meta = gguf_metadata(vocabularies["byte"], "no-such-pre")
    with pytest.raises(ValueError):  # llama.cpp refuses it too
        load_llama_cpp(meta, tmp_path)
    with pytest.raises(CheckpointError) as error:
        tokenizer_from_gguf_metadata(plain(meta))
    message = str(error.value)
    assert "\n" not in message and "'no-such-pre'" in message
    supported = message.split("supported: ", 1)[1].split(", ")
    assert sorted(supported) == sorted(PRE_NAMES)


def test_names_are_llama_cpps(tmp_path):
    assert len(set(PRE_NAMES)) == len(PRE_NAMES)
    assert sorted(PRE_TOKENIZERS) == sorted(PRE_NAMES)
    # The installed library: no string in it that it accepts as a pre-tokenizer name is
    # missing here. (Every name here it accepts: test_same_ids_as_llama_cpp.)
    library = Path(llama_cpp.__file__).parent / "lib" / "libllama.so"
    strings = {m.decode() for m in re.findall(rb"(?<=\x00)[a-z][a-z0-9._-]{1,40}(?=\x00)", library.read_bytes())}
    tiny = {"tokens": [chr(c) for c in range(33, 127)] + ["\u0120", "\u010a"], "merges": ["a b"]}
    meta = gguf_metadata(dict(tiny, token_type=[1] * len(tiny["tokens"])), "")
    meta["general.name"] = "probe"
    accepted = []
    for name in sorted(strings - set(PRE_NAMES)):
        meta["tokenizer.ggml.pre"] = name
        try:
            load_llama_cpp(meta, tmp_path)
        except ValueError:
            continue
        accepted.append(name)
    assert accepted == []
    assert len(strings) > 1000  # the scan found the library's strings


def _llama_cpp_source_tables() -> tuple[dict[str, dict], dict[str, list[str]], str]:
    """From llama-vocab.cpp: name -> flags, pre type -> its regexes as written, and the source."""
    source = (LLAMA_CPP_SOURCE / "src" / "llama-vocab.cpp").read_text(encoding="utf-8")
    start = source.index("// for now, only BPE models have pre-tokenizers")
    load = source[start:source.index("} else if (type == LLAMA_VOCAB_TYPE_SPM) {", start)]
    names: dict[str, dict] = {}
    for branch in re.split(r"\} else if \(", load):
        kind = re.search(r"pre_type = LLAMA_VOCAB_PRE_TYPE_(\w+)", branch)
        for name in re.findall(r'tokenizer_pre == "([^"]+)"', branch):
            names[name] = {
                "type": kind[1],
                "ignore_merges": "ignore_merges = true" in branch,
                "add_bos": "add_bos = true" in branch,
                "no_default_bos": "special_bos_id = LLAMA_TOKEN_NULL" in branch,
                "escape_spaces": "escape_whitespaces = true" in branch,
            }
    start = source.index("struct llm_tokenizer_bpe : llm_tokenizer {")
    constructor = source[start:source.index("std::vector<std::string> regex_exprs;", start)]
    regexes: dict[str, list[str]] = {}
    for case in constructor.split("break;"):
        body = re.search(r"regex_exprs = \{(.*?)\};", case, re.S)
        if not body:
            continue
        code = "\n".join(line for line in body[1].split("\n") if not line.strip().startswith("//"))
        strings = [ast.literal_eval(f'"{s}"') for s in re.findall(r'"((?:[^"\\]|\\.)*)"', code)]
        kinds = re.findall(r"case LLAMA_VOCAB_PRE_TYPE_(\w+):", case) or ["DEFAULT"]
        for kind in kinds:
            regexes[kind] = strings
            if "byte_encode = false" in case:
                regexes[kind + ":raw"] = []
    return names, regexes, source


def test_names_flags_and_regexes_are_those_of_the_llama_cpp_source():
    assert LLAMA_CPP_SOURCE.is_dir(), f"no llama.cpp source at {LLAMA_CPP_SOURCE}: make test fetches it " \
        "(bench/llama_cpp_source.py)"
    names, regexes, source = _llama_cpp_source_tables()
    assert list(names) == PRE_NAMES

    def same_notation(regex: str) -> str:  # \x{..} for a character; control characters as escapes
        regex = re.sub(r"\\x\{([0-9A-F]+)\}", lambda m: chr(int(m[1], 16)), regex)
        return regex.replace("\r", r"\r").replace("\n", r"\n").replace("\t", r"\t")

    always_bos = set(re.findall(r"pre_type == LLAMA_VOCAB_PRE_TYPE_(\w+) && !add_bos", source))
    whole_newlines = set(re.findall(r"tok_pre == LLAMA_VOCAB_PRE_TYPE_(\w+) && word\.find_first_not_of", source))
    for name, flags in names.items():
        ours = PRE_TOKENIZERS[name]
        assert [same_notation(r) for r in _REGEXES[ours.regexes]] == [
            same_notation(r) for r in regexes[flags["type"]]
        ], name
        assert ours.ignore_merges == flags["ignore_merges"], name
        assert ours.add_bos == flags["add_bos"], name
        assert ours.no_default_bos == flags["no_default_bos"], name
        assert ours.escape_spaces == flags["escape_spaces"] == (name in ESCAPES_SPACES), name
        assert ours.byte_level == (flags["type"] + ":raw" not in regexes) == (name not in RAW_UTF8), name
        assert ours.always_bos == (flags["type"] in always_bos), name
        assert ours.whole_newline_tokens == (flags["type"] in whole_newlines), name
