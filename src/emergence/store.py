"""The local model store: models kept under short names, like Ollama's.

    emergence import path/to/hf-folder mymodel        # or a GGUF file
    emergence create story -f Modelfile               # FROM + PARAMETER / SYSTEM / TEMPLATE / DRAFT
    emergence list | show story | cp story s2 | rm s2 | run story "Once upon a time"
    emergence.load("story")                           # a store name works wherever a model is taken

Layout (root: $EMERGENCE_HOME, default ~/.emergence):

    root/models/<name>:<tag>/   one entry: the model's files and manifest.json. Either a
                                Hugging Face layout folder (config.json, model.safetensors or
                                shards + index, tokenizer files) or one GGUF file, model.gguf
    root/tmp/<pid>-<random>/    entries being written; never listed

manifest.json holds {"schema", "name", "source", "layout" ("hf" or "gguf"), "format", "details"
{architecture, parameter_count, context_length}, "parameters" (default SamplingParams fields),
"system", "template", "created" (UTC, ISO 8601), "files" {file name: {"sha256", "size"}}}.
Format and details are read from the files' headers when the entry is written (no weights
are loaded), so `list` and `show` only read manifests.

Names follow Ollama's name[:tag]: name and tag are lowercase letters, digits, '.', '_' and
'-', starting with a letter or digit; the tag defaults to "latest".

Writes are atomic. import / create / cp build the whole entry (files, then manifest) in a
fresh folder under root/tmp and rename it into root/models at the end, so a failed or
interrupted write never shows up in `list`; its temporary folder is removed on failure, and
one left by a killed process (its pid no longer alive) is removed by the next write.
Writing a name that exists replaces it: the new entry is complete before it is swapped in
with one atomic exchange (renameat2 RENAME_EXCHANGE, Linux); where that call is missing,
two renames leave the name absent for an instant, never half-written. rm renames the entry
away before deleting it.

Files: import and create from a path or a packaged model copy the files (hashing them while
copying); create FROM an entry of the store, and cp, hard-link the entry's files when the
file system allows (and copy otherwise). Store files are made read-only, as they are never
modified in place: a linked file is only ever shared, never changed.

A Modelfile's FROM may name another entry; the new entry then inherits its parameters,
system prompt and template, each overridden by the Modelfile's own (PARAMETER lines replace
the same parameter; any PARAMETER stop replaces the inherited stop list).

Resolution of a model argument: `resolve_model` is the one function that turns what a user
typed (`emergence.load`, --model, a command's MODEL, `serve`, `pretrain --init`, FROM) into a
model: an existing path first, then a store name, then a model packaged with emergence. A
store model brings its PARAMETERs, SYSTEM and TEMPLATE wherever its name is used (generate,
chat, run, serve), as Ollama's do.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .config import Config
from .errors import CheckpointError, InvalidArgument
from .files import fsync_folder

HOME_ENV = "EMERGENCE_HOME"
DEFAULT_TAG = "latest"
MANIFEST = "manifest.json"
GGUF_FILE = "model.gguf"
VERIFIED = ".verified"  # the size, modification time and inode of each file when its sha256 last matched
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")  # what an entry's files may be called
SCHEMA = 1
_PART = r"[a-z0-9][a-z0-9._-]*"
_NAME = re.compile(rf"({_PART})(?::({_PART}))?")
_MAX_NAME = 200
_CHUNK = 4 << 20
# Files of a Hugging Face folder that emergence reads besides config.json and the weights.
_HF_OPTIONAL = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.bin",
                "special_tokens_map.json", "generation_config.json", "chat_template.jinja", "chat_template.json")


def store_root() -> Path:
    """$EMERGENCE_HOME when set (and not empty), else ~/.emergence; read at every call."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".emergence").expanduser()


# ----------------------------------------------------------------------------------- names
@dataclass(frozen=True, order=True)
class ModelName:
    """An Ollama-style model name: `name:tag` (tag "latest" when omitted)."""

    name: str
    tag: str = DEFAULT_TAG

    @classmethod
    def parse(cls, text: str) -> ModelName:
        """`name` or `name:tag`; anything else raises InvalidArgument (one line)."""
        m = _NAME.fullmatch(text) if isinstance(text, str) and len(text) <= _MAX_NAME else None
        if m is None:
            raise InvalidArgument(f"invalid model name {text!r}: use lowercase letters, digits, '.', '_' and '-' "
                                  "(starting with a letter or digit), with an optional ':tag' of the same kind")
        return cls(m.group(1), m.group(2) or DEFAULT_TAG)

    @classmethod
    def valid(cls, text: str) -> bool:
        try:
            cls.parse(text)
        except InvalidArgument:
            return False
        return True

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


