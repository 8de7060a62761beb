"""GGUF files (llama.cpp's model container), read memory-mapped and validated, written atomically.

Layout of versions 2 and 3 (identical for little-endian files; v1 had 32-bit counts and is refused):

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x      key: string | value_type u32 | value
    tensor_count x  name: string | n_dims u32 | ne[n_dims] u64 | ggml_type u32 | offset u64
    zero padding to the alignment (`general.alignment`, a u32 power of two; default 32)
    data section: each tensor at `offset` bytes from its start, a multiple of the alignment

    string = length u64 + UTF-8 bytes
    array  = element value_type u32 + count u64 + elements (arrays may nest)

Shapes are stored in ggml order, fastest-varying first (`ne0` is the row length); the
row-major (torch/numpy) shape is the reverse.

Everything in the header is checked against the file size before it is allocated, so a
truncated or corrupt file is reported as one-line `CheckpointError`, never half-read, and
never as an IndexError, MemoryError or a hang. Tensor data is a view of a private memory map.
"""

from __future__ import annotations

import math
import mmap
import operator
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, InvalidArgument
from .quants import BLOCK_SIZES, TORCH_DTYPES, GGMLType, dequantize

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # llama.cpp refuses tensor names of GGML_MAX_NAME (64) bytes or more
MAX_ARRAY_DEPTH = 8  # nested metadata arrays; real files use one level
ALIGNMENT_KEY = "general.alignment"

__all__ = ["GGMLType", "BLOCK_SIZES", "GGUFValueType", "GGUFValue", "TensorInfo", "GGUFFile",
           "read_gguf", "write_gguf"]


