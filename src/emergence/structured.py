"""Structured output: decoding constrained to a JSON Schema, a regular expression or a Lark
grammar, so that every output parses.

A `Constraint` is compiled once for a tokenizer (`compile_constraint`, or `json_schema`,
`regex`, `grammar`, `json_object`) and rides in `SamplingParams.constraint`. Each decoded row
starts its own `RowConstraint` from it (decode.new_row): at every step the row's logits are
masked to the tokens the grammar allows (`mask_logits`, before the penalties, temperature and
filters, greedy or sampled alike), and the chosen token advances it. Rows with different
constraints, or none, share one batch. The model's end tokens are allowed only where the
grammar may end; a grammar that can take nothing more ends the row ("stop") at once, and a row
that runs out of tokens first ends with "length": it is truncated, not valid output.

The token masks come from llguidance (Microsoft's Rust engine behind Guidance, also used by
vLLM, SGLang and llama.cpp). Chosen over xgrammar after measuring both on GPT-2's 50,257-token
vocabulary (the size of smollm2's 49,152) with the extraction schema of the tests, one thread:

    engine      token table   compile + matcher   mask per token (median / mean / max)
    llguidance  125 ms        0.6 ms              19 / 25 / 93 us
    xgrammar     31 ms        8.8 ms               5 /  6 / 25 us

Either mask is under 0.2% of a decoding step of smollm2-135m on this CPU (tens of ms; applying
it to the logits adds tens of us more, the same for both), so per-token speed does not decide
(bench/bench_structured.py measures the whole cost); what does: llguidance compiles a per-request schema 15x
faster (the server compiles one per request), takes Lark grammars as they are (xgrammar
takes only its EBNF dialect), reports a bad schema, regex or grammar with a precise message
(passed on to the user), and is one dependency-free wheel (xgrammar pulls triton and a TVM
runtime into a CPU-only install). outlines-core builds a regex DFA index per schema, slow to
compile for large vocabularies, and has no context-free grammars.

The engine's token table is built here from emergence's tokenizer (`token_bytes`), not from a
Hugging Face object: every id maps to the bytes it adds to the text. Byte-level BPE (GPT-2,
SmolLM2, emergence-6m) maps its printable stand-in characters back to bytes; SentencePiece
style vocabularies (llama2.c's stories260K, GGUF "llama" ones) write "▁" for a space and
<0xXX> pieces for raw bytes. Special tokens (BOS, EOS, <|endoftext|>) are never text. One
virtual end token past the vocabulary tells the mask where the grammar may end; the row's own
end ids (the model's EOS, stop_token_ids) are then allowed there.

Text detail: a SentencePiece decoder drops the leading space of the first generated token
("▁{" decodes to "{"); a constraint that starts with a space may then lose it in the text.
JSON and most patterns do not start with one.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .errors import InvalidArgument
from .tokenizer import Tokenizer

KINDS = ("json_schema", "json_object", "regex", "grammar")
# JSON as json.dumps writes it ("key": value, ...), no free whitespace: a small model cannot
# wander off into newlines. A schema's own "x-guidance" options override these.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_LABEL = {"json_schema": "JSON schema", "json_object": "JSON object", "regex": "regex", "grammar": "grammar"}


def _llg():
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise InvalidArgument(f"structured output needs the llguidance package ({e})") from None
    return llguidance


# ------------------------------------------------------------------------ the token table
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character -> the byte it stands for (bytes_to_unicode inverted)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {chr(b): b for b in keep}, 0
    for b in range(256):
        if b not in keep:
            out[chr(256 + extra)] = b
            extra += 1
    return out


def _decoder_steps(tokenizer: Tokenizer) -> list[dict]:
    decoder = json.loads(tokenizer.backend.to_str()).get("decoder") or {}

    def flat(d: dict) -> list[dict]:
        return [x for sub in d.get("decoders", []) for x in flat(sub)] if d.get("type") == "Sequence" else [d]
    return flat(decoder) if decoder else []


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer: Tokenizer) -> tuple[list[bytes], list[int]]:
    """(the bytes each id adds to the text, the special ids). Special tokens get b""; a lone
    0xFF byte token too (0xFF marks special tokens in llguidance's table, and is never UTF-8)."""
    backend = tokenizer.backend
    steps = _decoder_steps(tokenizer)
    types = {s.get("type") for s in steps}
    byte_level = "ByteLevel" in types
    fallback = "ByteFallback" in types
    replaces = [(s["pattern"]["String"], s["content"]) for s in steps
                if s.get("type") == "Replace" and "String" in s.get("pattern", {})]
    replaces += [(s.get("replacement", "\u2581"), " ") for s in steps if s.get("type") == "Metaspace"]
    if "WordPiece" in types:
        raise InvalidArgument("structured output does not support WordPiece (BERT) tokenizers")
    to_byte = _byte_decoder() if byte_level else None
    added = backend.get_added_tokens_decoder()
    table, special = [], []
    for i in range(tokenizer.vocab_size):
        token = added.get(i)
        piece = backend.id_to_token(i)
        if piece is None or (token is not None and token.special):
            table.append(b"")
            special.append(i)
            continue
        if token is not None:  # a user-defined added token: its text as it is
            data = token.content.encode()
        elif to_byte is not None:
            try:
                data = bytes(to_byte[c] for c in piece)
            except KeyError:  # not a byte-level piece: its text
                data = piece.encode()
        elif fallback and _BYTE_PIECE.fullmatch(piece):
            data = bytes([int(piece[3:5], 16)])
        else:
            for old, new in replaces:
                piece = piece.replace(old, new)
            data = piece.encode()
        table.append(b"" if data == b"\xff" else data)
    return table, special


class _TokenTable:
    """What llguidance.TokenizerWrapper reads: the byte table, the special ids, an end token
    (the virtual one at index vocab_size) and an encoder."""

    MARK = "\n"

    def __init__(self, tokenizer: Tokenizer) -> None:
        table, special = token_bytes(tokenizer)
        self.tokens = [*table, b"<|emergence:end|>"]
        self.special_token_ids = [*special, len(table)]
        self.eos_token_id = len(table)
        self.bos_token_id = tokenizer.bos_id
        self._tokenizer, self._table = tokenizer, table
        self._mark = tokenizer.encode(self.MARK, add_bos=False)
        self._ids: dict[bytes, int] = {}
        for i, data in enumerate(table):
            if data and data not in self._ids:
                self._ids[data] = i
        self._longest = max(map(len, self._ids), default=1)

    def __call__(self, text: str | bytes) -> list[int]:
        """The ids of exactly these bytes (llguidance forces them where the grammar leaves no
        choice): the tokenizer's own encoding where it gives them back; a SentencePiece one
        prepends "▁" to a text, so it encodes after a mark and drops the mark's ids; else the
        longest pieces of the table, greedily."""
        data = text if isinstance(text, bytes) else text.encode()
        text = data.decode("utf-8", errors="replace")
        ids = self._tokenizer.encode(text, add_bos=False)
        if self._bytes(ids) == data:
            return ids
        ids = self._tokenizer.encode(self.MARK + text, add_bos=False)
        if ids[:len(self._mark)] == self._mark and self._bytes(ids[len(self._mark):]) == data:
            return ids[len(self._mark):]
        return self._greedy(data)

    def _bytes(self, ids: list[int]) -> bytes:
        return b"".join(self._table[i] for i in ids)

    def _greedy(self, data: bytes) -> list[int]:
        out, at = [], 0
        while at < len(data):
            for n in range(min(self._longest, len(data) - at), 0, -1):
                token = self._ids.get(data[at:at + n])
                if token is not None:
                    out.append(token)
                    at += n
                    break
            else:  # a byte no token holds: the grammar cannot force it
                at += 1
        return out


_ENGINE_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def engine_tokenizer(tokenizer: Tokenizer):
    """llguidance's LLTokenizer for an emergence tokenizer, built once per tokenizer object."""
    with _LOCK:
        found = _ENGINE_TOKENIZERS.get(tokenizer)
        if found is None:
            llg = _llg()
            found = _ENGINE_TOKENIZERS[tokenizer] = llg.LLTokenizer(llg.TokenizerWrapper(_TokenTable(tokenizer)))
        return found


# ------------------------------------------------------------------------- constraints
def _one_line(message: str) -> str:
    """llguidance's message on one line: its first line, with the cause a regex error gives
    on a later "error: ..." line; positions in a regex refer to a wrapper, so they go."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    first = lines[0]
    cause = next((line[len("error:"):].strip() for line in lines[1:] if line.startswith("error:")), None)
    if cause:
        first = re.sub(r"^at \d+\(\d+\): ", "", first).removesuffix("regex parse error:").rstrip(" :")
        first = f"{first.replace(' (in regex)', '')}: {cause}"
    return first


class Constraint:
    """A compiled constraint for one tokenizer: immutable, shared by every row that uses it."""

    def __init__(self, kind: str, source: str, tokenizer: Tokenizer, grammar: str) -> None:
        llg = _llg()
        self.kind, self.source, self.tokenizer = kind, source, tokenizer
        self.vocab_size = tokenizer.vocab_size
        label = _LABEL[kind]
        matcher = llg.LLMatcher(engine_tokenizer(tokenizer), grammar, log_level=0)  # compiles
        if matcher.is_error():
            raise InvalidArgument(f"the {label} cannot be compiled: {_one_line(matcher.get_error())}")
        mask = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(mask, bitorder="little")[:self.vocab_size]
        if matcher.is_error() or (not allowed.any() and not matcher.is_accepting()):
            raise InvalidArgument(f"the {label} matches nothing this tokenizer can produce")
        self._prototype = matcher  # in its start state (compute_bitmask does not advance it)

    def __repr__(self) -> str:
        source = self.source if len(self.source) <= 60 else self.source[:57] + "..."
        return f"Constraint({self.kind}, {source!r})"

    def start(self) -> RowConstraint:
        """A fresh state for one row."""
        return RowConstraint(self, self._prototype.deep_copy())


class RowConstraint:
    """One row's place in its constraint's grammar."""

    def __init__(self, constraint: Constraint, matcher) -> None:
        self.constraint, self.matcher = constraint, matcher
        self.dead = False  # the mask allowed nothing (the row ends, truncated)

    def copy(self) -> RowConstraint:
        other = RowConstraint(self.constraint, self.matcher.deep_copy())
        other.dead = self.dead
        return other

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            self.dead = True

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()

    @property
    def finished(self) -> bool:
        """The grammar is complete and can take nothing more: the row ends here ("stop")."""
        return self.matcher.is_stopped() and not self.matcher.is_error()


def json_schema(schema: Mapping[str, Any] | str, tokenizer: Tokenizer) -> Constraint:
    """Output that is one JSON value valid under `schema` (a dict, or its JSON text)."""
    llg = _llg()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, Mapping):
        raise InvalidArgument(f"a JSON schema is a JSON object, got {type(schema).__name__}")
    text = json.dumps(dict(schema), ensure_ascii=False)
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(text, defaults=JSON_DEFAULTS)
    except (ValueError, TypeError) as e:
        raise InvalidArgument(f"the JSON schema cannot be compiled: {_one_line(str(e))}") from None
    return Constraint("json_schema", text, tokenizer, grammar)


def json_object(tokenizer: Tokenizer) -> Constraint:
    """Any JSON object (OpenAI's response_format json_object, Ollama's format "json")."""
    constraint = json_schema({"type": "object"}, tokenizer)
    constraint.kind = "json_object"
    return constraint


def regex(pattern: str, tokenizer: Tokenizer) -> Constraint:
    """Output that the regular expression matches whole (Rust regex syntax: no backreferences or lookaround)."""
    if not isinstance(pattern, str):
        raise InvalidArgument(f"a regex is a string, got {type(pattern).__name__}")
    return Constraint("regex", pattern, tokenizer, _llg().LLMatcher.grammar_from_regex(pattern))


def grammar(lark: str, tokenizer: Tokenizer) -> Constraint:
    """Output that the Lark grammar's `start` rule derives (llguidance's Lark dialect, which
    also takes %json {schema} and /regex/ terminals)."""
    if not isinstance(lark, str) or not lark.strip():
        raise InvalidArgument("a grammar is the non-empty text of a Lark grammar")
    return Constraint("grammar", lark, tokenizer, _llg().LLMatcher.grammar_from_lark(lark))


def compile_constraint(tokenizer: Tokenizer, *, json_schema: Mapping | str | None = None,
                       regex: str | None = None, grammar: str | None = None,
                       json_object: bool = False) -> Constraint | None:
    """The one constraint asked for (None when none is); more than one is refused."""
    given = [name for name, value in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar),
                                      ("json_object", json_object or None)) if value is not None]
    if len(given) > 1:
        raise InvalidArgument(f"give one constraint at a time, not {' and '.join(given)}")
    if json_schema is not None:
        return _json_schema(json_schema, tokenizer)
    if regex is not None:
        return _regex(regex, tokenizer)
    if grammar is not None:
        return _grammar(grammar, tokenizer)
    if json_object:
        return _json_object(tokenizer)
    return None


_json_schema, _regex, _grammar, _json_object = json_schema, regex, grammar, json_object


# --------------------------------------------------------------------------- masking
_EXECUTOR = None


def _executor():
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = _llg().LLExecutor()
    return _EXECUTOR


def mask_logits(logits: torch.Tensor, rows: Sequence[int], states: Sequence[RowConstraint],
                stop_ids: Sequence[Sequence[int]]) -> None:
    """In place: logits[rows[i]] keeps only the tokens states[i] allows next, and the end ids
    stop_ids[i] where its grammar may end. A state whose mask allows nothing is marked dead."""
    vocab = states[0].constraint.vocab_size
    words = (vocab + 1 + 31) // 32  # the virtual end token included
    bitmask = torch.empty(len(rows), words, dtype=torch.int32)
    if len(states) == 1:
        states[0].matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), words * 4)
    else:
        _executor().unsafe_compute_mask_ptr([(s.matcher, i) for i, s in enumerate(states)], bitmask.data_ptr(),
                                            words * 4, len(rows))
    words_ = bitmask.numpy().view(np.uint32)
    for i, state in enumerate(states):
        if state.matcher.is_error():  # a limit of the engine (ParserTooComplex...): the row ends, truncated
            state.dead = True
            words_[i] = 0
    end_word, end_bit = divmod(vocab, 32)
    ends = (words_[:, end_word] >> end_bit) & 1  # the grammar may end here: the row's end ids are allowed
    content = words_.copy()
    content[:, end_word] &= np.uint32((1 << end_bit) - 1)
    kept = {b: (ids, logits[b, ids].clone()) for b, end, ids in zip(rows, ends, stop_ids) if end and ids}
    blocked = np.unpackbits((~words_).view(np.uint8), axis=-1, bitorder="little").view(bool)[:, :vocab]
    if logits.device.type == "cpu":
        # numpy, one thread: torch would split a 50k-element fill over its thread pool, and on a
        # busy machine wait milliseconds for a descheduled thread (measured: 30 us vs 0.1-14 ms)
        view = logits.numpy()
        for i, b in enumerate(rows):
            np.copyto(view[b, :vocab], -np.inf, where=blocked[i])
    else:
        index = torch.tensor(list(rows), device=logits.device)
        logits[index, :vocab] = logits[index, :vocab].masked_fill(torch.from_numpy(blocked).to(logits.device),
                                                                  float("-inf"))
    for b, (ids, values) in kept.items():
        logits[b, ids] = values
    for i in np.flatnonzero(~content.any(axis=1)):
        if rows[i] not in kept:  # nothing allowed, not even an end: the row ends, truncated
            states[i].dead = True