# ------------------------------------------------------------------------------- Modelfile
# Modelfile PARAMETER name -> (SamplingParams field, value type). Ollama's names and ours.
PARAMETERS: dict[str, tuple[str, type]] = {
    "temperature": ("temperature", float), "top_k": ("top_k", int), "top_p": ("top_p", float),
    "min_p": ("min_p", float), "typical_p": ("typical_p", float),
    "repeat_penalty": ("repetition_penalty", float), "repetition_penalty": ("repetition_penalty", float),
    "presence_penalty": ("presence_penalty", float), "frequency_penalty": ("frequency_penalty", float),
    "seed": ("seed", int), "num_predict": ("max_new_tokens", int), "max_new_tokens": ("max_new_tokens", int),
    "stop": ("stop", str),
}
_OLLAMA_NAME = {"repetition_penalty": "repeat_penalty", "max_new_tokens": "num_predict"}
_INSTRUCTIONS = ("FROM", "ADAPTER", "PARAMETER", "SYSTEM", "TEMPLATE", "DRAFT")
# An ADAPTER's files, kept in the entry beside the base's (chat_template.jinja: what it was tuned with).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class Modelfile:
    """What a Modelfile says. `parameters` maps SamplingParams fields to values ("stop": a
    list); `base_dir` is the folder a relative FROM path is resolved against."""

    source: str
    parameters: dict[str, object] = field(default_factory=dict)
    system: str | None = None
    template: str | None = None
    base_dir: Path | None = None
    adapter: str | None = None  # a PEFT LoRA/DoRA folder applied to the FROM model
    draft: str | None = None  # a smaller model (same tokenizer) for speculative decoding

    def to_text(self) -> str:
        """The Modelfile text that parses back into this one (Ollama's parameter names)."""
        lines = [f"FROM {_quote_if_needed(self.source)}"]
        if self.adapter is not None:
            lines.append(f"ADAPTER {_quote_if_needed(self.adapter)}")
        if self.draft is not None:
            lines.append(f"DRAFT {_quote_if_needed(self.draft)}")
        for key, value in self.parameters.items():
            for v in (value if key == "stop" else [value]):
                lines.append(f"PARAMETER {_OLLAMA_NAME.get(key, key)} {_format_value(v)}")
        for keyword, text in (("SYSTEM", self.system), ("TEMPLATE", self.template)):
            if text is not None:
                if '"""' in text or text.endswith('"'):
                    raise InvalidArgument(f'a {keyword} text holding """ or ending with " cannot be written '
                                          "as a Modelfile")
                lines.append(f'{keyword} """{text}"""')
        return "\n".join(lines) + "\n"


def _quote_if_needed(text: str) -> str:
    return f'"{text}"' if not text or any(c.isspace() for c in text) or text.startswith('"') else text


