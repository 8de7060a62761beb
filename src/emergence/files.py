"""Small file-system helpers: atomic writes (checkpoints, the store), output checks, JSONL rows."""

from __future__ import annotations

import json
import os
from pathlib import Path


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output(path: str | os.PathLike, *, folder: bool, force: bool, flag: str = "--force") -> Path:
    """Where a command will write a model: a file (folder=False, e.g. a GGUF) or a folder (an HF
    layout), checked before any work: refuses, in one line, to replace an existing model unless
    `force` (saying what would be replaced), a file where a folder is wanted and the reverse,
    and a place under a file or a folder that is not writable. Creates nothing: the writer
    makes the missing folders once it has something to write."""
    from .errors import InvalidArgument

    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise InvalidArgument(f"{path} exists and is not a folder")
        if not folder and path.is_dir():
            raise InvalidArgument(f"{path} is a folder; the output is a file")
        existing = [p.name for p in path.iterdir()] if folder else [path.name]
        if existing and not force:
            what = f"the model in {path} ({', '.join(sorted(existing)[:4])}{', ...' if len(existing) > 4 else ''})" \
                if folder else f"{path}"
            raise InvalidArgument(f"{path} exists: writing there would replace {what}; {flag} replaces it")
    parent = path if folder else path.parent
    existing_parent = next(p for p in (parent.absolute(), *parent.absolute().parents) if p.exists())
    if not existing_parent.is_dir():
        raise InvalidArgument(f"cannot write {path}: {existing_parent} is a file, not a folder")
    if not os.access(existing_parent, os.W_OK | os.X_OK):
        raise InvalidArgument(f"cannot write {path}: {existing_parent} is not writable")
    return path


def read_jsonl(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """(where, row) for each non-blank line of a JSONL file, where = "path:line"; a missing or
    unreadable file, bad JSON, a row that is not an object or no rows at all: InvalidArgument
    naming the file (and line)."""
    from .errors import InvalidArgument

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InvalidArgument(f"data file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"cannot read {path}: {' '.join(str(e).split())}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(row, dict):
            raise InvalidArgument(f"{where}: expected a JSON object, got {type(row).__name__}")
        rows.append((where, row))
    if not rows:
        raise InvalidArgument(f"{path} is empty: no rows")
    return rows
