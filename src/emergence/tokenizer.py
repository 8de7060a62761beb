"""Text <-> token ids, on top of Hugging Face `tokenizers`.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the fast Rust backend) and adds the special-token
metadata a language model runtime needs: which ids are BOS / EOS / PAD and whether prompts
start with BOS. It can be built from

* a Hugging Face folder or `tokenizer.json` (`Tokenizer.load`),
* GPT-2's `vocab.json` + `merges.txt` (`Tokenizer.from_gpt2_files`),
* a llama2.c `tokenizer.bin` (`Tokenizer.from_llama2c`), converted to an equivalent BPE,
* a text corpus (`Tokenizer.train_bpe`),

and saved back as a folder that `transformers.AutoTokenizer` can read.

`StreamDecoder` turns token ids into text one id at a time for streaming output, holding
back bytes of a character that is still incomplete.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers

from .errors import CheckpointError, InvalidArgument

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
GPT2_EOT = "<|endoftext|>"
SPIECE_SPACE = "\u2581"  # "▁": SentencePiece's visible stand-in for a space

# llama2.c's export stores the SentencePiece control pieces with newlines around them.
_LLAMA2C_SPECIALS = (("<unk>", "<unk>"), ("\n<s>\n", "<s>"), ("\n</s>\n", "</s>"))
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")

# (eos, bos) pairs of well-known vocabularies, used only when a tokenizer.json comes without
# a tokenizer_config.json naming its special tokens.
_KNOWN_SPECIALS = (
    ("</s>", "<s>"),
    (GPT2_EOT, GPT2_EOT),
    ("<|end_of_text|>", "<|begin_of_text|>"),
    ("<eos>", "<bos>"),
)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens a model runtime needs.

    `encode` never adds EOS and adds BOS only when asked (`add_bos`, by default the
    tokenizer's own setting). Ids are plain Python ints.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        add_bos: bool = False,
    ) -> None:
        if not isinstance(backend, tokenizers.Tokenizer):
            raise InvalidArgument(f"backend must be a tokenizers.Tokenizer, got {type(backend).__name__}")
        # A tokenizer.json may carry truncation or padding (GPT-2's hub file truncates at 50
        # tokens); encode() must return every token of the text, so both are switched off.
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_id = self._special_id("bos_token", bos_token)
        self.eos_id = self._special_id("eos_token", eos_token)
        self.pad_id = self._special_id("pad_token", pad_token)
        if add_bos and self.bos_id is None:
            raise InvalidArgument("add_bos=True needs a bos_token")
        self.add_bos = bool(add_bos)
        # Fixed here: the backend is treated as frozen once wrapped.
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    def _special_id(self, name: str, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise InvalidArgument(f"{name} {token!r} is not in the vocabulary")
        return token_id

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"pad_id={self.pad_id}, add_bos={self.add_bos})"
        )

    # -- text <-> ids ---------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS first if `add_bos` (default: `self.add_bos`), never EOS."""
        if not isinstance(text, str):
            raise InvalidArgument(f"encode() takes a str, got {type(text).__name__}")
        add_bos = self.add_bos if add_bos is None else add_bos
        if add_bos and self.bos_id is None:
            raise InvalidArgument("this tokenizer has no BOS token")
        # The backend's post-processor is ignored (add_special_tokens=False): BOS is our call.
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (BOS, EOS, ...) are left out unless asked for."""
        return self.backend.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, id: int) -> str:
        """The raw vocabulary string of one id ("Ġthe", "▁the", "<0x0A>"), e.g. for logprob tables."""
        piece = self.backend.id_to_token(self._check_id(id))
        if piece is None:  # a hole in the id range (possible with added tokens)
            raise InvalidArgument(f"token id {id} is not in the vocabulary")
        return piece

    def stream_decoder(self, *, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def _check_id(self, token_id: int) -> int:
        try:
            token_id = operator.index(token_id)  # accepts numpy/torch integer scalars, not floats
        except TypeError:
            raise InvalidArgument(f"token ids must be integers, got {type(token_id).__name__}") from None
        if not 0 <= token_id < self.vocab_size:
            # The backend would silently drop it, hiding a model / tokenizer vocabulary mismatch.
            raise InvalidArgument(f"token id {token_id} is out of range for vocabulary size {self.vocab_size}")
        return token_id

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        if isinstance(ids, (str, bytes)):
            raise InvalidArgument("decode() takes a sequence of token ids, not text")
        return [self._check_id(i) for i in ids]

    def fingerprint(self) -> str:
        """A short hash of everything that decides the ids: vocabulary, merges, normalizer,
        pre-tokenizer and special tokens. Token shards record it, so that a model is never
        trained on ids from another tokenizer."""
        backend = json.loads(self.backend.to_str())
        backend.pop("truncation", None), backend.pop("padding", None), backend.pop("post_processor", None)
        state = json.dumps([backend, self.bos_token, self.eos_token, self.add_bos], sort_keys=True)
        return hashlib.sha256(state.encode()).hexdigest()[:16]

    # -- saving and loading ---------------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> None:
        """Write `tokenizer.json` + `tokenizer_config.json` (Hugging Face layout) into `folder`."""
        folder = Path(folder)
        # Work on a copy: the post-processor set below is only for other readers of the file
        # (transformers, plain `tokenizers`), who add special tokens through it.
        backend = tokenizers.Tokenizer.from_str(self.backend.to_str())
        backend.post_processor = self._export_post_processor()
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": getattr(self.backend.model, "unk_token", None),
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            # transformers would otherwise "clean up" spaces (" ." -> ".") and decode differently.
            "clean_up_tokenization_spaces": False,
        }
        try:
            folder.mkdir(parents=True, exist_ok=True)
            backend.save(str(folder / TOKENIZER_FILE))
            text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
            (folder / CONFIG_FILE).write_text(text, encoding="utf-8")
        except OSError as e:
            raise CheckpointError(f"cannot write tokenizer to {folder}: {e.strerror or e}") from None
        except Exception as e:  # tokenizers reports I/O failures as a bare Exception
            raise CheckpointError(f"cannot write tokenizer to {folder}: {_one_line(e)}") from None

    def _export_post_processor(self) -> processors.PostProcessor | None:
        if self.add_bos:
            bos = self.bos_token
            return processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, self.bos_id)],
            )
        # Without BOS the file must not add any token; GPT-2's ByteLevel one only fixes offsets.
        current = self.backend.post_processor
        return current if isinstance(current, processors.ByteLevel) else None

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer from a folder or a file.

        A folder holds `tokenizer.json` (special tokens and add_bos from `tokenizer_config.json`
        when present), or GPT-2's `vocab.json` + `merges.txt`, or a llama2.c `tokenizer.bin`.
        A file is a `tokenizer.json` (any name; a `tokenizer_config.json` beside it is used)
        or a llama2.c `.bin`.
        """
        path = Path(path)
        if path.is_dir():
            if (path / TOKENIZER_FILE).is_file():
                return cls._load_hf(path / TOKENIZER_FILE, path / CONFIG_FILE)
            if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                return cls.from_gpt2_files(path / "vocab.json", path / "merges.txt")
            if (path / "tokenizer.bin").is_file():
                return cls.from_llama2c(path / "tokenizer.bin")
            raise CheckpointError(
                f"no tokenizer in {path}: expected tokenizer.json, vocab.json + merges.txt, or tokenizer.bin"
            )
        if path.is_file():
            if path.suffix == ".bin":
                return cls.from_llama2c(path)
            return cls._load_hf(path, path.with_name(CONFIG_FILE))
        raise CheckpointError(f"tokenizer not found: {path}")

    @classmethod
    def _load_hf(cls, tokenizer_json: Path, config_json: Path) -> Tokenizer:
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # tokenizers raises a bare Exception carrying serde's message
            raise CheckpointError(f"cannot read {tokenizer_json}: {_one_line(e)}") from None
        config = _read_json(config_json) if config_json.is_file() else {}
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_json}: expected a JSON object")
        if "bos_token" in config or "eos_token" in config:
            bos = _config_token(config, "bos_token", config_json)
            eos = _config_token(config, "eos_token", config_json)
        else:
            bos, eos = _guess_specials(backend)
        pad = _config_token(config, "pad_token", config_json)
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = _post_processor_adds(backend, bos)
        try:
            return cls(backend, bos_token=bos, eos_token=eos, pad_token=pad, add_bos=bool(add_bos))
        except InvalidArgument as e:
            raise CheckpointError(f"{config_json}: {e}") from None

    # -- constructors for specific formats ------------------------------------------------

    @classmethod
    def from_gpt2_files(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike) -> Tokenizer:
        """GPT-2 byte-level BPE from `vocab.json` + `merges.txt` (with or without "#version")."""
        vocab = _read_json(Path(vocab_json))
        if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
            raise CheckpointError(f"{vocab_json}: expected a JSON object mapping tokens to ids")
        merges = _read_merges(Path(merges_txt))
        try:
            model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False)
        except Exception as e:  # e.g. a merge naming a token that is not in vocab.json
            raise CheckpointError(f"inconsistent {vocab_json} / {merges_txt}: {_one_line(e)}") from None
        backend = tokenizers.Tokenizer(model)
        # The same pipeline as GPT-2's tokenizer.json on the Hugging Face hub.
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        if GPT2_EOT not in vocab:  # another byte-level vocabulary: no known special token
            return cls(backend)
        backend.add_special_tokens([AddedToken(GPT2_EOT, special=True)])
        return cls(backend, bos_token=GPT2_EOT, eos_token=GPT2_EOT)

    @classmethod
    def from_llama2c(cls, path: str | os.PathLike) -> Tokenizer:
        """A llama2.c `tokenizer.bin`, as an equivalent BPE with byte fallback.

        Built like Hugging Face's (legacy) Llama tokenizer, so it encodes as SentencePiece
        and llama2.c do: "▁" is prepended to non-empty text, spaces become "▁", and merges
        are ranked by the score of the merged piece.
        """
        pieces, scores = _read_llama2c(Path(path))
        vocab: dict[str, int] = {}
        for i, piece in enumerate(pieces):
            if piece in vocab:
                raise CheckpointError(f"{path}: piece {piece!r} appears twice (ids {vocab[piece]} and {i})")
            vocab[piece] = i
        model = models.BPE(
            vocab=vocab,
            merges=_merges_from_scores(pieces, scores),
            unk_token="<unk>",
            fuse_unk=True,
            byte_fallback=True,  # characters missing from the vocabulary become <0xXX> pieces
        )
        backend = tokenizers.Tokenizer(model)
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend(SPIECE_SPACE), normalizers.Replace(" ", SPIECE_SPACE)]
        )
        backend.decoder = decoders.Sequence(
            [
                decoders.Replace(SPIECE_SPACE, " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),  # undo the prepended "▁"
            ]
        )
        specials = [AddedToken(name, special=True, normalized=False) for _, name in _LLAMA2C_SPECIALS]
        backend.add_special_tokens(specials)
        return cls(backend, bos_token="<s>", eos_token="</s>", add_bos=True)

    @classmethod
    def train_bpe(
        cls,
        files: Sequence[str | os.PathLike],
        vocab_size: int,
        *,
        special_tokens: Sequence[str] = (GPT2_EOT,),
    ) -> Tokenizer:
        """Train a byte-level BPE (GPT-2 style) on text files; EOS is the first special token.

        The vocabulary holds the special tokens, all 256 bytes, then learned merges up to
        `vocab_size` (fewer if the text runs out of pairs to merge).
        """
        special_tokens = list(special_tokens)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if not isinstance(vocab_size, int) or vocab_size < len(alphabet) + len(special_tokens):
            raise InvalidArgument(
                f"vocab_size must be at least {len(alphabet) + len(special_tokens)} "
                f"(256 bytes + {len(special_tokens)} special tokens), got {vocab_size}"
            )
        paths = [str(f) for f in files]
        if not paths:
            raise InvalidArgument("train_bpe() needs at least one text file")
        for p in paths:
            if not os.path.isfile(p):
                raise InvalidArgument(f"training file not found: {p}")
        backend, trainer = _bpe_trainer(vocab_size, special_tokens, show_progress=False)
        try:
            backend.train(paths, trainer)
        except Exception as e:  # e.g. a file that is not UTF-8 text
            raise InvalidArgument(f"cannot train on {paths}: {_one_line(e)}") from None
        return cls(backend, eos_token=special_tokens[0] if special_tokens else None)

    @classmethod
    def train_bpe_from_texts(cls, texts: Iterable[str], vocab_size: int, *,
                             special_tokens: Sequence[str] = (GPT2_EOT,), show_progress: bool = False) -> Tokenizer:
        """`train_bpe` over documents already in memory (each a separate text: no merge spans two)."""
        special_tokens = list(special_tokens)
        minimum = len(pre_tokenizers.ByteLevel.alphabet()) + len(special_tokens)
        if not isinstance(vocab_size, int) or vocab_size < minimum:
            raise InvalidArgument(f"vocab_size must be at least {minimum} "
                                  f"(256 bytes + {len(special_tokens)} special tokens), got {vocab_size}")
        backend, trainer = _bpe_trainer(vocab_size, special_tokens, show_progress=show_progress)
        backend.train_from_iterator(texts, trainer)
        return cls(backend, eos_token=special_tokens[0] if special_tokens else None)


def _bpe_trainer(vocab_size: int, special_tokens: list[str], *, show_progress: bool):
    """An empty byte-level BPE (GPT-2 style) and the trainer that fills it."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable, even unseen ones
        show_progress=show_progress,
    )
    return backend, trainer


class StreamDecoder:
    """Incremental detokenization: push ids one at a time, get back only the new text.

    Text is held back while it ends in an incomplete UTF-8 sequence (an emoji split over
    several byte tokens), so no chunk carries a U+FFFD for bytes that are still coming.
    All `push()` results plus `flush()` concatenate to `tokenizer.decode(all ids)`.

    Decoding only a short window keeps each step cheap: the window holds the ids of the last
    emitted chunk (context for decoders such as SentencePiece's, which strip a leading space
    and so need to see the previous token) followed by the ids not yet emitted.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []  # the window
        self._read = 0  # _ids[:_read] is context whose text was already returned
        self._prefix = ""  # decode(_ids[:_read])

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (possibly "")."""
        self._ids.append(self._tokenizer._check_id(token_id))
        text = self._decode(self._ids)
        # U+FFFD at the end is (almost always) a character whose remaining bytes are still to
        # come; a genuine one is released by the next push() or flush().
        if len(text) <= len(self._prefix) or text.endswith("\ufffd"):
            return ""
        return self._emit(text)

    def copy(self) -> StreamDecoder:
        """A decoder in the same state (for a sequence that forks)."""
        other = StreamDecoder(self._tokenizer, skip_special_tokens=self._skip_special_tokens)
        other._ids, other._read, other._prefix = list(self._ids), self._read, self._prefix
        return other

    def flush(self) -> str:
        """End the sequence: return any text still held back (an unfinished character decodes
        to U+FFFD, as in `decode()`) and start afresh for a new sequence."""
        text = self._decode(self._ids)
        rest = text[len(self._prefix) :]
        self._ids, self._read, self._prefix = [], 0, ""
        return rest

    def _emit(self, text: str) -> str:
        # The decoders built here only ever extend the text of a window, so the window's
        # previous text is a prefix of the new one.
        new = text[len(self._prefix) :]
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        self._prefix = self._decode(self._ids)
        return new

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.backend.decode(ids, skip_special_tokens=self._skip_special_tokens)


# -- helpers --------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    """The first line of an error message (the CLI prints errors on one line)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _read_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"tokenizer file not found: {path}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {_one_line(e)}") from None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"tokenizer file not found: {path}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text") from None
    merges = []
    # split("\n"), not splitlines(): the latter also breaks on characters like U+0085.
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise CheckpointError(f"{path}, line {number}: expected two tokens separated by one space")
        merges.append((parts[0], parts[1]))
    return merges