def _format_value(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def read_modelfile(path: str | Path) -> Modelfile:
    """Parse the Modelfile at `path` (relative FROM paths are taken from its folder)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"cannot read Modelfile {path}: {getattr(e, 'strerror', None) or e}") from None
    return parse_modelfile(text, origin=str(path), base_dir=path.parent)


def parse_modelfile(text: str, *, origin: str = "Modelfile", base_dir: Path | None = None) -> Modelfile:
    """Parse Ollama's Modelfile subset: FROM (required, once), PARAMETER <key> <value>,
    SYSTEM and TEMPLATE (once each: a rest-of-line text, optionally "quoted", or a \"\"\"...\"\"\"
    block that may span lines and is kept verbatim). Blank lines and lines starting with '#'
    are skipped; instructions are case-insensitive. A quoted PARAMETER value is a JSON string
    (so stop "\\n" is a newline). Every mistake raises InvalidArgument naming `origin` and the line."""
    texts: dict[str, str] = {}
    parameters: dict[str, object] = {}
    first_line: dict[str, int] = {}  # instruction or parameter -> the line that set it
    lines = text.replace("\r\n", "\n").split("\n")  # only newlines end lines (not \x85, \u2028, ...)
    for lineno, keyword, argument in _instructions(lines, origin):
        where = f"{origin} line {lineno}"
        if keyword == "PARAMETER":
            key, value = parse_parameter(argument, where)
            if key == "stop":
                parameters.setdefault("stop", []).append(value)
                continue
            if key in parameters:
                raise InvalidArgument(f"{where}: parameter {key} given twice (first on line {first_line[key]})")
            parameters[key], first_line[key] = value, lineno
            continue
        if keyword in texts:
            raise InvalidArgument(f"{where}: {keyword} given twice (first on line {first_line[keyword]})")
        if keyword == "FROM":
            argument = _unquote(argument)
            if not argument:
                raise InvalidArgument(f"{where}: FROM needs a model (a path, a store name or a packaged model)")
        texts[keyword], first_line[keyword] = argument, lineno
    if "FROM" not in texts:
        raise InvalidArgument(f"{origin}: no FROM line (FROM names the model to start from)")
    if "TEMPLATE" in texts:  # compiled now: a broken one is refused by create, not at the first chat
        from .chat import resolve_chat_template

        try:
            resolve_chat_template(None, override=texts["TEMPLATE"], missing="plain")
        except InvalidArgument as e:
            raise InvalidArgument(f"{origin} line {first_line['TEMPLATE']}: TEMPLATE: {e}") from None
    adapter = _unquote(texts["ADAPTER"]) if "ADAPTER" in texts else None
    draft = _unquote(texts["DRAFT"]) if "DRAFT" in texts else None
    return Modelfile(texts["FROM"], parameters, texts.get("SYSTEM"), texts.get("TEMPLATE"), base_dir, adapter, draft)


def _instructions(lines: list[str], origin: str) -> Iterator[tuple[int, str, str]]:
    """(line number, KEYWORD, argument) for each instruction; SYSTEM/TEMPLATE arguments are
    already unquoted texts."""
    i = 0
    while i < len(lines):
        lineno, raw = i + 1, lines[i]
        i += 1
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, rest = (line.split(None, 1) + [""])[:2]
        keyword = word.upper()
        if keyword not in _INSTRUCTIONS:
            hint = " (emergence supports FROM, ADAPTER, PARAMETER, SYSTEM, TEMPLATE and DRAFT)" \
                if keyword in ("LICENSE", "MESSAGE", "REQUIRES") else ""
            raise InvalidArgument(f"{origin} line {lineno}: unknown instruction {word!r}{hint}")
        if keyword in ("SYSTEM", "TEMPLATE"):
            if rest.startswith('"""'):
                rest, i = _block(lines, i, raw[raw.index('"""') + 3:], origin, lineno, keyword)
            else:
                rest = _unquote(rest)
        elif not rest:
            raise InvalidArgument(f"{origin} line {lineno}: {keyword} needs an argument")
        yield lineno, keyword, rest


def _block(lines: list[str], i: int, first: str, origin: str, lineno: int, keyword: str) -> tuple[str, int]:
    """The verbatim text of a \"\"\" block opened on line `lineno` (what follows the quotes
    there: `first`); returns the text and the index of the line after the block."""
    parts, current, at = [], first, lineno
    while True:
        end = current.find('"""')
        if end >= 0:
            if current[end + 3:].strip():
                raise InvalidArgument(f'{origin} line {at}: text after the closing """ of {keyword}')
            parts.append(current[:end])
            return "\n".join(parts), i
        parts.append(current)
        if i >= len(lines):
            raise InvalidArgument(f'{origin} line {lineno}: the """ opened by {keyword} is never closed')
        current, at = lines[i], i + 1
        i += 1


def _unquote(text: str) -> str:
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text


def _json_string(raw: str) -> str:
    """A quoted value as a JSON string (escapes decoded); an unquoted one as it is."""
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        try:
            value = json.loads(raw)
        except ValueError:
            return raw[1:-1]
        return value if isinstance(value, str) else raw[1:-1]
    return raw


def parse_parameter(argument: str, where: str) -> tuple[str, object]:
    """(SamplingParams field, checked value) of a PARAMETER line's argument."""
    from .sampling import SamplingParams

    name, raw = (argument.split(None, 1) + [""])[:2]
    if name not in PARAMETERS:
        raise InvalidArgument(f"{where}: unknown parameter {name!r} (use {', '.join(PARAMETERS)})")
    if not raw:
        raise InvalidArgument(f"{where}: PARAMETER {name} needs a value")
    key, kind = PARAMETERS[name]
    if kind is str:
        value = _json_string(raw)
        if not value:
            raise InvalidArgument(f"{where}: stop needs a non-empty string")
        return key, value
    try:
        value = kind(raw)
    except ValueError:
        raise InvalidArgument(f"{where}: {name} takes {'an integer' if kind is int else 'a number'}, "
                              f"got {raw!r}") from None
    if key != "seed":
        try:
            SamplingParams(**{key: value})
        except InvalidArgument as e:
            raise InvalidArgument(f"{where}: {e}") from None
    return key, value


# ---------------------------------------------------------------------------------- entries
@dataclass(frozen=True)
class FileRecord:
    sha256: str
    size: int


@dataclass(frozen=True)
class ModelDetails:
    """What a model is, read from its files' headers."""

    layout: str  # "hf" (Hugging Face folder) or "gguf" (one GGUF file)
    format: str  # fp32, bf16, fp16, a quantized format (int8, int4-gptq, q8_0, ...), or gguf-<tensor type>
    architecture: str
    parameter_count: int
    context_length: int


@dataclass
class Manifest:
    """An entry's manifest.json (see the module docstring)."""

    name: str
    source: str
    details: ModelDetails
    parameters: dict[str, object]
    system: str | None
    template: str | None
    created: str
    files: dict[str, FileRecord]
    draft: str | None = None  # the DRAFT model: a store or packaged name, or an absolute path

    def to_json(self) -> dict:
        d = self.details
        return {"schema": SCHEMA, "name": self.name, "source": self.source, "layout": d.layout, "format": d.format,
                "details": {"architecture": d.architecture, "parameter_count": d.parameter_count,
                            "context_length": d.context_length},
                "parameters": self.parameters, "system": self.system, "template": self.template,
                "created": self.created, "files": {k: asdict(v) for k, v in self.files.items()},
                **({"draft": self.draft} if self.draft is not None else {})}

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        """Raises KeyError / TypeError / ValueError on a malformed manifest (the caller names it)."""
        if data["schema"] != SCHEMA:
            raise ValueError(f"schema {data['schema']!r} (this emergence reads {SCHEMA})")
        det = data["details"]
        details = ModelDetails(str(data["layout"]), str(data["format"]), str(det["architecture"]),
                               int(det["parameter_count"]), int(det["context_length"]))
        files = {str(k): FileRecord(str(v["sha256"]), int(v["size"])) for k, v in data["files"].items()}
        bad = [name for name in files if not FILE_NAME.fullmatch(name) or name in (MANIFEST, VERIFIED)]
        if bad:  # a name like "../../x" would reach outside the entry
            raise ValueError(f"a file name that is not a plain name of the entry: {bad[0]!r}")
        if not isinstance(data["parameters"], dict):
            raise TypeError("parameters is not an object")
        draft = data.get("draft")
        if draft is not None and not isinstance(draft, str):
            raise TypeError("draft is not a string")
        return cls(str(data["name"]), str(data["source"]), details, dict(data["parameters"]), data["system"],
                   data["template"], str(data["created"]), files, draft)


@dataclass(frozen=True)
class Entry:
    """A model in the store."""

    name: ModelName
    folder: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        """What `emergence.load` takes: the folder (HF layout) or the GGUF file in it."""
        return self.folder / GGUF_FILE if self.manifest.details.layout == "gguf" else self.folder

    def size(self) -> int:
        """Bytes on disk of the entry's files (hard-linked files count in every entry holding them)."""
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file() and p.name != VERIFIED)

    def modified(self) -> datetime:
        return datetime.fromisoformat(self.manifest.created)

    def verify(self, *, full: bool = True) -> int:
        """Check the entry's files against its manifest: each present, of its recorded size, and
        (full, or when a file changed since its last check) of its recorded sha256. Raises
        CheckpointError naming the first file that differs; returns the bytes checked."""
        stamp_path = self.folder / VERIFIED
        try:
            stamps = json.loads(stamp_path.read_text()) if not full else {}
        except (OSError, ValueError):
            stamps = {}
        checked, fresh = 0, {}
        for name, record in self.manifest.files.items():
            path = self.folder / name
            try:
                st = path.stat()
            except OSError:
                raise CheckpointError(f"store entry {self.name}: {name} is missing; remove it with: emergence rm "
                                      f"{self.name}") from None
            if st.st_size != record.size:
                raise CheckpointError(f"store entry {self.name}: {name} has {st.st_size} bytes, its manifest "
                                      f"records {record.size} (damaged or replaced)")
            stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
            if stamps.get(name) != stamp:
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        digest.update(chunk)
                if digest.hexdigest() != record.sha256:
                    raise CheckpointError(f"store entry {self.name}: {name} does not have the sha256 its manifest "
                                          "records (damaged or replaced)")
                checked += st.st_size
            fresh[name] = stamp
        try:
            tmp = self.folder / (VERIFIED + ".tmp")
            tmp.write_text(json.dumps(fresh))
            os.replace(tmp, stamp_path)
        except OSError:  # a read-only store: checked again next time
            pass
        return checked


