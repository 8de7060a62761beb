"""Corpus -> token shards: the first arrow of the training path.

`prepare_corpus` reads text files (`.txt`, or `.jsonl` with a "text" field per line), splits
them into documents, tokenizes them in parallel (the `tokenizers` backend spreads a batch
over every core), and writes the ids as flat binary shards that training memory-maps:

    DIR/manifest.json          what is here: tokenizer hash, dtype, splits, shards, sources
    DIR/tokenizer/             the tokenizer the ids come from (Hugging Face layout)
    DIR/train-00000.bin ...    uint16 ids when the vocabulary fits in 16 bits, else uint32
    DIR/val-00000.bin ...

Documents are joined with the EOS token after each one, so a model learns where a text ends
(and start with BOS when the tokenizer adds one to its inputs, as llama2.c's does).
A `.txt` file holds one document, or several separated by the tokenizer's EOS string (as
TinyStories separates stories with `<|endoftext|>`).

The validation split is held out per source file: the last documents of each file, about
`val_fraction` of its tokens (a file that is one long document is cut at that point).
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import CheckpointError, InvalidArgument
from ..progress import Progress, human
from ..tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = "emergence-token-shards"
VERSION = 1
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 100_000_000
_BATCH_BYTES = 4 << 20  # tokenize about 4 MB of text per backend call (one progress step)


# ------------------------------------------------------------------------- reading text
_invalid = threading.local()


def _count_invalid(error: UnicodeDecodeError) -> tuple[str, int]:
    _invalid.count += 1
    return ("\ufffd" if _invalid.mode == "replace" else "", error.end)


codecs.register_error("emergence-count", _count_invalid)


def decode_text(data: bytes, mode: str = "replace") -> tuple[str, int]:
    """bytes -> (text, number of invalid UTF-8 sequences); each is replaced by U+FFFD or skipped."""
    if mode not in ("replace", "skip"):
        raise InvalidArgument(f"invalid-UTF-8 mode must be 'replace' or 'skip', got {mode!r}")
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        _invalid.count, _invalid.mode = 0, mode
        return data.decode("utf-8", errors="emergence-count"), _invalid.count


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files named or matched by glob patterns (folders contribute their .txt/.jsonl files)."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        for m in map(Path, matches):
            if m.is_dir():
                files += sorted(p for p in m.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
            elif m.is_file():
                files.append(m)
            else:
                raise InvalidArgument(f"no such file: {m}")
        if not matches:
            raise InvalidArgument(f"no files matched {pattern!r}")
    if not files:
        raise InvalidArgument(f"no text files found in {', '.join(patterns) or 'nothing'}")
    return list(dict.fromkeys(files))


def read_documents(path: Path, eos_text: str | None, invalid_utf8: str = "replace") -> tuple[list[str], int]:
    """A file's documents and its count of invalid UTF-8 sequences."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidArgument(f"cannot read {path}: {e.strerror}") from None
    text, invalid = decode_text(data, invalid_utf8)
    if path.suffix == ".jsonl":
        docs = []
        # split("\n"), not splitlines(): the latter also breaks on U+2028, U+0085... inside a string.
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidArgument(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise InvalidArgument(f"{path}:{n}: expected an object with a \"text\" string")
            docs.append(row["text"])
    else:
        docs = text.split(eos_text) if eos_text and eos_text in text else [text]
    return [d.strip() for d in docs if d.strip()], invalid


# ------------------------------------------------------------------------------ writing
@dataclass
class _ShardWriter:
    """Appends ids to `{split}-NNNNN.bin` files of at most `shard_tokens` ids each."""

    folder: Path
    split: str
    dtype: np.dtype
    shard_tokens: int
    shards: list[dict] = field(default_factory=list)
    _file: object = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, ids = ids[:room], ids[room:]
            self._file.write(part.astype(self.dtype, copy=False).tobytes())
            self.shards[-1]["tokens"] += len(part)

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)


def _split_point(doc_tokens: list[int], val_fraction: float) -> tuple[int, int]:
    """(first validation document, tokens of the document cut in two or 0).

    Validation takes whole documents from the end until it holds >= val_fraction of the
    tokens; a source with a single document is cut inside it instead.
    """
    total = sum(doc_tokens)
    want = round(total * val_fraction)
    if want == 0:
        return len(doc_tokens), 0
    if len(doc_tokens) == 1:  # document 0: its first total-want tokens train (at least one), the rest validate
        return 0, total - min(want, total - 1)
    held, i = 0, len(doc_tokens)
    while i > 1 and held < want:  # keep at least one training document
        i -= 1
        held += doc_tokens[i]
    return i, 0