def _config_token(config: dict, key: str, path: Path) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken object."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise CheckpointError(f"{path}: {key} must be a string")
    return value


def _guess_specials(backend: tokenizers.Tokenizer) -> tuple[str | None, str | None]:
    """(bos, eos) from well-known special tokens, for a tokenizer.json without a config."""
    specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    for eos, bos in _KNOWN_SPECIALS:
        if eos in specials:
            return (bos if bos in specials else None), eos
    return None, None


def _post_processor_adds(backend: tokenizers.Tokenizer, bos: str | None) -> bool:
    """Whether the tokenizer.json's own post-processor puts BOS in front of the text."""
    if bos is None:
        return False
    try:
        with_specials = backend.encode("a", add_special_tokens=True).ids
        plain = backend.encode("a", add_special_tokens=False).ids
    except Exception:  # e.g. a word-level vocabulary without "a" and without an unknown token
        return False
    return len(with_specials) > len(plain) and with_specials[0] == backend.token_to_id(bos)


def _read_llama2c(path: Path) -> tuple[list[str], list[float]]:
    """Pieces (spaces as "▁", specials renamed) and scores of a llama2.c tokenizer.bin.

    Layout: int32 max_token_length, then until EOF records of float32 score, int32 length,
    that many bytes of UTF-8. The file is read record by record and every length is checked
    against what is left, so a corrupt file fails fast without a large allocation.
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"tokenizer file not found: {path}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a valid llama2.c tokenizer: {why}")

    pieces: list[str] = []
    scores: list[float] = []
    with f:
        size = os.fstat(f.fileno()).st_size
        header = f.read(4)
        if len(header) < 4:
            raise bad("file too short for the header")
        (max_len,) = struct.unpack("<i", header)
        if not 0 < max_len <= size:
            raise bad(f"max_token_length {max_len} is impossible")
        offset = 4
        while offset < size:
            record = f.read(8)
            if len(record) < 8:
                raise bad(f"truncated record header at byte {offset}")
            score, length = struct.unpack("<fi", record)
            offset += 8
            if not 0 < length <= max_len:
                raise bad(f"piece {len(pieces)} has length {length} (max_token_length is {max_len})")
            if length > size - offset:
                raise bad(f"piece {len(pieces)} runs past the end of the file")
            if not math.isfinite(score):
                raise bad(f"piece {len(pieces)} has score {score}")
            raw = f.read(length)
            if len(raw) < length:  # the file shrank while being read
                raise bad(f"truncated piece at byte {offset}")
            offset += length
            try:
                pieces.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise bad(f"piece {len(pieces)} is not UTF-8") from None
            scores.append(score)

    if [p for p, _ in _LLAMA2C_SPECIALS] != pieces[:3]:
        raise bad("ids 0, 1, 2 must be <unk>, <s>, </s>")
    names = [name for _, name in _LLAMA2C_SPECIALS]
    pieces = names + [p.replace(" ", SPIECE_SPACE) for p in pieces[3:]]
    return pieces, scores


def _merges_from_scores(pieces: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges that reproduce SentencePiece / llama2.c score-greedy merging.

    Those repeatedly merge the adjacent pair whose merged piece has the highest score, the
    leftmost pair on a tie. Every split of a piece into two vocabulary pieces becomes a merge,
    ranked by the merged piece's score. Llama's whitespace runs ("▁▁", "▁▁▁", ...) all share
    one score; ranking longer left parts first makes a run grow from its left end, which is
    what leftmost-first merging does (the same order as transformers' converter).
    """
    # Control and byte-fallback pieces are never made by merging text.
    mergeable = {p: i for i, p in enumerate(pieces) if i >= len(_LLAMA2C_SPECIALS) and not _BYTE_PIECE.fullmatch(p)}
    ranked = []
    for piece, i in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-scores[i], -len(left), -len(right), i, left, right))
    ranked.sort(key=lambda r: r[:4])
    return [(left, right) for *_, left, right in ranked]