@dataclass(frozen=True)
class Source:
    """A resolved model argument: an HF folder or a model file, and the store entry it is, if any."""

    path: Path
    label: str  # recorded as a new entry's "source": the store or packaged name, or the absolute path
    entry: Entry | None = None
    packaged: bool = False

    @property
    def name(self) -> str:
        """What the model is called (a server's model id): its store name (without the default
        tag, ":latest") or packaged name, else the file's stem or the folder's name."""
        if self.entry is not None:
            return self.label.removesuffix(":latest")
        if self.packaged:
            return self.label
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def parameters(self) -> dict[str, object]:
        """A store model's default SamplingParams fields (stop as a tuple); {} otherwise."""
        return sampling_defaults(self.entry) if self.entry is not None else {}

    @property
    def system(self) -> str | None:
        return self.entry.manifest.system if self.entry is not None else None

    @property
    def template(self) -> str | None:
        return self.entry.manifest.template if self.entry is not None else None

    @property
    def draft(self) -> str | None:
        """A store model's DRAFT: the model that drafts for it in speculative decoding."""
        return self.entry.manifest.draft if self.entry is not None else None

    @property
    def adapter(self) -> Path | None:
        """A store model made with an ADAPTER: the entry folder holding its PEFT files."""
        if self.entry is not None and ADAPTER_FILES[0] in self.entry.manifest.files:
            return self.entry.folder
        return None