class GGUFValueType(IntEnum):
    """Metadata value types (gguf.h `enum gguf_type`)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


V = GGUFValueType
# Fixed-size value types: little-endian numpy dtype (bool is one byte, 0 or 1).
_SCALARS: dict[GGUFValueType, np.dtype] = {
    V.UINT8: np.dtype("u1"), V.INT8: np.dtype("i1"), V.UINT16: np.dtype("<u2"), V.INT16: np.dtype("<i2"),
    V.UINT32: np.dtype("<u4"), V.INT32: np.dtype("<i4"), V.FLOAT32: np.dtype("<f4"), V.BOOL: np.dtype("u1"),
    V.UINT64: np.dtype("<u8"), V.INT64: np.dtype("<i8"), V.FLOAT64: np.dtype("<f8"),
}
_STRUCT = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
           V.FLOAT32: "<f", V.BOOL: "<B", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}
# The fewest bytes one value of each type can take: the bound that keeps counts honest.
_MIN_BYTES = {**{t: d.itemsize for t, d in _SCALARS.items()}, V.STRING: 8, V.ARRAY: 12}
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims = 0, type, offset
_INT_RANGES = {t: (int(np.iinfo(d).min), int(np.iinfo(d).max)) for t, d in _SCALARS.items() if d.kind in "iu"
               and t is not V.BOOL}


@dataclass(frozen=True)
class GGUFValue:
    """A metadata value with its GGUF type, enough to write it back byte for byte.

    Scalars: `value` is a Python int, float, bool or str. Arrays (`type` ARRAY): `value` is a
    list of Python values of `sub_type` (a 1-D numpy array is accepted when writing); for
    arrays of arrays it is a list of `GGUFValue`s, each inner array with its own element type.
    """

    value: Any
    type: GGUFValueType
    sub_type: GGUFValueType | None = None


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives in a GGUF file. `shape` is in ggml order (ne0, ne1, ...)."""

    name: str
    shape: tuple[int, ...]
    type: GGMLType
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """The row-major (torch/numpy) shape: `shape` reversed."""
        return self.shape[::-1]

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class GGUFFile:
    """A validated, memory-mapped GGUF file.

    `metadata` maps each key to a plain Python value: int, float, bool, str, or a list for
    arrays (arrays of numbers are Python lists too; arrays of arrays are nested lists).
    `fields` maps the same keys to `GGUFValue`s that keep the stored types. `tensors` maps
    names to `TensorInfo`, in file order.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 24:
                    raise CheckpointError(f"{self.path} is not a valid GGUF file: only {size} bytes (truncated?)")
                # A private (copy-on-write) map: tensors can be zero-copy torch views of it.
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except FileNotFoundError:
            raise CheckpointError(f"GGUF file not found: {self.path}") from None
        except IsADirectoryError:
            raise CheckpointError(f"{self.path} is a folder, not a GGUF file") from None
        except OSError as e:
            raise CheckpointError(f"cannot open GGUF file {self.path}: {e.strerror}") from None
        parsed = _Parser(self._map, size, self.path).parse()
        self.version, self.fields, self.tensors, self.alignment, self.data_offset = parsed
        self.metadata: dict[str, Any] = {k: _plain(v) for k, v in self.fields.items()}

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, version={self.version}, "
                f"{len(self.fields)} keys, {len(self.tensors)} tensors)")

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor, a read-only uint8 view of the map (no copy), shaped
        (*torch_shape[:-1], bytes per row)."""
        info = self.tensors[name]
        out = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        out.flags.writeable = False
        rows = info.torch_shape[:-1]
        return out.reshape(*rows, info.nbytes // max(1, math.prod(rows)))

    def blocks(self, name: str) -> torch.Tensor:
        """A tensor's stored bytes as a uint8 tensor (*torch_shape[:-1], bytes per row) viewing the
        map (no copy: the pages are read from the file when first touched)."""
        info = self.tensors[name]
        rows = info.torch_shape[:-1]
        view = torch.frombuffer(self._map, dtype=torch.uint8, count=info.nbytes, offset=info.offset)
        return view.view(*rows, info.nbytes // max(1, math.prod(rows)))

    def read_rows(self, name: str, out: torch.Tensor, first: int = 0) -> None:
        """Fill `out` (contiguous uint8, (n, bytes per row)) with rows first..first+n of a tensor's
        stored bytes (its leading dimensions flattened), read from the file rather than through
        the map, so the source pages are never part of this process's memory."""
        info = self.tensors[name]
        row_bytes = info.nbytes // max(1, math.prod(info.torch_shape[:-1]))
        n = out.numel() // row_bytes
        if not out.is_contiguous() or out.dtype != torch.uint8 or out.shape[-1] != row_bytes \
                or (first + n) * row_bytes > info.nbytes:
            raise InvalidArgument(f"{name}: rows {first}..{first + n} do not fit its stored {row_bytes}-byte rows")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(info.offset + first * row_bytes)
            view, done = memoryview(out.numpy()).cast("B"), 0
            while done < n * row_bytes:
                got = f.readinto(view[done:])
                if not got:
                    raise CheckpointError(f"{self.path}: the file ended inside tensor {name} (it changed while "
                                          "being read?)")
                done += got

    def tensor(self, name: str, *, native: bool = False) -> torch.Tensor:
        """A tensor in row-major shape, dequantized to float32.

        With native=True, types that have a torch dtype (F32, F16, BF16, F64, I8..I64) come back
        in that dtype as a zero-copy view of the map instead; quantized types are dequantized.
        """
        info = self.tensors[name]
        dtype = TORCH_DTYPES.get(info.type)
        if native and dtype is not None:
            if info.offset % dtype.itemsize == 0:
                view = torch.frombuffer(self._map, dtype=dtype, count=info.n_elements, offset=info.offset)
                return view.view(info.torch_shape)
            return torch.from_numpy(self.raw(name).copy()).view(dtype).reshape(info.torch_shape)
        return dequantize(self.raw(name), info.type, info.torch_shape)


def read_gguf(path: str | Path) -> GGUFFile:
    """Open and validate a GGUF v2/v3 file (see `GGUFFile`)."""
    return GGUFFile(path)


def _plain(v: GGUFValue) -> Any:
    if v.type is V.ARRAY and v.sub_type is V.ARRAY:
        return [_plain(x) for x in v.value]
    return v.value


class _Parser:
    """Reads the header of a GGUF file held in `buf`, bounds-checking every read."""

    def __init__(self, buf: mmap.mmap, size: int, path: Path) -> None:
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def corrupt(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a valid GGUF file: {why}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise CheckpointError(f"{self.path} is truncated or corrupt: {what} at byte {self.pos} "
                                  f"needs {n} bytes, the {self.size}-byte file has {self.size - self.pos} left")

    def unpack(self, fmt: str, n: int, what: str) -> tuple:
        self.need(n, what)
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        return self.unpack("<I", 4, what)[0]

    def u64(self, what: str) -> int:
        return self.unpack("<Q", 8, what)[0]

    def text(self, what: str) -> str:
        (n,) = self.unpack("<Q", 8, f"length of {what}")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.corrupt(f"{what} at byte {self.pos - n} is not UTF-8") from None

    def value_type(self, what: str) -> GGUFValueType:
        t = self.u32(what)
        try:
            return GGUFValueType(t)
        except ValueError:
            raise self.corrupt(f"{what} is unknown value type {t}") from None

    def value(self, vtype: GGUFValueType, key: str, depth: int = 0) -> GGUFValue:
        what = f"value of {key!r}"
        if vtype in _SCALARS:
            dtype = _SCALARS[vtype]
            (v,) = self.unpack(_STRUCT[vtype], dtype.itemsize, what)
            if vtype is V.BOOL:
                if v > 1:
                    raise self.corrupt(f"{what} is bool {v}, not 0 or 1")
                v = bool(v)
            return GGUFValue(v, vtype)
        if vtype is V.STRING:
            return GGUFValue(self.text(what), vtype)
        # an array
        if depth >= MAX_ARRAY_DEPTH:
            raise self.corrupt(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        sub = self.value_type(f"array element type of {key!r}")
        n = self.u64(f"array length of {key!r}")
        if n > (self.size - self.pos) // _MIN_BYTES[sub]:
            raise CheckpointError(f"{self.path} is truncated or corrupt: array {key!r} of {n} {sub.name} "
                                  f"values at byte {self.pos} cannot fit the {self.size}-byte file")
        if sub in _SCALARS:
            dtype = _SCALARS[sub]
            arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos)
            self.pos += n * dtype.itemsize
            if sub is V.BOOL:
                if n and arr.max() > 1:
                    raise self.corrupt(f"array {key!r} holds a bool that is not 0 or 1")
                arr = arr.astype(bool)
            return GGUFValue(arr.tolist(), V.ARRAY, sub)
        if sub is V.STRING:
            return GGUFValue(self.strings(n, key), V.ARRAY, sub)
        items = []
        for _ in range(n):
            items.append(self.value(V.ARRAY, key, depth + 1))
        return GGUFValue(items, V.ARRAY, sub)

    def strings(self, n: int, key: str) -> list[str]:
        """n strings in a row: the hot loop for vocabularies of 150k tokens."""
        buf, size, pos = self.buf, self.size, self.pos
        unpack_from, out = struct.unpack_from, []
        append = out.append
        for i in range(n):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"length of string {i} of {key!r}")
            (length,) = unpack_from("<Q", buf, pos)
            pos += 8
            if length > size - pos:
                self.pos = pos
                self.need(length, f"string {i} of {key!r}")
            try:
                append(buf[pos:pos + length].decode("utf-8"))
            except UnicodeDecodeError:
                raise self.corrupt(f"string {i} of {key!r} at byte {pos} is not UTF-8") from None
            pos += length
        self.pos = pos
        return out

    def parse(self) -> tuple[int, dict[str, GGUFValue], dict[str, TensorInfo], int, int]:
        magic = bytes(self.buf[0:4])
        if magic != MAGIC:
            raise self.corrupt(f"bad magic {magic!r} (expected {MAGIC!r})")
        self.pos = 4
        version = self.u32("version")
        if version not in VERSIONS:
            if version & 0xFFFF == 0 and version:
                raise self.corrupt(f"version field {version:#010x} looks byte-swapped: "
                                   "big-endian files are not supported")
            raise self.corrupt(f"GGUF version {version} is not supported (only versions 2 and 3)")
        n_tensors, n_kv = self.unpack("<QQ", 16, "tensor and metadata counts")
        if n_kv > (self.size - self.pos) // _MIN_KV_BYTES:
            raise self.corrupt(f"{n_kv} metadata entries cannot fit the {self.size}-byte file")
        if n_tensors > (self.size - self.pos) // _MIN_TENSOR_INFO_BYTES:
            raise self.corrupt(f"{n_tensors} tensor infos cannot fit the {self.size}-byte file")

        fields: dict[str, GGUFValue] = {}
        for i in range(n_kv):
            key = self.text(f"metadata key {i}")
            if key in fields:
                raise self.corrupt(f"duplicate metadata key {key!r}")
            vtype = self.value_type(f"value type of {key!r}")
            fields[key] = self.value(vtype, key)

        alignment = DEFAULT_ALIGNMENT
        if ALIGNMENT_KEY in fields:
            a = fields[ALIGNMENT_KEY]
            if a.type is not V.UINT32:
                raise self.corrupt(f"{ALIGNMENT_KEY} is {a.type.name}, not UINT32")
            if a.value == 0 or a.value & (a.value - 1):
                raise self.corrupt(f"{ALIGNMENT_KEY} {a.value} is not a power of two")
            alignment = a.value

        infos = [self.tensor_info(i) for i in range(n_tensors)]
        data_offset = -(-self.pos // alignment) * alignment
        tensors: dict[str, TensorInfo] = {}
        for name, shape, qtype, offset in infos:
            if name in tensors:
                raise self.corrupt(f"duplicate tensor name {name!r}")
            if offset % alignment:
                raise self.corrupt(f"tensor {name!r} offset {offset} is not a multiple of the alignment {alignment}")
            block, type_size = BLOCK_SIZES[qtype]
            nbytes = math.prod(shape) // block * type_size
            start = data_offset + offset
            if start + nbytes > self.size:
                raise CheckpointError(f"{self.path} is truncated: tensor {name!r} ends at byte {start + nbytes} "
                                      f"of the {self.size}-byte file")
            tensors[name] = TensorInfo(name, shape, qtype, start, nbytes)
        end, last = 0, None
        for t in sorted(tensors.values(), key=lambda t: t.offset):
            if t.offset < end:
                raise self.corrupt(f"tensors {last!r} and {t.name!r} overlap")
            end, last = t.offset + t.nbytes, t.name
        return version, fields, tensors, alignment, data_offset

    def tensor_info(self, i: int) -> tuple[str, tuple[int, ...], GGMLType, int]:
        name = self.text(f"name of tensor {i}")
        n_dims = self.u32(f"n_dims of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise self.corrupt(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
        shape = self.unpack(f"<{n_dims}Q", 8 * n_dims, f"shape of tensor {name!r}")
        if any(d == 0 or d >= 1 << 63 for d in shape):  # ne is int64 in ggml: >= 2**63 is negative
            raise self.corrupt(f"tensor {name!r} has a dimension <= 0 in shape {shape}")
        if math.prod(shape) >= 1 << 63:
            raise self.corrupt(f"tensor {name!r} of shape {shape} has too many elements")
        type_id = self.u32(f"type of tensor {name!r}")
        try:
            qtype = GGMLType(type_id)
        except ValueError:
            raise self.corrupt(f"tensor {name!r} has unknown ggml type {type_id}") from None
        if qtype not in BLOCK_SIZES:
            raise self.corrupt(f"tensor {name!r} has unsupported ggml type {type_id} ({qtype.name})")
        block = BLOCK_SIZES[qtype][0]
        if (shape[0] if shape else 1) % block:
            raise self.corrupt(f"tensor {name!r} rows of {shape[0] if shape else 1} elements are not a multiple "
                               f"of the {qtype.name} block size {block}")
        offset = self.u64(f"offset of tensor {name!r}")
        return name, shape, qtype, offset


# --- writing ----------------------------------------------------------------------------------

def write_gguf(path: str | Path, metadata: Mapping[str, Any],
               tensors: Iterable[tuple[str, GGMLType | int, tuple[int, ...] | list[int], np.ndarray | torch.Tensor]],
               *, alignment: int | None = None) -> None:
    """Write a GGUF v3 file atomically (a temporary file in the same folder, then a rename).

    metadata: key -> value, written in the mapping's order. A `GGUFValue` is written with its
      type as given; plain values get a type by this rule:
        bool -> BOOL; int -> UINT32 if 0 <= v < 2**32, else INT64, else UINT64;
        float -> FLOAT32; str -> STRING; numpy scalars -> their own type (np.float64 -> FLOAT64);
        list/tuple of str -> ARRAY of STRING; of bool -> ARRAY of BOOL;
        of int -> ARRAY of INT32 (INT64 if any value does not fit);
        of int and float -> ARRAY of FLOAT32; of lists -> ARRAY of ARRAY (each inferred);
        a 1-D numpy array -> ARRAY of its dtype's type. Empty lists need a GGUFValue.
      `GGUFFile.fields` passes back unchanged, so a read file can be rewritten faithfully.
    tensors: (name, ggml type, row-major shape, data), data written in this order. `data` is
      the raw bytes as a uint8 numpy array or tensor of exactly the tensor's byte size, or, for
      types with a torch dtype (F32, F16, BF16, F64, I8..I64), a tensor or array of that dtype
      and `shape`. Data is streamed to the file one tensor at a time.
    alignment: of the data section; None takes `general.alignment` from `metadata`, else 32.
      Another value than 32 is recorded as `general.alignment` when metadata lacks it.
    """
    path = Path(path)
    kv, alignment = _encode_metadata(metadata, alignment)
    tensors = list(tensors)
    infos, specs = bytearray(), []
    offset = 0
    seen: set[str] = set()
    for item in tensors:
        try:
            name, qtype, shape, data = item
        except (TypeError, ValueError):
            raise InvalidArgument("each tensor is a tuple (name, ggml type, shape, data)") from None
        qtype, shape, nbytes = _check_tensor(name, qtype, shape, data, seen)
        infos += _string(name) + struct.pack("<I", len(shape))
        infos += struct.pack(f"<{len(shape)}Q", *shape[::-1]) + struct.pack("<IQ", qtype, offset)
        specs.append((data, nbytes))
        offset += -(-nbytes // alignment) * alignment

    header = MAGIC + struct.pack("<IQQ", 3, len(tensors), len(kv)) + b"".join(kv) + infos
    header += bytes(-len(header) % alignment)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror} ({path.parent})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            for data, nbytes in specs:
                f.write(memoryview(_bytes(data)))
                f.write(bytes(-nbytes % alignment))
        os.chmod(tmp, 0o644)  # mkstemp creates files private to the user; checkpoints are shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _string(s: str, what: str = "string") -> bytes:
    try:
        b = s.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} {s!r} cannot be encoded as UTF-8") from None
    return struct.pack("<Q", len(b)) + b


def _check_tensor(name: Any, qtype: Any, shape: Any, data: Any,
                  seen: set[str]) -> tuple[GGMLType, tuple[int, ...], int]:
    """Validate one tensor of `write_gguf`: its type, row-major shape and byte size."""
    if not isinstance(name, str) or name in seen:
        raise InvalidArgument(f"tensor name {name!r} is not a string or is used twice")
    seen.add(name)
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidArgument(f"tensor name {name!r} is longer than {MAX_NAME_BYTES} bytes (llama.cpp's limit)")
    try:
        qtype = GGMLType(qtype)
    except ValueError:
        raise InvalidArgument(f"tensor {name!r}: unknown ggml type {qtype}") from None
    if qtype not in BLOCK_SIZES:
        raise InvalidArgument(f"tensor {name!r}: unsupported ggml type {qtype.name}")
    try:
        shape = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise InvalidArgument(f"tensor {name!r}: shape {shape!r} is not a sequence of ints") from None
    if len(shape) > MAX_DIMS or any(d <= 0 for d in shape) or math.prod(shape) >= 1 << 63:
        raise InvalidArgument(f"tensor {name!r}: bad shape {shape} (at most {MAX_DIMS} dimensions, each > 0)")
    block, type_size = BLOCK_SIZES[qtype]
    if (shape[-1] if shape else 1) % block:
        raise InvalidArgument(f"tensor {name!r}: rows of {shape[-1] if shape else 1} elements are not a "
                              f"multiple of the {qtype.name} block size {block}")
    nbytes = math.prod(shape) // block * type_size
    if isinstance(data, torch.Tensor):
        dtype, got_shape, got_bytes = data.dtype, tuple(data.shape), data.numel() * data.element_size()
        native = TORCH_DTYPES.get(qtype)
        raw = dtype == torch.uint8
    elif isinstance(data, np.ndarray):
        dtype, got_shape, got_bytes = data.dtype, data.shape, data.nbytes
        native = _NUMPY_DTYPES.get(qtype)
        raw = dtype == np.uint8
    else:
        raise InvalidArgument(f"tensor {name!r}: data must be a numpy array or a torch tensor, "
                              f"got {type(data).__name__}")
    if raw:
        if got_bytes != nbytes:
            raise InvalidArgument(f"tensor {name!r}: {qtype.name} shape {shape} takes {nbytes} bytes, got {got_bytes}")
    elif native is None or dtype != native or got_shape != shape:
        raise InvalidArgument(f"tensor {name!r}: data of dtype {dtype} and shape {got_shape} does not match "
                              f"{qtype.name} {shape} (pass raw uint8 bytes or a tensor of the type's own dtype)")
    return qtype, shape, nbytes


_NUMPY_DTYPES = {GGMLType.F32: np.dtype("<f4"), GGMLType.F16: np.dtype("<f2"), GGMLType.F64: np.dtype("<f8"),
                 GGMLType.I8: np.dtype("i1"), GGMLType.I16: np.dtype("<i2"), GGMLType.I32: np.dtype("<i4"),
                 GGMLType.I64: np.dtype("<i8")}


def _bytes(data: np.ndarray | torch.Tensor) -> np.ndarray:
    """The bytes of a tensor's data as a flat uint8 array (a view where possible)."""
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def _encode_metadata(metadata: Mapping[str, Any], alignment: int | None) -> tuple[list[bytes], int]:
    if not isinstance(metadata, Mapping):
        raise InvalidArgument("metadata must be a mapping of str keys to values")
    kv, typed = [], {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise InvalidArgument(f"metadata key {key!r} is not a string")
        typed[key] = v = _typed(value, key)
        kv.append(_string(key, "metadata key") + struct.pack("<I", v.type) + _encode(v, key))
    if alignment is not None and not _power_of_two(alignment):
        raise InvalidArgument(f"alignment must be a power of two below 2**32, got {alignment!r}")
    if ALIGNMENT_KEY in typed:
        a = typed[ALIGNMENT_KEY]
        if a.type is not V.UINT32:
            raise InvalidArgument(f"{ALIGNMENT_KEY} must be UINT32, got {a.type.name}")
        if not _power_of_two(a.value):
            raise InvalidArgument(f"{ALIGNMENT_KEY} must be a power of two, got {a.value}")
        if alignment is not None and alignment != a.value:
            raise InvalidArgument(f"alignment={alignment} contradicts {ALIGNMENT_KEY}={a.value} in metadata")
        return kv, a.value
    if alignment is not None and alignment != DEFAULT_ALIGNMENT:
        kv.append(_string(ALIGNMENT_KEY) + struct.pack("<II", V.UINT32, alignment))
    return kv, alignment or DEFAULT_ALIGNMENT


def _power_of_two(n: Any) -> bool:
    return type(n) is int and 0 < n < 1 << 32 and not n & (n - 1)


def _typed(value: Any, key: str) -> GGUFValue:
    """A plain Python value -> GGUFValue, by the rule in `write_gguf`."""
    if isinstance(value, GGUFValue):
        vtype = _value_type(value.type, key)
        if vtype is not V.ARRAY:
            return GGUFValue(value.value, vtype)
        if value.sub_type is None:
            return GGUFValue(value.value, V.ARRAY, _typed(value.value, key).sub_type)
        return GGUFValue(value.value, V.ARRAY, _value_type(value.sub_type, key))
    if isinstance(value, (bool, np.bool_)):
        return GGUFValue(bool(value), V.BOOL)
    if isinstance(value, np.generic) and value.dtype in _DTYPE_TYPES:
        return GGUFValue(value.item(), _DTYPE_TYPES[value.dtype])
    if isinstance(value, int):
        vtype = V.UINT32 if 0 <= value < 1 << 32 else V.INT64 if -(1 << 63) <= value < 1 << 63 else V.UINT64
        return GGUFValue(value, vtype)
    if isinstance(value, float):
        return GGUFValue(value, V.FLOAT32)
    if isinstance(value, str):
        return GGUFValue(value, V.STRING)
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.newbyteorder("<") not in _DTYPE_TYPES:
            raise InvalidArgument(f"metadata {key!r}: numpy arrays must be 1-D of a GGUF number type")
        return GGUFValue(value, V.ARRAY, _DTYPE_TYPES[value.dtype.newbyteorder("<")])
    if isinstance(value, (list, tuple)):
        if not value:
            raise InvalidArgument(f"metadata {key!r}: the element type of an empty list is unknown (use GGUFValue)")
        kinds = {_kind(x) for x in value}
        if kinds == {"str"}:
            return GGUFValue(value, V.ARRAY, V.STRING)
        if kinds == {"bool"}:
            return GGUFValue(value, V.ARRAY, V.BOOL)
        if kinds == {"int"}:
            fits = all(-(1 << 31) <= x < 1 << 31 for x in value)
            return GGUFValue(value, V.ARRAY, V.INT32 if fits else V.INT64)
        if kinds <= {"int", "float"}:
            return GGUFValue(value, V.ARRAY, V.FLOAT32)
        if kinds == {"array"}:
            return GGUFValue([_typed(x, key) for x in value], V.ARRAY, V.ARRAY)
        raise InvalidArgument(f"metadata {key!r}: cannot infer one element type for a list of {sorted(kinds)}")
    raise InvalidArgument(f"metadata {key!r}: cannot store a value of type {type(value).__name__}")


def _value_type(t: Any, key: str) -> GGUFValueType:
    try:
        return GGUFValueType(t)
    except ValueError:
        raise InvalidArgument(f"metadata {key!r}: unknown value type {t!r}") from None


_DTYPE_TYPES = {d: t for t, d in _SCALARS.items() if t is not V.BOOL} | {np.dtype(bool): V.BOOL}


def _kind(x: Any) -> str:
    if isinstance(x, (bool, np.bool_)):
        return "bool"
    if isinstance(x, (int, np.integer)):
        return "int"
    if isinstance(x, (float, np.floating)):
        return "float"
    if isinstance(x, str):
        return "str"
    if isinstance(x, (list, tuple, np.ndarray, GGUFValue)):
        return "array"
    return type(x).__name__


def _encode(v: GGUFValue, key: str) -> bytes:
    """The bytes of a value (without its leading type), checked against its type's range."""
    vtype, value = v.type, v.value
    if vtype is V.STRING:
        if not isinstance(value, str):
            raise InvalidArgument(f"metadata {key!r}: STRING value {value!r} is not a str")
        return _string(value, f"metadata {key!r} value")
    if vtype is V.ARRAY:
        sub = v.sub_type
        if isinstance(value, GGUFValue) or not isinstance(value, (list, tuple, np.ndarray)):
            raise InvalidArgument(f"metadata {key!r}: ARRAY value must be a list, tuple or numpy array")
        head = struct.pack("<IQ", sub, len(value))
        if sub is V.STRING:
            if not all(isinstance(x, str) for x in value):
                raise InvalidArgument(f"metadata {key!r}: an ARRAY of STRING holds a non-str value")
            return head + b"".join(_string(x, f"metadata {key!r} value") for x in value)
        if sub is V.ARRAY:
            parts = []
            for x in value:
                inner = _typed(x, key)
                if inner.type is not V.ARRAY:
                    raise InvalidArgument(f"metadata {key!r}: an ARRAY of ARRAY holds a {inner.type.name}")
                parts.append(_encode(inner, key))  # inner arrays carry no type tag of their own
            return head + b"".join(parts)
        return head + _number_array(value, sub, key)
    return _number(value, vtype, key)


def _number(value: Any, vtype: GGUFValueType, key: str) -> bytes:
    kind = _kind(value)
    if vtype is V.BOOL:
        ok = kind == "bool" or (kind == "int" and value in (0, 1))
    else:
        ok = kind == "int" if vtype in _INT_RANGES else kind in ("int", "float")
    if not ok:
        raise InvalidArgument(f"metadata {key!r}: {value!r} is not a {vtype.name} value")
    try:
        return struct.pack(_STRUCT[vtype], value)
    except (struct.error, OverflowError):
        raise InvalidArgument(f"metadata {key!r}: {value!r} does not fit {vtype.name}") from None


def _number_array(value: Any, sub: GGUFValueType, key: str) -> bytes:
    dtype = _SCALARS[sub]
    bad = InvalidArgument(f"metadata {key!r}: array of {sub.name} holds values that are not {sub.name}")
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise InvalidArgument(f"metadata {key!r}: array of {sub.name} must be flat")
        kinds = {"b": {"bool"}, "i": {"int"}, "u": {"int"}, "f": {"float"}}.get(value.dtype.kind, {"other"})
    else:
        kinds = {_kind(x) for x in value}
    if sub is V.BOOL:
        allowed, bounds = {"bool", "int"}, (0, 1)
    elif sub in _INT_RANGES:
        allowed, bounds = {"int"}, _INT_RANGES[sub]
    else:
        allowed, bounds = {"int", "float"}, None
    if len(value) and not kinds <= allowed:
        raise bad
    if bounds is not None and len(value):
        lo, hi = (value.min(), value.max()) if isinstance(value, np.ndarray) else (min(value), max(value))
        if int(lo) < bounds[0] or int(hi) > bounds[1]:
            raise bad
    try:
        with np.errstate(over="ignore"):
            out = np.array(value, dtype=dtype)
        if bounds is None and (np.isinf(out) & ~np.isinf(np.asarray(value, dtype=np.float64))).any():
            raise InvalidArgument(f"metadata {key!r}: array holds values too large for {sub.name}")
    except OverflowError:
        raise bad from None
    return out.tobytes()
