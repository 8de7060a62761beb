"""Reading and writing .safetensors files, memory-mapped and validated.

Format: an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}),
then the raw tensor bytes. The header is checked against the file size before anything
is allocated, so a truncated or corrupt file is reported, never half-loaded.

Tensors are zero-copy views of a private (copy-on-write) memory map, so loading a model in
its stored dtype costs about its weight bytes in RSS. A tensor read only to be transformed
(fused, transposed, cast) has its mapped pages dropped again with `release`, so they do not
linger beside the transformed copy.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit


class SafetensorsFile:
    """A validated, memory-mapped .safetensors file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"weights file not found: {self.path}") from None
        except OSError as e:
            raise CheckpointError(f"cannot open weights file {self.path}: {e.strerror}") from None
        size = os.fstat(self._file.fileno()).st_size
        self.entries, self.metadata, self._data_start = _parse_header(self._file, size, self.path)
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def tensor(self, name: str, *, copy: bool = False) -> torch.Tensor:
        """The named tensor: a view of the memory map, or (copy=True) a fresh tensor read from disk."""
        entry = self.entries[name]
        dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
        begin, end = entry["data_offsets"]
        offset, count = self._data_start + begin, math.prod(shape)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        if not copy and offset % dtype.itemsize == 0:
            return torch.frombuffer(self._map, dtype=dtype, count=count, offset=offset).view(shape)
        out = torch.empty(shape, dtype=dtype)
        buffer = out.view(torch.uint8).numpy().reshape(-1)
        if os.preadv(self._file.fileno(), [buffer], offset) != end - begin:
            raise CheckpointError(f"{self.path} is truncated inside tensor {name!r}")
        return out

    def release(self, name: str) -> None:
        """Drop the mapped pages of a tensor read only to be transformed: its transformed copy
        replaces them, and touched pages of the map would otherwise stay resident."""
        begin, end = self.entries[name]["data_offsets"]
        if self._map is None or end == begin:
            return
        start = (self._data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, self._data_start + end - start)


def _parse_header(f, size: int, path: Path) -> tuple[dict, dict, int]:
    corrupt = f"{path} is not a valid safetensors file"
    if size < 8:
        raise CheckpointError(f"{corrupt}: only {size} bytes (truncated?)")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise CheckpointError(f"{corrupt}: header length {n} does not fit the {size}-byte file (truncated?)")
    try:
        header = json.loads(f.read(n))
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, absurd nesting or number literals
        raise CheckpointError(f"{corrupt}: header is not JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{corrupt}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{corrupt}: __metadata__ is not an object")
    data_size = size - 8 - n
    spans = []
    for name, e in header.items():
        try:
            dtype = DTYPES[e["dtype"]]
            shape, offsets = e["shape"], e["data_offsets"]
            ok = (type(shape) is list and all(type(d) is int and d >= 0 for d in shape)
                  and type(offsets) is list and len(offsets) == 2 and all(type(o) is int for o in offsets)
                  and 0 <= offsets[0] <= offsets[1]
                  and offsets[1] - offsets[0] == math.prod(shape) * dtype.itemsize)
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise CheckpointError(f"{corrupt}: bad entry for tensor {name!r}")
        if offsets[1] > data_size:
            raise CheckpointError(f"{path} is truncated: tensor {name!r} ends at byte {offsets[1]} of {data_size}")
        spans.append(offsets)
    # As the reference reader requires, the tensors tile the data section exactly: no gaps, no
    # overlaps, nothing after. A wrong header length otherwise reads shifted garbage silently.
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise CheckpointError(f"{corrupt}: tensor data is not contiguous at byte {begin}")
        position = end
    if position != data_size:
        raise CheckpointError(f"{corrupt}: {data_size - position} bytes after the last tensor (wrong header length?)")
    return header, metadata, 8 + n


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write atomically: a temporary file in the same folder, then rename over the target."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt", **(metadata or {})})
        os.chmod(tmp, 0o644)  # the writer creates files private to the user; checkpoints are shared
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