def resolve_model(spec: str | os.PathLike | None, base_dir: Path | None = None, store: Store | None = None) -> Source:
    """A model argument -> Source: an existing path (relative to `base_dir` when given), else a
    store entry, else a packaged model (None: the default model); CheckpointError listing what
    exists otherwise."""
    from .api import DEFAULT_MODEL, PACKAGED_MODELS, packaged_models
    from .weights.hf import is_hf_folder

    spec = DEFAULT_MODEL if spec is None else str(spec)
    path = Path(spec).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if path.exists():
        if path.is_dir() and not is_hf_folder(path):
            raise CheckpointError(f"{path} is not a model folder (no config.json; a partial copy?)")
        return Source(path.resolve(), str(path.resolve()))
    store = store or Store()
    entry = store.find(spec)
    if entry is not None:
        return Source(entry.model_path, str(entry.name), entry)
    if "/" not in spec and spec in packaged_models():
        return Source(PACKAGED_MODELS / spec, spec, packaged=True)
    raise CheckpointError(f"no model at '{spec}': not a path, nor a model in the store {store.root} "
                          f"({short_list(store.names())}), nor a packaged model ({', '.join(packaged_models()) or 'none'})")


# ------------------------------------------------------------------------- reading models
def model_layout(path: Path) -> str:
    """"gguf" for a GGUF file, "hf" for a Hugging Face folder (by content, never by name);
    CheckpointError for anything else."""
    from .weights.gguf_model import is_gguf_file

    if path.is_file() and is_gguf_file(path):
        return "gguf"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    if path.is_file() and path.suffix == ".bin":
        raise CheckpointError(f"{path} looks like a llama2.c checkpoint: convert it first "
                              "(emergence convert CHECKPOINT.bin OUT/ --tokenizer TOKENIZER.bin)")
    raise CheckpointError(f"{path} is neither a Hugging Face model folder (with config.json) nor a GGUF file")


def inspect_model(path: Path) -> ModelDetails:
    """Layout, format, architecture, parameter count and context of the model at `path` (an HF
    folder or a GGUF file), from headers only; the tokenizer is read to check it is there.
    Raises CheckpointError / ConfigError for anything emergence.load would refuse early."""
    return _inspect_gguf(path) if model_layout(path) == "gguf" else _inspect_hf(path)


def _inspect_gguf(path: Path) -> ModelDetails:
    from .gguf import read_gguf
    from .gguf.vocab import tokenizer_from_gguf_metadata
    from .weights.gguf_model import config_from_gguf

    f = read_gguf(path)
    config = config_from_gguf(f.metadata, {n: t.torch_shape for n, t in f.tensors.items()}, path)
    tokenizer_from_gguf_metadata(f.metadata)
    weights = {n: t for n, t in f.tensors.items() if n != "rope_freqs.weight"}
    kinds = Counter()
    for t in weights.values():
        if len(t.shape) == 2:
            kinds[t.type.name.lower()] += t.n_elements
    kind = kinds.most_common(1)[0][0] if kinds else "f32"
    return ModelDetails("gguf", f"gguf-{kind}", config.family, sum(t.n_elements for t in weights.values()),
                        config.block_size)