def prepare_corpus(inputs: Sequence[str], tokenizer: Tokenizer, out: str | Path, *, val_fraction: float = 0.05,
                   invalid_utf8: str = "replace", shard_tokens: int = DEFAULT_SHARD_TOKENS,
                   show_progress: bool = True) -> dict:
    """Tokenize `inputs` into shards in `out`; returns the manifest (also written as manifest.json)."""
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidArgument(f"val fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens <= 0:
        raise InvalidArgument(f"shard size must be positive, got {shard_tokens}")
    if tokenizer.eos_id is None:
        raise InvalidArgument("the tokenizer has no EOS token to separate documents with")
    files = expand_inputs(inputs)
    out = Path(out)
    if (out / MANIFEST).exists() or any(out.glob("*.bin")):
        raise InvalidArgument(f"{out} already holds token shards; choose an empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidArgument(f"cannot create the folder {out}: {e.strerror}") from None
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}
    total_bytes = sum(f.stat().st_size for f in files)
    progress = Progress(total_bytes, "B", desc="tokenizing", enabled=show_progress)
    sources = []
    eos = tokenizer.eos_id
    tokens_done = 0
    try:
        for path in files:
            docs, invalid = read_documents(path, tokenizer.eos_token, invalid_utf8)
            ids_per_doc = []
            bytes_per_char = path.stat().st_size / max(1, sum(len(d) for d in docs))
            for batch in _batches(docs):
                encoded = tokenizer.backend.encode_batch(batch, add_special_tokens=False)
                ids_per_doc += [np.asarray(e.ids, dtype=np.uint32) for e in encoded]  # 4 bytes a token
                tokens_done += sum(len(e.ids) + 1 for e in encoded)
                progress.update(sum(len(d) for d in batch) * bytes_per_char, tokens=human(tokens_done))
            bos = np.asarray([tokenizer.bos_id] if tokenizer.add_bos else [], dtype=np.uint32)  # llama2.c: BOS first
            end = np.asarray([eos], dtype=np.uint32)
            lengths = [len(bos) + len(ids) + 1 for ids in ids_per_doc]  # + EOS
            first_val, cut = _split_point(lengths, val_fraction)
            for i, ids in enumerate(ids_per_doc):
                doc = np.concatenate([bos, ids, end])
                if cut and i == 0:
                    writers["train"].write(doc[:cut])
                    writers["val"].write(doc[cut:])
                else:
                    writers["train" if i < first_val else "val"].write(doc)
            if invalid:
                print(f"{path}: {invalid} invalid UTF-8 sequence(s) "
                      f"{'replaced by U+FFFD' if invalid_utf8 == 'replace' else 'skipped'}", flush=True)
            sources.append({"path": str(path), "bytes": path.stat().st_size, "sha256": _sha256(path),
                            "documents": len(docs), "tokens": sum(lengths), "invalid_utf8": invalid,
                            "val_documents": (len(docs) - first_val) if not cut else 1})
        if writers["train"].tokens == 0:
            raise InvalidArgument(f"the corpus is empty: {len(files)} file(s) hold no text")
    except BaseException:
        # A failed prepare leaves no partial shards (a rerun into `out` would be refused), and
        # prints no progress line: the error is the one line to report.
        progress.enabled = False
        for w in writers.values():
            w.close()
            for s in w.shards:
                (out / s["file"]).unlink(missing_ok=True)
        raise
    finally:
        for w in writers.values():
            w.close()
        progress.close()
    return _finish(out, tokenizer, dtype, writers, val_fraction, sources)


def _finish(out: Path, tokenizer: Tokenizer, dtype: np.dtype, writers: dict, val_fraction: float,
            sources: list[dict]) -> dict:
    tokenizer.save(out / TOKENIZER_DIR)
    manifest = {
        "format": FORMAT, "version": VERSION,
        "tokenizer": {"hash": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
        "dtype": dtype.name, "val_fraction": val_fraction,
        "splits": {s: {"tokens": w.tokens, "shards": w.shards} for s, w in writers.items()},
        "sources": sources,
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)  # the manifest appears last: a folder without one is incomplete
    return manifest


def write_token_shards(splits: dict[str, np.ndarray], tokenizer: Tokenizer, out: str | Path, *,
                       source: str, shard_tokens: int = DEFAULT_SHARD_TOKENS) -> dict:
    """Shards of token ids made elsewhere (a teacher model's samples: ids, not text, so nothing
    is re-tokenized): splits {"train": (N,), "val": (M,)} of ids < tokenizer.vocab_size, written
    as prepare_corpus writes them; `source` names where they came from in the manifest."""
    out = Path(out)
    if (out / MANIFEST).exists() or any(out.glob("*.bin")):
        raise InvalidArgument(f"{out} already holds token shards; choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}
    for name, ids in splits.items():
        if name not in writers:
            raise InvalidArgument(f"unknown split {name!r}; use {', '.join(SPLITS)}")
        writers[name].write(np.asarray(ids))
        writers[name].close()
    total = sum(len(ids) for ids in splits.values())
    val = len(splits.get("val", ()))
    return _finish(out, tokenizer, dtype, writers, val / total if total else 0.0,
                   [{"path": source, "tokens": total, "documents": None}])


def _batches(docs: list[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------ reading
class TokenShards:
    """The shards of a prepared folder, memory-mapped; `split(name)` -> list of 1-D id arrays."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise CheckpointError(f"{self.folder} holds no token shards ({MANIFEST} missing; run `emergence prepare`)")
        try:
            self.manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
        if self.manifest.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not an emergence token-shard manifest")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.tokenizer_hash: str = self.manifest["tokenizer"]["hash"]
        self.vocab_size: int = self.manifest["tokenizer"]["vocab_size"]

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.folder / TOKENIZER_DIR)

    def split(self, name: str) -> list[np.ndarray]:
        arrays = []
        for shard in self.manifest["splits"][name]["shards"]:
            path = self.folder / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                raise CheckpointError(f"shard {path} is missing or not {expected} bytes (an interrupted prepare?)")
            if shard["tokens"]:
                arrays.append(np.memmap(path, dtype=self.dtype, mode="r"))
        return arrays

    def tokens(self, name: str) -> int:
        return self.manifest["splits"][name]["tokens"]

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Refuse unless the ids come from `tokenizer` (the manifest's hash is its fingerprint)."""
        if self.tokenizer_hash != tokenizer.fingerprint():
            raise InvalidArgument(f"{self.folder}: the shards were made with tokenizer {self.tokenizer_hash}, but the "
                                  f"model's tokenizer has fingerprint {tokenizer.fingerprint()}: their ids are not the "
                                  f"model's (prepare them with `emergence prepare ... --tokenizer MODEL`)")

    def ids(self, name: str, limit: int | None = None) -> torch.Tensor:
        """(N,) int64 ids of a split (at most its first `limit`), its shards in order: documents
        joined by EOS (and started by BOS when the tokenizer adds one), as training reads them."""
        import torch

        parts, need = [], limit
        for array in self.split(name):
            parts.append(np.asarray(array if need is None else array[:need], dtype=np.int64))
            if need is not None:
                need -= len(parts[-1])
                if need == 0:
                    break
        return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.long)

    def calibration(self, n_seqs: int, seq_len: int) -> tuple[torch.Tensor, int]:
        """(n_seqs, seq_len) ids: the start of the *train* split, cut into sequences (for GPTQ);
        also the number of documents those tokens reach into."""
        need = n_seqs * seq_len
        ids = self.ids("train", need)
        if len(ids) < need:
            raise InvalidArgument(f"the train split of {self.folder} holds {len(ids)} tokens, fewer than {need} "
                                  f"asked for calibration")
        eos = self.manifest["tokenizer"]["eos_id"]
        return ids.reshape(n_seqs, seq_len), int((ids[:-1] == eos).sum()) + 1

    def val_sources(self, val: torch.Tensor) -> list[dict] | None:
        """What each source file gave to the splits, in order: {path, documents, cut (one
        document, cut in two), val_documents, val_tokens, train_tokens}, `val` being the val
        split's ids. Every held-out document (or the held-out tail of a cut one) ends with EOS,
        which is how its tokens are counted; None when the counts do not add up."""
        ends = (val == self.manifest["tokenizer"]["eos_id"]).nonzero().flatten().tolist()
        rows, done, start = [], 0, 0
        for src in self.manifest["sources"]:
            n = src["val_documents"]
            if done + n > len(ends):
                return None
            end = ends[done + n - 1] + 1 if n else start
            rows.append({"path": src["path"], "documents": src["documents"],
                         "cut": src["documents"] == 1 and n == 1, "val_documents": n,
                         "val_tokens": end - start, "train_tokens": src["tokens"] - (end - start)})
            done, start = done + n, end
        return rows if start == len(val) and done == len(ends) else None
