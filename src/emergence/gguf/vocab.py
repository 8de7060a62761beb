"""A `Tokenizer` from the vocabulary in a GGUF file's metadata, tokenizing as llama.cpp does.

GGUF files carry their tokenizer as metadata (`tokenizer.ggml.*`): the token strings, their
types and scores, BPE merges, the special-token ids and the name of the pre-tokenizer.
`tokenizer_from_gguf_metadata` rebuilds the same tokenizer on Hugging Face `tokenizers`, one
pipeline per llama.cpp vocabulary type (`tokenizer_to_gguf_metadata`, at the end, goes the
other way for our BPE tokenizers):

* ``llama`` (SentencePiece BPE): "▁" for spaces and in front of the text, merges ranked by
  the merged piece's score (llama.cpp merges the highest-scoring adjacent pair), byte
  fallback to ``<0xXX>`` pieces;
* ``gpt2`` (byte-level BPE): llama.cpp's pre-tokenizer regexes for the named
  ``tokenizer.ggml.pre``, applied one after another, then the GPT-2 byte-to-unicode map and
  the ranked merges;
* ``bert`` (WordPiece): llama.cpp's WPM pre-processing (NFD and accent stripping,
  lowercasing, punctuation and CJK characters as words of their own) and greedy
  longest-match over the vocabulary, in which llama.cpp's converter marks word starts with
  "▁" instead of marking continuations with "##".

Token ids are the GGUF ids, and `id_to_piece` returns the GGUF token strings. Control and
unknown tokens (types 3 and 2) become special added tokens: `encode` matches their text as
whole tokens (llama.cpp's ``parse_special=true``, unless ``parse_special=False``) and
`decode` leaves them out. User-defined tokens (type 4) are always matched as whole tokens,
as llama.cpp does.

`decode` gives llama.cpp's detokenized text with two choices of its own: control tokens
are skipped unless ``skip_special_tokens=False``, and byte-level BPE text is not passed
through llama.cpp's ``clean_spaces`` (which turns "you ?" into "you?"), so that decoding
the ids of a text gives the text back. WordPiece decoding keeps llama.cpp's clean-up: its
lowercased, re-spaced text cannot be an exact inverse anyway.

The metadata is a plain mapping from GGUF keys to Python values; numeric arrays may also
be numpy arrays. Nothing here reads files.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from ..errors import CheckpointError, InvalidArgument
from .format import GGUFValue, GGUFValueType
from ..tokenizer import SPIECE_SPACE, Tokenizer

__all__ = ["tokenizer_from_gguf_metadata", "PRE_TOKENIZERS"]

# llama_token_type values stored in tokenizer.ggml.token_type.
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

_KEY = "tokenizer.ggml."

# -- llama.cpp's BPE pre-tokenizer regexes (llm_tokenizer_bpe in src/llama-vocab.cpp) --------

_GPT2_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (
        r"[\p{P}\$\+<=>\^~\|]+",
        _GPT2_WORDS,
        r"\p{N}+",
        r"[0-9][0-9][0-9]",
    ),
    "gpt2": (_GPT2_WORDS,),
    "falcon": (
        r"[\p{P}\$\+<=>\^~\|`]+",
        _GPT2_WORDS,
        r"[0-9][0-9][0-9]",
    ),
    "starcoder": (r"\p{N}", _GPT2_WORDS),
    "llama3": (
        _CONTRACTIONS
        + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "qwen2": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
}

# tokenizer.ggml.pre name -> (regex family, ignore_merges, add_bos default), as llama.cpp's
# llama_vocab::impl::load maps them. A missing tokenizer.ggml.pre means "default".
PRE_TOKENIZERS: dict[str, tuple[str, bool, bool]] = {
    "default": ("default", False, False),
    **{
        name: ("llama3", True, True)
        for name in (
            "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
            "jina-v5-nano",
        )
    },
    "dbrx": ("llama3", False, False),
    "smaug-bpe": ("llama3", False, False),
    "falcon": ("falcon", False, False),
    **{
        name: ("gpt2", False, False)
        for name in (
            "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
            "mellum", "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais",
            "trillion", "granite-docling", "exaone4",
        )
    },
    **{
        name: ("starcoder", False, False)
        for name in ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2")
    },
    **{
        name: ("qwen2", False, False)
        for name in (
            "qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "solar-open",
        )
    },
}

# Texts llama.cpp always treats as control tokens (its end-of-generation list), whatever
# type the file gives them.
_EOG_TEXTS = frozenset(
    (
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
        "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
        "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
        "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
    )
)
# gpt-oss: always rendered and matched as user-defined tokens.
_FORCED_USER_DEFINED = frozenset(("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"))

# Default special-token ids per vocabulary type before the file's own keys apply
# (bos, eos, unk, sep, pad), as in llama.cpp.
_DEFAULT_IDS = {
    "llama": (1, 2, 0, None, None),
    "bert": (101, None, 100, 102, 0),
    "gpt2": (11, 11, None, None, None),
}

# Characters llama.cpp's WPM treats as whitespace but HF's BertNormalizer drops as control
# characters (they are both Cc and White_Space).
_CC_WHITESPACE = "[\u000b\u000c\u0085]"


def tokenizer_from_gguf_metadata(metadata: Mapping[str, object], *, parse_special: bool = True) -> Tokenizer:
    """Build a `Tokenizer` from GGUF metadata (`tokenizer.ggml.*` keys) that encodes as llama.cpp.

    `metadata` maps GGUF keys to plain values (str, int, float, bool, lists; numeric arrays
    may be numpy arrays). `encode(text, add_bos=False)` gives the ids of llama.cpp's
    ``llama_tokenize(text, add_special=false, parse_special=...)``; with ``parse_special``
    (the default) the text of control tokens such as ``<|endoftext|>`` or ``<s>`` becomes that
    token, otherwise it is tokenized as plain text. BOS is added by default where llama.cpp
    adds it (``tokenizer.ggml.add_bos_token``, else the vocabulary type's default); EOS and
    BERT's trailing [SEP] are never added.

    Raises `CheckpointError` for a vocabulary type or pre-tokenizer llama.cpp would not load
    or that is not supported here, and for missing or inconsistent keys.
    """
    if not isinstance(metadata, Mapping):
        raise CheckpointError(f"GGUF metadata must be a mapping, got {type(metadata).__name__}")
    model = _get_str(metadata, "model")
    if model is None:
        raise CheckpointError(f"GGUF metadata has no {_KEY}model: the file carries no tokenizer")
    if model in ("no_vocab", "none"):
        raise CheckpointError(f"GGUF {_KEY}model is {model!r}: the file carries no tokenizer")
    if model not in _DEFAULT_IDS:
        raise CheckpointError(
            f"unsupported GGUF tokenizer model {model!r} (supported: 'llama', 'gpt2', 'bert')"
        )

    tokens = _read_tokens(metadata)
    n = len(tokens)
    types = _read_numbers(metadata, "token_type", n, int)
    if types is None:
        types = [TOKEN_NORMAL] * n
    types = _adjust_types(tokens, types)

    pre = None
    if model == "gpt2":  # llama.cpp reads a pre-tokenizer only for BPE vocabularies
        pre = _get_str(metadata, "pre") or "default"
        if pre not in PRE_TOKENIZERS:
            raise CheckpointError(
                f"unknown GGUF pre-tokenizer {pre!r} ({_KEY}pre); supported: {', '.join(sorted(PRE_TOKENIZERS))}"
            )

    bos, eos, unk, sep, pad = _special_ids(metadata, model, n)

    if model == "llama":
        scores = _read_numbers(metadata, "scores", n, float) or [0.0] * n
        add_space_prefix = _get_bool(metadata, "add_space_prefix", True)
        backend = _spm_backend(tokens, types, scores, unk, add_space_prefix)
        add_bos = _get_bool(metadata, "add_bos_token", True)
    elif model == "gpt2":
        family, ignore_merges, default_add_bos = PRE_TOKENIZERS[pre]
        merges = _read_merges(metadata, tokens)
        backend = _bpe_backend(tokens, merges, _REGEXES[family], ignore_merges)
        add_bos = _get_bool(metadata, "add_bos_token", default_add_bos)
    else:  # bert
        if unk is None:
            raise CheckpointError("GGUF BERT vocabulary has no unknown token (tokenizer.ggml.unknown_token_id)")
        lowercase = _get_bool(metadata, "normalizer.lowercase", True)
        strip_accents = _get_bool(metadata, "normalizer.strip_accents", lowercase)
        add_space_prefix = _get_bool(metadata, "add_space_prefix", False)
        backend = _wpm_backend(tokens, tokens[unk], lowercase, strip_accents, add_space_prefix)
        add_bos = _get_bool(metadata, "add_bos_token", True)

    _add_special_tokens(backend, tokens, types, _strip_attributes(metadata, tokens))
    backend.encode_special_tokens = not parse_special

    if add_bos and bos is None:
        raise CheckpointError(f"{_KEY}add_bos_token is true, but {_KEY}bos_token_id is not set")
    return Tokenizer(
        backend,
        bos_token=None if bos is None else tokens[bos],
        eos_token=None if eos is None else tokens[eos],
        pad_token=None if pad is None else tokens[pad],
        add_bos=add_bos,
    )


# -- the three pipelines ---------------------------------------------------------------------


def _spm_backend(
    tokens: list[str], types: list[int], scores: list[float], unk: int | None, add_space_prefix: bool
) -> tokenizers.Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    byte_fallback = TOKEN_BYTE in types
    model = models.BPE(
        vocab=vocab,
        merges=_merges_from_scores(tokens, scores),
        unk_token=None if unk is None else tokens[unk],
        fuse_unk=True,
        byte_fallback=byte_fallback,
    )
    backend = tokenizers.Tokenizer(model)
    steps = [normalizers.Replace(" ", SPIECE_SPACE)]
    if add_space_prefix:
        # Each stretch of text between special tokens gets its "▁", as in llama.cpp.
        steps.insert(0, normalizers.Prepend(SPIECE_SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(dec)
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges that reproduce llama.cpp's SentencePiece merging.

    llama.cpp repeatedly merges the adjacent pair whose concatenation is a vocabulary token
    with the highest score (leftmost on a tie), whatever that token's type. Every split of a
    token into two vocabulary tokens becomes a merge ranked by the token's score; longer left
    parts rank first so that runs of one piece ("▁▁▁▁") grow from their left end.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, i in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], -cut, i, left, right))
    ranked.sort(key=lambda r: r[:3])
    return [(left, right) for *_, left, right in ranked]


def _bpe_backend(
    tokens: list[str], merges: list[tuple[str, str]], regexes: Sequence[str], ignore_merges: bool
) -> tokenizers.Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    try:
        model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=ignore_merges)
    except Exception as e:  # tokenizers reports a bad merge as a bare Exception
        raise CheckpointError(f"inconsistent GGUF BPE vocabulary: {_one_line(e)}") from None
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _wpm_backend(
    tokens: list[str], unk_token: str, lowercase: bool, strip_accents: bool, add_space_prefix: bool
) -> tokenizers.Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    # The GGUF vocabulary marks word starts with "▁" (llama.cpp's converter turned "##xy" into
    # "xy" and "xy" into "▁xy"), so each word gets a "▁" in front and continuations need no prefix.
    model = models.WordPiece(
        vocab=vocab, unk_token=unk_token, continuing_subword_prefix="", max_input_chars_per_word=1 << 30
    )
    backend = tokenizers.Tokenizer(model)
    steps = [normalizers.Replace(Regex(_CC_WHITESPACE), " ")]
    if strip_accents:
        # llama.cpp drops every combining mark (Mn, Mc, Me) after NFD.
        steps += [normalizers.NFD(), normalizers.Replace(Regex(r"\p{M}"), "")]
    steps.append(
        normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=lowercase
        )
    )
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.BertPreTokenizer(),
            pre_tokenizers.Metaspace(replacement=SPIECE_SPACE, prepend_scheme="always", split=False),
        ]
    )
    dec = [decoders.Replace(SPIECE_SPACE, " "), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    # llama.cpp's clean_spaces passes, in its order, on the fused text: no space before
    # ?!., , " ' " becomes "'", and contractions 's 'm 're 've lose their space.
    dec += [decoders.Replace(old, new) for old, new in _CLEAN_SPACES]
    backend.decoder = decoders.Sequence(dec)
    return backend


_CLEAN_SPACES = (
    (" ?", "?"), (" !", "!"), (" .", "."), (" ,", ","),
    (" ' ", "'"),
    (" 's", "'s"), (" 'm", "'m"), (" 're", "'re"), (" 've", "'ve"),
)


def _add_special_tokens(
    backend: tokenizers.Tokenizer, tokens: list[str], types: list[int], strip: dict[int, tuple[bool, bool]]
) -> None:
    """Control/unknown tokens as special added tokens, user-defined ones as plain added tokens.

    Added longest first: llama.cpp splits the text on each special token in order of
    decreasing length.
    """
    ids = [i for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED)]
    ids.sort(key=lambda i: -len(tokens[i].encode("utf-8")))
    special, plain = [], []
    for i in ids:
        lstrip, rstrip = strip.get(i, (False, False))
        is_special = types[i] != TOKEN_USER_DEFINED
        token = AddedToken(tokens[i], special=is_special, normalized=False, lstrip=lstrip, rstrip=rstrip)
        (special if is_special else plain).append(token)
    if special:
        backend.add_special_tokens(special)
    if plain:
        backend.add_tokens(plain)


# -- metadata -----------------------------------------------------------------------------------


def _string_list(metadata: Mapping[str, object], key: str, missing: str) -> Sequence:
    """The list stored under `key` (its items are checked by the caller)."""
    raw = metadata.get(key)
    if raw is None:
        raise CheckpointError(missing)
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise CheckpointError(f"GGUF {key} must be a list of strings")
    return raw


def _read_tokens(metadata: Mapping[str, object]) -> list[str]:
    key = _KEY + "tokens"
    tokens = list(_string_list(metadata, key, f"GGUF metadata has no {key}"))
    if not tokens:
        raise CheckpointError(f"GGUF {key} is empty")
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if not isinstance(t, str):
            raise CheckpointError(f"GGUF {key}[{i}] is not a string")
        if not t:  # llama.cpp's name for an empty token
            t = tokens[i] = f"[EMPTY_{i}]"
        if t in seen:
            raise CheckpointError(f"duplicate token in GGUF vocabulary: {t!r} has ids {seen[t]} and {i}")
        seen[t] = i
    return tokens


def _read_numbers(metadata: Mapping[str, object], name: str, n: int, kind: type) -> list | None:
    key = _KEY + name
    raw = metadata.get(key)
    if raw is None:
        return None
    if hasattr(raw, "tolist"):  # numpy array
        raw = raw.tolist()
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise CheckpointError(f"GGUF {key} must be an array of numbers")
    if len(raw) < n:
        raise CheckpointError(f"GGUF {key} has {len(raw)} entries for {n} tokens")
    values = list(raw[:n])
    try:
        if kind is int:
            values = [operator.index(v) for v in values]
        else:
            values = [float(v) for v in values]
    except TypeError:
        raise CheckpointError(f"GGUF {key} must be an array of numbers") from None
    return values


def _read_merges(metadata: Mapping[str, object], tokens: list[str]) -> list[tuple[str, str]]:
    key = _KEY + "merges"
    raw = _string_list(metadata, key, f"GGUF BPE vocabulary has no {key}")
    vocab = set(tokens)
    merges = []
    for i, merge in enumerate(raw):
        if not isinstance(merge, str):
            raise CheckpointError(f"GGUF {key}[{i}] is not a string")
        cut = merge.find(" ", 1)  # llama.cpp splits at the first space after the first byte
        if cut < 0:
            raise CheckpointError(f"GGUF {key}[{i}] {merge!r} is not two tokens separated by a space")
        left, right = merge[:cut], merge[cut + 1 :]
        # A merge that cannot produce a vocabulary token is never useful (llama.cpp would
        # fall back to bytes for its result); the tokenizers BPE refuses such merges.
        if left in vocab and right in vocab and left + right in vocab:
            merges.append((left, right))
    return merges


def _adjust_types(tokens: list[str], types: list[int]) -> list[int]:
    """llama.cpp's overrides of the stored token types, decided by token text."""
    out = list(types)
    for i, t in enumerate(tokens):
        if t in _FORCED_USER_DEFINED:
            out[i] = TOKEN_USER_DEFINED
        elif t in _EOG_TEXTS and out[i] != TOKEN_UNKNOWN:
            out[i] = TOKEN_CONTROL
    return out


def _special_ids(metadata: Mapping[str, object], model: str, n: int) -> tuple[int | None, ...]:
    """(bos, eos, unk, sep, pad): llama.cpp's defaults for the model type, then the file's ids.

    As in llama.cpp, a default outside the vocabulary is dropped and a stored id outside the
    vocabulary is ignored.
    """
    names = ("bos_token_id", "eos_token_id", "unknown_token_id", "seperator_token_id", "padding_token_id")
    ids = []
    for name, default in zip(names, _DEFAULT_IDS[model]):
        value = default if default is not None and default < n else None
        stored = metadata.get(_KEY + name)
        if stored is not None:
            try:
                stored = operator.index(stored)
            except TypeError:
                raise CheckpointError(f"GGUF {_KEY}{name} must be an integer") from None
            if 0 <= stored < n:
                value = stored
        ids.append(value)
    return tuple(ids)


def _strip_attributes(metadata: Mapping[str, object], tokens: list[str]) -> dict[int, tuple[bool, bool]]:
    """(lstrip, rstrip) of special tokens that llama.cpp sets by model name."""
    name = (_get_plain_str(metadata, "general.name") or "").lower()
    arch = _get_plain_str(metadata, "general.architecture") or ""
    pre = _get_str(metadata, "pre") or ""
    index = {t: i for i, t in enumerate(tokens) if t in ("<mask>", "[MASK]", "</s>", "<unk>", "<s>", "<|endoftext|>")}
    strip: dict[int, tuple[bool, bool]] = {}
    if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or any(
        s in arch for s in ("nomic-bert-moe", "jina-bert-v3")
    ):
        if "<mask>" in index:
            strip[index["<mask>"]] = (True, False)
    elif "phi-3" in name or "phi3" in name:
        strip = {i: (False, True) for i in range(len(tokens))}  # filtered to special tokens by the caller
        for t in ("<unk>", "<s>", "<|endoftext|>"):
            if t in index:
                strip[index[t]] = (False, False)
    elif "modern-bert" in name and "[MASK]" in index:
        strip[index["[MASK]"]] = (True, False)
    return strip


def _get_str(metadata: Mapping[str, object], name: str) -> str | None:
    return _get_plain_str(metadata, _KEY + name)


def _get_plain_str(metadata: Mapping[str, object], key: str) -> str | None:
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise CheckpointError(f"GGUF {key} must be a string, got {type(value).__name__}")
    return value


def _get_bool(metadata: Mapping[str, object], name: str, default: bool) -> bool:
    key = _KEY + name
    value = metadata.get(key)
    if value is None:
        return default
    if hasattr(value, "item") and not isinstance(value, (bool, int)):  # numpy scalar
        value = value.item()
    if not isinstance(value, bool):
        raise CheckpointError(f"GGUF {key} must be a boolean, got {type(value).__name__}")
    return value


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# -- our tokenizer as GGUF metadata (the way out) ------------------------------------------
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 5, 6


def tokenizer_to_gguf_metadata(tokenizer: Tokenizer, config) -> dict:
    """Our BPE tokenizer as llama.cpp vocabulary metadata: a byte-fallback BPE (SentencePiece
    style) becomes a "llama" vocabulary whose scores rank tokens by the merge that makes them;
    a byte-level BPE becomes a "gpt2" vocabulary with its merges and GPT-2's pre-tokenizer.
    Rows of the embedding past the tokenizer's vocabulary get unused [PAD{i}] tokens."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise InvalidArgument(f"only BPE tokenizers can be written to GGUF (this one is {model.get('type')})")
    pieces: dict[int, str] = {i: p for p, i in model["vocab"].items()}
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    for t in spec.get("added_tokens", []):
        pieces[t["id"]] = t["content"]
    size = max(config.vocab_size, max(pieces) + 1)
    if size > config.vocab_size:
        raise InvalidArgument(f"the tokenizer has {size} tokens but the model only {config.vocab_size}")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    tokens, types = [], []
    for i in range(size):
        piece = pieces.get(i)
        if piece is None:
            tokens.append(f"[PAD{i}]"), types.append(TOKEN_UNUSED)
            continue
        tokens.append(piece)
        if i in special:
            types.append(TOKEN_UNKNOWN if piece == model.get("unk_token") else TOKEN_CONTROL)
        elif model.get("byte_fallback") and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types.append(TOKEN_BYTE)
        else:
            types.append(TOKEN_NORMAL)
    meta: dict = {}
    if model.get("byte_fallback"):
        rank = {}
        for r, (a, b) in enumerate(merges):
            rank.setdefault(a + b, r)
        meta["tokenizer.ggml.model"] = "llama"
        meta["tokenizer.ggml.tokens"] = tokens
        meta["tokenizer.ggml.scores"] = GGUFValue([-float(rank.get(t, len(merges))) if ty == TOKEN_NORMAL else 0.0
                                                   for t, ty in zip(tokens, types)],
                                                  GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
        meta["tokenizer.ggml.add_space_prefix"] = True
    else:
        meta["tokenizer.ggml.model"] = "gpt2"
        meta["tokenizer.ggml.pre"] = "gpt-2"
        meta["tokenizer.ggml.tokens"] = tokens
        meta["tokenizer.ggml.merges"] = [f"{a} {b}" for a, b in merges]
    meta["tokenizer.ggml.token_type"] = GGUFValue(types, GGUFValueType.ARRAY, GGUFValueType.INT32)
    for key, value in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id),
                       ("padding_token_id", tokenizer.pad_id)):
        if value is not None:
            meta[f"tokenizer.ggml.{key}"] = value
    unk = model.get("unk_token")
    if unk is not None and unk in model["vocab"]:
        meta["tokenizer.ggml.unknown_token_id"] = model["vocab"][unk]
    meta["tokenizer.ggml.add_bos_token"] = bool(tokenizer.add_bos)
    meta["tokenizer.ggml.add_eos_token"] = False
    return meta