def _inspect_hf(folder: Path) -> ModelDetails:
    from .config import read_json
    from .model import empty_model
    from .tokenizer import Tokenizer
    from .weights.hf import QUANTIZATION_KEY
    from .weights.hf_config import t5_config_from_hf
    from .weights.safetensors_io import SafetensorsFile

    raw = read_json(folder / "config.json")
    files = [SafetensorsFile(folder / name) for name in _weight_files(folder)]
    Tokenizer.load(folder)
    records = [f.metadata[QUANTIZATION_KEY] for f in files if QUANTIZATION_KEY in f.metadata]
    if records:
        fmt = _quant_format(records[0], folder)
    else:
        dtypes = Counter()
        for f in files:
            for entry in f.entries.values():
                dtypes[entry["dtype"]] += math.prod(entry["shape"])
        stored = dtypes.most_common(1)[0][0] if dtypes else "F32"
        fmt = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}.get(stored, stored.lower())
    if raw.get("model_type") == "t5":  # an encoder-decoder: its own config, counted from its shapes
        config = t5_config_from_hf(raw, tied=not any("lm_head.weight" in f.entries for f in files))
        return ModelDetails("hf", fmt, "t5", config.num_parameters(), config.block_size)
    config = Config.from_hf(raw)
    count = sum(p.numel() for p in empty_model(config).parameters())
    return ModelDetails("hf", fmt, config.family, count, config.block_size)


def _quant_format(record: str, folder: Path) -> str:
    try:
        data = json.loads(record)
        modules = data["modules"].values()
        formats = sorted({f"{m['format']}-{m['method']}" if m["method"] != "rtn" else m["format"] for m in modules})
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{folder}: unreadable quantization record in the safetensors metadata") from None
    return formats[0] if len(formats) == 1 else "mixed:" + "+".join(formats)


def _weight_files(folder: Path) -> list[str]:
    """The safetensors files of an HF folder: model.safetensors, or the shards its index names."""
    from .weights.hf import INDEX_FILE, SINGLE_FILE

    if (folder / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    if not (folder / INDEX_FILE).is_file():
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {folder}")
    try:
        shards = sorted(set(json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"bad {INDEX_FILE} in {folder}: {e}") from None
    for shard in shards:
        if not isinstance(shard, str) or "/" in shard or shard.startswith("."):
            raise CheckpointError(f"bad shard name {shard!r} in {INDEX_FILE}")
    return shards


def _hf_files(folder: Path) -> list[str]:
    """The files of an HF folder that an entry keeps: config, weights (+ index), tokenizer files."""
    from .weights.hf import INDEX_FILE, SINGLE_FILE

    weights = _weight_files(folder)
    index = [] if weights == [SINGLE_FILE] else [INDEX_FILE]
    return ["config.json", *index, *weights, *(n for n in _HF_OPTIONAL if (folder / n).is_file())]


# --------------------------------------------------------------------------- file helpers
def _copy_file(src: Path, dst: Path) -> FileRecord:
    """Copy `src` to the new file `dst`, flushed to disk; its sha256 and size, computed while copying."""
    digest, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    os.chmod(dst, 0o444)
    return FileRecord(digest.hexdigest(), size)


def _link_or_copy(src: Path, dst: Path, record: FileRecord) -> FileRecord:
    """Hard-link `src` (a store file, never modified in place) to `dst`; copy where links fail."""
    try:
        os.link(src, dst)
        return record
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    return _copy_file(src, dst)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "x", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o444)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------ store
class Store:
    """The model store at `root` (default: `store_root()`). Reading never creates anything."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else store_root()
        self.models = self.root / "models"
        self.tmp = self.root / "tmp"

    # -- reading ------------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        """Every entry, sorted by name. Folders that are not entries (bad names, no manifest:
        nothing emergence wrote) are ignored; a damaged manifest raises CheckpointError."""
        if not self.models.is_dir():
            return []
        out = []
        for folder in sorted(self.models.iterdir()):
            if folder.is_dir() and ModelName.valid(folder.name) and (folder / MANIFEST).is_file():
                out.append(self._read(ModelName.parse(folder.name), folder))
        return out

    def names(self) -> list[str]:
        """The entries' names, sorted (from the folder names only: never raises for a damaged entry)."""
        if not self.models.is_dir():
            return []
        return [f.name for f in sorted(self.models.iterdir())
                if ModelName.valid(f.name) and (f / MANIFEST).is_file()]

    def find(self, text: str) -> Entry | None:
        """The entry called `text`, or None (also for text that is no valid name)."""
        if not ModelName.valid(text):
            return None
        name = ModelName.parse(text)
        folder = self.models / str(name)
        return self._read(name, folder) if (folder / MANIFEST).is_file() else None

    def get(self, text: str) -> Entry:
        """The entry called `text`; InvalidArgument for a bad name or a missing entry,
        CheckpointError for a damaged manifest."""
        folder = self.entry_folder(text)
        return self._read(ModelName.parse(folder.name), folder)

    def entry_folder(self, text: str) -> Path:
        """The folder of the entry called `text` (its manifest is not read); InvalidArgument
        for a bad name or a missing entry."""
        name = ModelName.parse(text)
        folder = self.models / str(name)
        if not (folder / MANIFEST).is_file():
            raise InvalidArgument(f"model '{name}' not found in the store {self.root} "
                                  f"(models: {short_list(self.names())})")
        return folder

    def _read(self, name: ModelName, folder: Path) -> Entry:
        try:
            manifest = Manifest.from_json(json.loads((folder / MANIFEST).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"store entry {name} is damaged ({folder / MANIFEST}: {e}); "
                                  f"remove it with: emergence rm {name}") from None
        return Entry(name, folder, manifest)

    # -- writing ------------------------------------------------------------------------------
    def import_model(self, path: str | Path, name: str, *, force: bool = False) -> Entry:
        """Copy the HF folder or GGUF file at `path` into the store as `name` (an existing `name`
        is replaced only with `force`)."""
        target = ModelName.parse(name)
        path = Path(path).expanduser()
        if not path.exists():
            raise InvalidArgument(f"nothing to import at {path}: no such file or folder")
        self._check_free(target, force)
        return self._install(target, Source(path.resolve(), str(path.resolve())), {}, None, None)

    def create(self, name: str, modelfile: Modelfile) -> Entry:
        """The entry `name` made from a Modelfile (see the module docstring for inheritance); like
        Ollama's create, it replaces an entry of that name."""
        target = ModelName.parse(name)
        source = resolve_model(modelfile.source, modelfile.base_dir, store=self)
        base = source.entry.manifest if source.entry is not None else None
        parameters = {**(base.parameters if base else {}), **modelfile.parameters}
        system = modelfile.system if modelfile.system is not None else (base.system if base else None)
        template = modelfile.template if modelfile.template is not None else (base.template if base else None)
        draft = base.draft if base else None
        if modelfile.draft is not None:  # resolved now: a missing model is refused before anything is written
            draft = resolve_model(modelfile.draft, modelfile.base_dir, store=self).label
        adapter = None
        if modelfile.adapter is not None:
            adapter = _check_adapter(modelfile, source)
            tuned_with = adapter / "chat_template.jinja"
            if modelfile.template is None and tuned_with.is_file():
                template = tuned_with.read_text(encoding="utf-8")
        return self._install(target, source, parameters, system, template, adapter, draft)

    def copy(self, src: str, dst: str, *, force: bool = False) -> Entry:
        """A copy of entry `src` under the name `dst` (files hard-linked where possible); an
        existing `dst` is replaced only with `force`."""
        entry, target = self.get(src), ModelName.parse(dst)
        if target == entry.name:
            raise InvalidArgument(f"cp: source and destination are the same model ({target})")
        self._check_free(target, force)
        m = entry.manifest
        return self._install(target, Source(entry.model_path, m.source, entry), m.parameters, m.system, m.template,
                             draft=m.draft)

    def remove(self, text: str) -> ModelName:
        """Delete the entry `text` (even a damaged one): renamed out of models/ first, so it
        vanishes at once; returns its full name."""
        folder = self.entry_folder(text)
        self._clean_tmp()
        trash = self._new_tmp()
        try:
            os.rename(folder, trash / "entry")
        except OSError as e:
            raise CheckpointError(f"cannot remove {folder.name} from {self.root}: {e.strerror or e}") from None
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        return ModelName.parse(folder.name)

    def _check_free(self, name: ModelName, force: bool) -> None:
        existing = self.find(str(name))
        if existing is not None and not force:
            d = existing.manifest.details
            raise InvalidArgument(f"{name} exists in the store ({d.architecture}, {human_count(d.parameter_count)} "
                                  f"parameters, {d.format}, from {existing.manifest.source}); --force replaces it")

    def _install(self, name: ModelName, source: Source, parameters: dict, system: str | None,
                 template: str | None, adapter: Path | None = None, draft: str | None = None) -> Entry:
        """Build the entry in a temporary folder, then swap it into place (see the module docstring)."""
        if source.entry is None:
            model_layout(source.path)  # refuse what is no model before creating anything
            inspect_model(source.path)  # and a corrupt one, naming the user's file, not the staged copy
        self._clean_tmp()
        work = self._new_tmp()
        staged = work / "entry"
        try:
            staged.mkdir()
            files = self._fill(staged, source)
            if adapter is not None:
                files.update({n: _copy_file(adapter / n, staged / n) for n in ADAPTER_FILES})
            details = inspect_model(staged / GGUF_FILE if (staged / GGUF_FILE).is_file() else staged)
            manifest = Manifest(str(name), source.label, details, parameters, system, template, _now(), files, draft)
            _write_json(staged / MANIFEST, manifest.to_json())
            self._swap_in(staged, self.models / str(name), work)
        except OSError as e:
            raise CheckpointError(f"cannot write {name} into the store {self.root}: "
                                  f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return self.get(str(name))

    def _fill(self, staged: Path, source: Source) -> dict[str, FileRecord]:
        """Put the source's model files into `staged`; their records by file name."""
        if source.entry is not None:
            return {n: _link_or_copy(source.entry.folder / n, staged / n, rec)
                    for n, rec in source.entry.manifest.files.items()}
        if model_layout(source.path) == "gguf":
            return {GGUF_FILE: _copy_file(source.path, staged / GGUF_FILE)}
        return {n: _copy_file(source.path / n, staged / n) for n in _hf_files(source.path)}

    def _swap_in(self, staged: Path, dest: Path, work: Path) -> None:
        """Move the complete entry `staged` to `dest`; an entry already there ends up in `work`."""
        self.models.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staged, dest)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if not _exchange(staged, dest):
                os.rename(dest, work / "old")
                os.rename(staged, dest)
        fsync_folder(self.models)

    def _new_tmp(self) -> Path:
        self.tmp.mkdir(parents=True, exist_ok=True)
        path = self.tmp / f"{os.getpid()}-{secrets.token_hex(6)}"
        path.mkdir()
        return path

    def _clean_tmp(self) -> None:
        """Remove temporary folders left by processes that no longer run (a crash mid-write)."""
        if not self.tmp.is_dir():
            return
        for item in self.tmp.iterdir():
            pid = item.name.partition("-")[0]
            if pid.isdigit() and (int(pid) == os.getpid() or _alive(int(pid))):
                continue  # being written now
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)


def _check_adapter(modelfile: Modelfile, source: Source) -> Path:
    """The ADAPTER folder, checked against the FROM model's shapes before anything is written."""
    from .adapters.peft_format import load_adapter
    from .config import Config, read_json
    from .model import empty_model

    path = Path(modelfile.adapter).expanduser()
    if modelfile.base_dir is not None and not path.is_absolute():
        path = modelfile.base_dir / path
    if source.adapter is not None:
        raise InvalidArgument(f"ADAPTER {modelfile.adapter}: the FROM model {source.label} already has an adapter")
    if source.path.is_dir():  # the base's shapes on a weightless skeleton (a GGUF base is checked at load)
        load_adapter(empty_model(Config.from_hf(read_json(source.path / "config.json"))), path)
    else:
        from .adapters.peft_format import read_adapter

        read_adapter(path)
    return path.resolve()


def short_list(names: list[str], limit: int = 12) -> str:
    """'a, b, c' (at most `limit` names, then how many in all), or 'none'."""
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# ----------------------------------------------------------------------------- presenting
def human_count(n: int) -> str:
    """272576 -> '273K', 5_870_000 -> '5.87M' (Ollama-style parameter counts)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.3g}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    """Decimal units, like Ollama: 1044992 -> '1.0 MB'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def ago(then: datetime, now: datetime | None = None) -> str:
    """'just now', '5 minutes ago', '2 days ago'..."""
    seconds = ((now or datetime.now(timezone.utc)) - then).total_seconds()
    if seconds < 60:
        return "just now"
    for unit, size in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400), ("day", 86400),
                       ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


def sampling_defaults(entry: Entry) -> dict[str, object]:
    """The entry's default SamplingParams fields (stop as a tuple)."""
    return {k: tuple(v) if k == "stop" else v for k, v in entry.manifest.parameters.items()}


def with_system(system: str | None, prompt: str) -> str:
    """The prompt with the system prompt as a text prefix (its own line): how a store model's
    SYSTEM reaches a single prompt (`generate`, `run NAME PROMPT`); chats render it as the
    system message of their template instead."""
    return f"{system}\n{prompt}" if system else prompt

