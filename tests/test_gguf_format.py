"""GGUF container: our reader against llama.cpp's `gguf.GGUFReader` on real files, files written
by `gguf.GGUFWriter` read back exactly, files we write read exactly by the reference (and byte
for byte equal to what it writes), faithful rewrites, and corrupt files refused as one-line
CheckpointErrors (targeted cases for each rule, plus hypothesis-driven flips, overwrites and
truncations)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from itertools import count
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from emergence.errors import CheckpointError, InvalidArgument
from emergence.gguf import (BLOCK_SIZES, GGMLType, GGUFFile, GGUFValue, GGUFValueType, read_gguf, write_gguf)
from emergence.gguf import quants

from conftest import SHARED_DATA, bounded, shared_files

V = GGUFValueType
TINY_LLAMA = SHARED_DATA / "gguf_models" / "llama-2-tiny-random.gguf"
VOCABS = shared_files("gguf_vocab", "*.gguf")
REAL_FILES = [TINY_LLAMA, *VOCABS]


# ----------------------------------------------------------------- the reference, in the background
# gguf.GGUFReader takes 10-20 s of CPU for these files (numpy views per string), as much as the
# rest of this module together. It runs in two child processes started when the module starts, so
# the reference parse overlaps the other tests; the comparisons at the end of the module wait for it.
REFERENCE_SCRIPT = r"""
import json, sys, types
import numpy as np
import gguf, gguf.gguf_reader

# Same parse, on a plain ndarray view of the same memory map: np.memmap's per-view bookkeeping
# would triple the time and changes no value.
shim = types.ModuleType("numpy")
shim.__dict__.update(np.__dict__)
shim.memmap = lambda path, mode="r": np.memmap(path, mode=mode).view(np.ndarray)
gguf.gguf_reader.np = shim

out, *paths = sys.argv[1:]
results = {}
for path in paths:
    r = gguf.GGUFReader(path)
    # Plain JSON values now, while this file's map is still open (later readers reuse the memory).
    results[path] = json.loads(json.dumps(dict(
        fields={k: ([t.name for t in f.types], f.contents()) for k, f in r.fields.items()},
        tensors=[(t.name, int(t.tensor_type), [int(d) for d in t.shape], int(t.data_offset), int(t.n_bytes),
                  t.data.tobytes().hex()) for t in r.tensors],
        alignment=int(r.alignment), data_offset=int(r.data_offset)), default=lambda o: o.tolist()))
with open(out, "w") as f:  # JSON, not pickle: nothing read back here can run code
    json.dump(results, f)
"""


@pytest.fixture(scope="module", autouse=True)
def reference(tmp_path_factory):
    """path -> what gguf.GGUFReader reads from it, for every file in REAL_FILES."""
    folder = tmp_path_factory.mktemp("reference")
    groups: list[list[Path]] = [[], []]
    for path in sorted(REAL_FILES, key=lambda p: -p.stat().st_size):  # balance the bytes
        min(groups, key=lambda g: sum(p.stat().st_size for p in g)).append(path)
    jobs = []
    for i, group in enumerate(groups):
        out, err = folder / f"ref{i}.json", open(folder / f"ref{i}.err", "wb")
        proc = subprocess.Popen([sys.executable, "-c", REFERENCE_SCRIPT, str(out), *map(str, group)],
                                stdout=subprocess.DEVNULL, stderr=err)
        jobs.append((proc, out, err))
    results: dict[str, dict] = {}

    def get(path: Path) -> dict:
        if not results:
            for proc, out, err in jobs:
                assert proc.wait() == 0, Path(err.name).read_text()
                for name, ref in json.loads(out.read_text()).items():
                    for t in ref["tensors"]:
                        t[5] = bytes.fromhex(t[5])
                    results[name] = ref
        return results[str(path)]

    yield get
    for proc, _, err in jobs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()


# ----------------------------------------------------------------- helpers
def types_of(v: GGUFValue) -> list[str]:
    """Our typed value in GGUFReader's `types` notation: ['ARRAY', 'STRING'], ['UINT32']..."""
    return [v.type.name] + ([v.sub_type.name] if v.type is V.ARRAY else [])


def rewrite(f: GGUFFile, path: Path, **kw) -> None:
    write_gguf(path, f.fields, [(t.name, t.type, t.torch_shape, f.raw(t.name)) for t in f.tensors.values()], **kw)


def one_line(e: pytest.ExceptionInfo, path: Path) -> str:
    message = str(e.value)
    assert "\n" not in message and path.name in message, message
    return message


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def tensor_info(name: str, ne: tuple[int, ...], qtype: int, offset: int) -> bytes:
    return s(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, qtype, offset)


def gguf_bytes(kvs: list[bytes] = (), infos: list[bytes] = (), data: bytes = b"", *, version: int = 3,
               n_kv: int | None = None, n_tensors: int | None = None, alignment: int = 32,
               magic: bytes = b"GGUF") -> bytes:
    """A GGUF file assembled by hand, so that the header can say anything. Without tensors it
    ends right after the header (no padding that a short count could read as one more entry)."""
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos)
    if not infos and not data:
        return head
    return head + bytes(-len(head) % alignment) + data


# ----------------------------------------------------------------- reference writer -> our reader
# (key, type, element type, value as read back); every value type, arrays of each, a nested array.
TYPED_METADATA = [
    ("general.architecture", V.STRING, None, "llama"),
    ("t.u8", V.UINT8, None, 255), ("t.i8", V.INT8, None, -128),
    ("t.u16", V.UINT16, None, 65535), ("t.i16", V.INT16, None, -32768),
    ("t.u32", V.UINT32, None, 4294967295), ("t.i32", V.INT32, None, -2147483648),
    ("t.u64", V.UINT64, None, 2**64 - 1), ("t.i64", V.INT64, None, -(2**63)),
    ("t.f32", V.FLOAT32, None, -1.5), ("t.f64", V.FLOAT64, None, 0.1),
    ("t.bool", V.BOOL, None, True), ("t.false", V.BOOL, None, False),
    ("t.str", V.STRING, None, "héllo ✓ 日本"), ("t.empty_str", V.STRING, None, ""),
    ("t.a_u8", V.ARRAY, V.UINT8, [0, 1, 255]), ("t.a_i8", V.ARRAY, V.INT8, [-128, 127]),
    ("t.a_u16", V.ARRAY, V.UINT16, [65535, 0]), ("t.a_i16", V.ARRAY, V.INT16, [-32768, 5]),
    ("t.a_u32", V.ARRAY, V.UINT32, [2**32 - 1]), ("t.a_i32", V.ARRAY, V.INT32, [-(2**31), 2**31 - 1, 0]),
    ("t.a_u64", V.ARRAY, V.UINT64, [2**64 - 1, 3]), ("t.a_i64", V.ARRAY, V.INT64, [-(2**63), 2**63 - 1]),
    ("t.a_f32", V.ARRAY, V.FLOAT32, [0.5, -2.25, 2.0**40]), ("t.a_f64", V.ARRAY, V.FLOAT64, [0.1, -1e300]),
    ("t.a_bool", V.ARRAY, V.BOOL, [True, False, True]), ("t.a_str", V.ARRAY, V.STRING, ["a", "", "ü\n\x00z"]),
    ("t.nested", V.ARRAY, V.ARRAY, [[1, 2], [3.5, 4.5], ["x"]]),
]


def expected_fields() -> dict[str, GGUFValue]:
    out = {}
    for key, vtype, sub, value in TYPED_METADATA:
        if sub is V.ARRAY:
            subs = [V.INT32, V.FLOAT32, V.STRING]
            value = [GGUFValue(x, V.ARRAY, t) for x, t in zip(value, subs)]
        out[key] = GGUFValue(value, vtype, sub)
    return out


def reference_tensors() -> list[tuple[str, GGMLType, tuple[int, ...], np.ndarray]]:
    """(name, type, row-major shape, raw bytes) of F32, F16, BF16, Q8_0, Q4_0 and Q4_K tensors."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    q = gguf.GGMLQuantizationType
    k_raw = rng.integers(0, 256, (2, 144), dtype=np.uint8)
    k_raw[:, 0:4] = np.array([0.01, 0.002], dtype=np.float16).view(np.uint8)  # finite d and dmin
    return [
        ("f32", GGMLType.F32, (3, 64), x.view(np.uint8)),
        ("f16", GGMLType.F16, (3, 64), x.astype(np.float16).view(np.uint8)),
        ("bf16", GGMLType.BF16, (3, 64), gguf.quants.quantize(x, q.BF16)),
        ("q8_0", GGMLType.Q8_0, (3, 64), gguf.quants.quantize(x, q.Q8_0)),
        ("q4_0.vec", GGMLType.Q4_0, (64,), gguf.quants.quantize(x[0], q.Q4_0)),
        ("q4_k", GGMLType.Q4_K, (2, 256), k_raw),
    ]


def write_with_reference(path: Path, alignment: int | None = None) -> None:
    w = gguf.GGUFWriter(path, arch="llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, vtype, sub, value in TYPED_METADATA[1:]:  # general.architecture: written by the constructor
        w.add_key_value(key, value, vtype, sub_type=sub)
    for name, qtype, shape, raw in reference_tensors():
        if qtype is GGMLType.F32:
            w.add_tensor(name, raw.view(np.float32).reshape(shape))
        elif qtype is GGMLType.F16:
            w.add_tensor(name, raw.view(np.float16).reshape(shape))
        else:
            w.add_tensor(name, raw.reshape(*shape[:-1], -1), raw_dtype=gguf.GGMLQuantizationType(int(qtype)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_reference_writer_files_read_exactly(tmp_path, alignment):
    path = tmp_path / "ref.gguf"
    write_with_reference(path, alignment)
    f, r = read_gguf(path), gguf.GGUFReader(path)
    expected = expected_fields()
    if alignment is not None:
        expected = {"general.architecture": expected.pop("general.architecture"),
                    "general.alignment": GGUFValue(alignment, V.UINT32), **expected}
    assert f.fields == expected and list(f.fields) == list(expected)
    assert f.metadata["t.nested"] == [[1, 2], [3.5, 4.5], ["x"]] and f.metadata["t.a_str"] == ["a", "", "ü\n\x00z"]
    assert (f.version, f.alignment, f.data_offset) == (3, alignment or 32, r.data_offset)
    assert list(f.tensors) == [t.name for t in r.tensors]
    for (name, qtype, shape, raw), t in zip(reference_tensors(), r.tensors):
        info = f.tensors[name]
        assert (info.type, info.torch_shape, info.shape, info.offset, info.nbytes) == \
            (qtype, shape, tuple(t.shape.tolist()), t.data_offset, t.n_bytes)
        assert info.offset % (alignment or 32) == 0
        assert np.array_equal(f.raw(name).reshape(-1), raw.reshape(-1))
        assert not f.raw(name).flags.writeable
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        got = f.tensor(name)
        assert got.dtype == torch.float32 and tuple(got.shape) == shape and np.array_equal(got.numpy(), ref)


def test_our_writer_matches_reference_writer_byte_for_byte(tmp_path):
    """Same typed metadata and tensors: the file is the reference writer's, byte for byte."""
    for alignment in (None, 64):
        theirs, ours = tmp_path / f"theirs{alignment}.gguf", tmp_path / f"ours{alignment}.gguf"
        write_with_reference(theirs, alignment)
        metadata = {k: GGUFValue(v, t, sub) for k, t, sub, v in TYPED_METADATA}
        if alignment is not None:
            metadata = {"general.architecture": metadata.pop("general.architecture"),
                        "general.alignment": GGUFValue(alignment, V.UINT32), **metadata}
        write_gguf(ours, metadata, reference_tensors())
        assert ours.read_bytes() == theirs.read_bytes()


def test_reference_reads_what_we_write(tmp_path):
    """Plain values (types inferred), torch tensors in their own dtype, quantized bytes."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    metadata = {"general.architecture": "llama", "n": 7, "neg": -7, "big": 2**40, "huge": 2**63, "eps": 1e-5,
                "exact": np.float64(0.1), "flag": True, "name": "tiny", "tokens": ["<s>", "a", "b"],
                "ids": [1, -2, 3], "wide": [1, 2**40], "scores": [0.5, -1.0], "mask": [True, False],
                "u16": np.array([1, 2, 3], dtype=np.uint16), "rows": [[1, 2], [0.5]]}
    tensors = [("w32", GGMLType.F32, (4, 64), x), ("w16", GGMLType.F16, (4, 64), x.half()),
               ("wbf", GGMLType.BF16, (4, 64), x.bfloat16()),
               ("q8", GGMLType.Q8_0, (4, 64), quants.quantize(x, GGMLType.Q8_0)),
               ("q4", GGMLType.Q4_0, (4, 64), torch.from_numpy(quants.quantize(x, GGMLType.Q4_0)))]
    path = tmp_path / "ours.gguf"
    write_gguf(path, metadata, tensors)
    r = gguf.GGUFReader(path)
    expected_types = {"general.architecture": ["STRING"], "n": ["UINT32"], "neg": ["INT64"], "big": ["INT64"],
                      "huge": ["UINT64"], "eps": ["FLOAT32"], "exact": ["FLOAT64"], "flag": ["BOOL"],
                      "name": ["STRING"], "tokens": ["ARRAY", "STRING"], "ids": ["ARRAY", "INT32"],
                      "wide": ["ARRAY", "INT64"], "scores": ["ARRAY", "FLOAT32"], "mask": ["ARRAY", "BOOL"],
                      "u16": ["ARRAY", "UINT16"], "rows": ["ARRAY", "ARRAY", "INT32"]}
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert {k: [t.name for t in f.types] for k, f in fields.items()} == expected_types
    for key, value in metadata.items():
        got = fields[key].contents()
        if key == "eps":
            assert got == float(np.float32(1e-5))
        elif key == "rows":
            assert got == [1, 2, 0.5]  # GGUFReader flattens nested arrays
        elif key == "u16":
            assert got == [1, 2, 3]
        else:
            assert got == value, key
    for (name, qtype, shape, data), t in zip(tensors, r.tensors):
        assert (t.name, int(t.tensor_type), tuple(t.shape.tolist())) == (name, qtype, shape[::-1])
        raw = data.contiguous().view(torch.uint8).numpy() if isinstance(data, torch.Tensor) else data
        assert t.data.tobytes() == raw.tobytes()
    f = read_gguf(path)
    assert torch.equal(f.tensor("w32", native=True), x) and torch.equal(f.tensor("wbf", native=True), x.bfloat16())
    assert f.fields["rows"] == GGUFValue([GGUFValue([1, 2], V.ARRAY, V.INT32), GGUFValue([0.5], V.ARRAY, V.FLOAT32)],
                                         V.ARRAY, V.ARRAY)


def test_round_trip_is_byte_identical(tmp_path):
    """our write -> our read -> our write: same bytes, same typed metadata, same tensor data."""
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_gguf(a, {k: GGUFValue(v, t, sub) for k, t, sub, v in TYPED_METADATA}, reference_tensors(), alignment=128)
    f = read_gguf(a)
    assert f.alignment == 128 and f.fields["general.alignment"] == GGUFValue(128, V.UINT32)
    rewrite(f, b)
    assert b.read_bytes() == a.read_bytes()
    g = read_gguf(b)
    assert g.fields == f.fields and g.metadata == f.metadata and g.tensors == f.tensors
    for name, qtype, shape, raw in reference_tensors():
        assert np.array_equal(g.raw(name).reshape(-1), raw.reshape(-1))
        native = g.tensor(name, native=True)
        if qtype in quants.TORCH_DTYPES:
            assert native.dtype == quants.TORCH_DTYPES[qtype] and native.shape == shape
            assert native.reshape(-1).view(torch.uint8).numpy().tobytes() == raw.tobytes()


def test_native_views_need_no_copy_and_survive_odd_alignment(tmp_path):
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    path = tmp_path / "a.gguf"
    for pad in range(4):  # alignment 1: some padding string leaves the floats at an odd offset
        write_gguf(path, {"general.alignment": GGUFValue(1, V.UINT32), "pad": "x" * pad},
                   [("b", GGMLType.I8, (3,), torch.tensor([1, 2, 3], dtype=torch.int8)),
                    ("x", GGMLType.F32, (3, 4), x), ("i", GGMLType.I64, (2,), np.array([5, -6], dtype=np.int64))])
        f = read_gguf(path)
        if f.tensors["x"].offset % 4:
            break
    assert f.tensors["x"].offset % 4 != 0  # unaligned: a copy, same values
    assert torch.equal(f.tensor("x", native=True), x) and torch.equal(f.tensor("x"), x)
    assert f.tensor("i", native=True).tolist() == [5, -6] and f.tensor("i").dtype == torch.float32


def test_writer_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_gguf(path, {"a": 1}, [("x", GGMLType.F32, (4,), torch.zeros(4))])
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.gguf"]
    monkeypatch.undo()
    write_gguf(path, {"a": 1}, [])
    assert read_gguf(path).metadata == {"a": 1} and os.listdir(tmp_path) == ["m.gguf"]
    assert os.stat(path).st_mode & 0o777 == 0o644


@pytest.mark.parametrize("metadata, tensors, message", [
    ({"e": []}, [], "empty list"),
    ({"m": [1, "a"]}, [], "one element type"),
    ({"o": object()}, [], "cannot store"),
    ({1: 2}, [], "not a string"),
    ({"u8": GGUFValue(256, V.UINT8)}, [], "does not fit UINT8"),
    ({"i": GGUFValue(1.5, V.INT32)}, [], "not a INT32"),
    ({"b": GGUFValue(2, V.BOOL)}, [], "not a BOOL"),
    ({"a": GGUFValue([1, 300], V.ARRAY, V.UINT8)}, [], "not UINT8"),
    ({"a": GGUFValue([1.5], V.ARRAY, V.INT32)}, [], "not INT32"),
    ({"a": GGUFValue(["x", 1], V.ARRAY, V.STRING)}, [], "non-str"),
    ({"a": GGUFValue([1e300], V.ARRAY, V.FLOAT32)}, [], "too large"),
    ({"t": GGUFValue(1, 99)}, [], "unknown value type"),
    ({"s": "\ud800"}, [], "UTF-8"),
    ({"general.alignment": GGUFValue(48, V.UINT32)}, [], "power of two"),
    ({"general.alignment": 64}, [], None),  # ok: an int that fits is UINT32
    ({"general.alignment": GGUFValue(64, V.INT32)}, [], "must be UINT32"),
    ({}, [("x", GGMLType.F32, (2,), torch.zeros(2)), ("x", GGMLType.F32, (2,), torch.zeros(2))], "used twice"),
    ({}, [("x" * 64, GGMLType.F32, (2,), torch.zeros(2))], "longer than 63"),
    ({}, [("x", GGMLType.IQ2_XXS, (256,), np.zeros(66, np.uint8))], "unsupported ggml type IQ2_XXS"),
    ({}, [("x", 77, (2,), torch.zeros(2))], "unknown ggml type 77"),
    ({}, [("x", GGMLType.F32, (2, 0), torch.zeros(2, 0))], "bad shape"),
    ({}, [("x", GGMLType.F32, (1, 1, 1, 1, 2), torch.zeros(1, 1, 1, 1, 2))], "bad shape"),
    ({}, [("x", GGMLType.Q8_0, (2, 16), np.zeros(34, np.uint8))], "multiple of the Q8_0 block size 32"),
    ({}, [("x", GGMLType.Q8_0, (32,), np.zeros(33, np.uint8))], "takes 34 bytes, got 33"),
    ({}, [("x", GGMLType.F16, (2,), torch.zeros(2))], "does not match"),
    ({}, [("x", GGMLType.F32, (2,), torch.zeros(3))], "does not match"),
    ({}, [("x", GGMLType.F32, (2,), [0.0, 1.0])], "numpy array or a torch tensor"),
    ({}, [("x", GGMLType.F32)], "tuple"),
])
def test_writer_refuses_bad_input(tmp_path, metadata, tensors, message):
    path = tmp_path / "bad.gguf"
    if message is None:
        write_gguf(path, metadata, tensors)
        assert read_gguf(path).alignment == 64
        return
    with pytest.raises(InvalidArgument, match=message):
        write_gguf(path, metadata, tensors)
    assert not path.exists() and os.listdir(tmp_path) == []


def test_writer_alignment_argument(tmp_path):
    with pytest.raises(InvalidArgument, match="contradicts"):
        write_gguf(tmp_path / "a.gguf", {"general.alignment": 64}, [], alignment=32)
    with pytest.raises(InvalidArgument, match="power of two"):
        write_gguf(tmp_path / "a.gguf", {}, [], alignment=24)
    write_gguf(tmp_path / "a.gguf", {"k": 1}, [("x", GGMLType.F32, (3,), torch.ones(3))], alignment=256)
    f = read_gguf(tmp_path / "a.gguf")
    assert list(f.metadata.items()) == [("k", 1), ("general.alignment", 256)]
    assert f.data_offset % 256 == 0 and f.tensors["x"].offset == f.data_offset


# ----------------------------------------------------------------- targeted validation
F32_INFO = tensor_info("w", (8,), GGMLType.F32, 0)
F32_DATA = bytes(32)
CASES = {
    "bad magic": (gguf_bytes(magic=b"GGML"), "bad magic b'GGML'"),
    "version 1": (gguf_bytes(version=1), "GGUF version 1 is not supported"),
    "version 4": (gguf_bytes(version=4), "GGUF version 4 is not supported"),
    "big-endian": (gguf_bytes(version=3 << 24), "big-endian"),
    "absurd tensor count": (gguf_bytes(n_tensors=2**63), "9223372036854775808 tensor infos cannot fit"),
    "absurd kv count": (gguf_bytes(n_kv=2**64 - 1), "metadata entries cannot fit"),
    "kv count one too many": (gguf_bytes([kv("a", V.UINT8, b"\x01")], n_kv=2), "2 metadata entries cannot fit"),
    "kv value cut short": (gguf_bytes([kv("a", V.UINT64, b"\x01" * 7)]), "truncated or corrupt: value of 'a'"),
    "key length past end": (gguf_bytes([struct.pack("<Q", 2**40) + b"abc" * 10]), "truncated"),
    "string value past end": (gguf_bytes([kv("a", V.STRING, struct.pack("<Q", 1000) + b"xy")]), "truncated"),
    "array length past end": (gguf_bytes([kv("a", V.ARRAY, struct.pack("<IQ", V.UINT32, 2**61))]),
                              "array 'a' of 2305843009213693952 UINT32 values"),
    "string array past end": (gguf_bytes([kv("a", V.ARRAY, struct.pack("<IQ", V.STRING, 3) + s("x") + s("y"))]),
                              "truncated"),
    "unknown value type": (gguf_bytes([kv("a", 13, b"\x00" * 8)]), "value type of 'a' is unknown value type 13"),
    "unknown array type": (gguf_bytes([kv("a", V.ARRAY, struct.pack("<IQ", 99, 0))]), "unknown value type 99"),
    "bool not 0/1": (gguf_bytes([kv("a", V.BOOL, b"\x02")]), "bool 2"),
    "bool array not 0/1": (gguf_bytes([kv("a", V.ARRAY, struct.pack("<IQ", V.BOOL, 2) + b"\x01\x07")]), "not 0 or 1"),
    "key not UTF-8": (gguf_bytes([kv(b"\xff\xfe", V.UINT8, b"\x00")]), "not UTF-8"),
    "value not UTF-8": (gguf_bytes([kv("a", V.STRING, s(b"\xc3"))]), "not UTF-8"),
    "arrays nested too deep": (gguf_bytes([kv("a", V.ARRAY, struct.pack("<IQ", V.ARRAY, 1) * 9
                                                + struct.pack("<IQ", V.UINT8, 0))]), "nests arrays more than 8 deep"),
    "duplicate key": (gguf_bytes([kv("a", V.UINT8, b"\x00"), kv("a", V.UINT8, b"\x01")]), "duplicate metadata key 'a'"),
    "alignment not a power of two": (gguf_bytes([kv("general.alignment", V.UINT32, struct.pack("<I", 48))]),
                                     "general.alignment 48 is not a power of two"),
    "alignment zero": (gguf_bytes([kv("general.alignment", V.UINT32, struct.pack("<I", 0))]),
                       "0 is not a power of two"),
    "alignment of another type": (gguf_bytes([kv("general.alignment", V.UINT64, struct.pack("<Q", 32))]), "not UINT32"),
    "unknown ggml type": (gguf_bytes([], [tensor_info("w", (8,), 99, 0)], F32_DATA), "unknown ggml type 99"),
    "unsupported ggml type": (gguf_bytes([], [tensor_info("w", (256,), 16, 0)], bytes(66)),
                              "unsupported ggml type 16 (IQ2_XXS)"),
    "too many dims": (gguf_bytes([], [tensor_info("w", (1, 1, 1, 1, 8), GGMLType.F32, 0)], F32_DATA),
                      "has 5 dimensions (at most 4)"),
    "zero dim": (gguf_bytes([], [tensor_info("w", (8, 0), GGMLType.F32, 0)], F32_DATA), "dimension <= 0"),
    "negative dim": (gguf_bytes([], [tensor_info("w", (8, 2**64 - 1), GGMLType.F32, 0)], F32_DATA), "dimension <= 0"),
    "element count overflow": (gguf_bytes([], [tensor_info("w", (2**32, 2**31), GGMLType.F32, 0)], F32_DATA),
                               "too many elements"),
    "row not a multiple of the block": (gguf_bytes([], [tensor_info("w", (48, 2), GGMLType.Q8_0, 0)], bytes(128)),
                                        "rows of 48 elements are not a multiple of the Q8_0 block size 32"),
    "offset not aligned": (gguf_bytes([], [tensor_info("w", (8,), GGMLType.F32, 16)], bytes(64)),
                           "offset 16 is not a multiple of the alignment 32"),
    "overlapping tensors": (gguf_bytes([], [tensor_info("a", (16,), GGMLType.F32, 0),
                                            tensor_info("b", (8,), GGMLType.F32, 32)], bytes(64)),
                            "tensors 'a' and 'b' overlap"),
    "data past end": (gguf_bytes([], [F32_INFO], bytes(31)), "truncated: tensor 'w' ends at byte"),
    "offset past end": (gguf_bytes([], [tensor_info("w", (8,), GGMLType.F32, 2**64 - 32)], F32_DATA), "truncated"),
    "duplicate tensor": (gguf_bytes([], [F32_INFO, tensor_info("w", (8,), GGMLType.F32, 32)], bytes(64)),
                         "duplicate tensor name 'w'"),
    "tensor name not UTF-8": (gguf_bytes([], [s(b"\x80") + struct.pack("<I", 0)]), "not UTF-8"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_validation_rule(tmp_path, case):
    raw, message = CASES[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(raw)
    with bounded(max_new_rss_mb=256), pytest.raises(CheckpointError) as e:
        read_gguf(path)
    assert message in one_line(e, path)


def test_valid_edge_cases_parse(tmp_path):
    """What the rules allow: a 0-dim tensor (ggml's n_dims = 0 is one element), unordered
    offsets, gaps, version 2, a file without the padding after the header and no tensors."""
    cases = [
        gguf_bytes([], [tensor_info("s", (), GGMLType.F32, 0)], struct.pack("<f", 2.5)),
        gguf_bytes([], [tensor_info("b", (8,), GGMLType.F32, 64), tensor_info("a", (8,), GGMLType.F32, 0)], bytes(96)),
        gguf_bytes([kv("a", V.UINT8, b"\x05")], version=2),
        gguf_bytes([kv("a", V.ARRAY, struct.pack("<IQ", V.STRING, 0))]),
    ]
    for i, raw in enumerate(cases):
        path = tmp_path / f"ok{i}.gguf"
        path.write_bytes(raw)
        f = read_gguf(path)
        if i == 0:
            assert f.tensors["s"].torch_shape == () and f.tensor("s").item() == 2.5
        if i == 1:
            assert list(f.tensors) == ["b", "a"] and f.tensors["a"].offset < f.tensors["b"].offset
        if i == 2:
            assert f.version == 2 and f.metadata == {"a": 5}
        if i == 3:
            assert f.metadata == {"a": []} and f.fields["a"] == GGUFValue([], V.ARRAY, V.STRING)


def test_missing_tiny_and_folder_paths(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_gguf(tmp_path / "none.gguf")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_gguf(tmp_path)
    for n in (0, 3, 23):
        path = tmp_path / f"short{n}.gguf"
        path.write_bytes(gguf_bytes()[:n])
        with pytest.raises(CheckpointError) as e:
            read_gguf(path)
        assert f"only {n} bytes" in one_line(e, path)


# ----------------------------------------------------------------- hypothesis: corruption
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
_fresh = count()


@pytest.fixture(scope="module")
def small_file(tmp_path_factory) -> tuple[bytes, GGUFFile, Path]:
    """A small valid file with every kind of header field: scalars, strings, arrays, a nested
    array, an explicit alignment, and F32/F16/BF16/Q8_0/Q4_K tensors."""
    folder = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(3)
    k_raw = rng.integers(0, 256, 144, dtype=np.uint8)
    metadata = {"general.architecture": "llama", "general.alignment": GGUFValue(16, V.UINT32),
                "u8": GGUFValue(7, V.UINT8), "i16": GGUFValue(-3, V.INT16), "f32": 0.5, "f64": np.float64(2.0),
                "flag": True, "u64": GGUFValue(2**40, V.UINT64), "tokens": ["<s>", "a", "bc", ""],
                "types": [1, 2, 3], "scores": [0.0, -1.5], "nested": [[1], ["x", "y"]]}
    x = torch.linspace(-1, 1, 64).reshape(2, 32)
    tensors = [("a", GGMLType.F32, (2, 4), x[:, :4].contiguous()), ("b", GGMLType.F16, (8,), x[0, :8].half()),
               ("c", GGMLType.BF16, (2, 2), x[:, :2].bfloat16().contiguous()),
               ("d", GGMLType.Q8_0, (2, 32), quants.quantize(x, GGMLType.Q8_0)), ("e", GGMLType.Q4_K, (256,), k_raw)]
    path = folder / "small.gguf"
    write_gguf(path, metadata, tensors)
    return path.read_bytes(), read_gguf(path), folder


def fresh_path(folder: Path) -> Path:
    """A new path per example: rewriting a file that an earlier example still maps could SIGBUS."""
    path = folder / str(next(_fresh)) / "x.gguf"
    path.parent.mkdir(parents=True)
    return path


def parse_or_refuse(raw: bytes, folder: Path) -> GGUFFile | None:
    """Either a file whose every tensor reads, or a one-line CheckpointError naming the file."""
    path = fresh_path(folder)
    path.write_bytes(raw)
    try:
        with bounded(max_new_rss_mb=256):
            f = read_gguf(path)
            for name, info in f.tensors.items():
                assert f.raw(name).nbytes == info.nbytes
                assert tuple(f.tensor(name).shape) == info.torch_shape
                assert tuple(f.tensor(name, native=True).shape) == info.torch_shape
    except CheckpointError as e:
        assert "\n" not in str(e) and str(path) in str(e), str(e)
        return None
    return f


def fuzz_parse(raw: bytes, folder: Path) -> None:
    event("parsed" if parse_or_refuse(raw, folder) is not None else "refused")


def test_small_file_is_valid(small_file):
    raw, f, folder = small_file
    assert f.alignment == 16 and len(f.tensors) == 5
    assert parse_or_refuse(raw, folder) is not None


def test_every_truncation_is_refused(small_file):
    """Cut at every byte: refused unless only the padding after the last tensor is cut."""
    raw, f, folder = small_file
    end = max(t.offset + t.nbytes for t in f.tensors.values())
    for cut in range(len(raw)):
        got = parse_or_refuse(raw[:cut], folder)
        assert (got is not None) == (cut >= end), cut


@FUZZ
@given(data=st.data())
def test_fuzz_bit_flips(small_file, data):
    raw, f, folder = small_file
    flips = data.draw(st.lists(st.tuples(st.integers(0, f.data_offset - 1), st.integers(0, 7)), min_size=1, max_size=4))
    bad = bytearray(raw)
    for position, bit in flips:
        bad[position] ^= 1 << bit
    fuzz_parse(bytes(bad), folder)


SPECIAL = [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 15, 16, 24, 28, 30, 31, 32, 33, 255, 256, 2**16 - 1, 2**31 - 1, 2**31,
           2**32 - 1, 2**32, 2**61, 2**63 - 1, 2**63, 2**64 - 1]


@FUZZ
@given(data=st.data())
def test_fuzz_field_overwrites(small_file, data):
    """Overwrite 1, 2, 4 or 8 bytes anywhere in the header with boundary values or random ones:
    counts, lengths, type ids, dims and offsets all get absurd values this way."""
    raw, f, folder = small_file
    width = data.draw(st.sampled_from([1, 2, 4, 8]))
    position = data.draw(st.integers(0, f.data_offset - width))
    value = data.draw(st.one_of(st.sampled_from(SPECIAL), st.integers(0, 2**64 - 1))) % (1 << (8 * width))
    bad = raw[:position] + value.to_bytes(width, "little") + raw[position + width:]
    fuzz_parse(bad, folder)


@FUZZ
@given(data=st.data())
def test_fuzz_garbage_after_a_valid_start(small_file, data):
    raw, f, folder = small_file
    keep = data.draw(st.integers(4, f.data_offset))
    tail = data.draw(st.binary(min_size=0, max_size=256))
    fuzz_parse(raw[:keep] + tail, folder)


# ----------------------------------------------------------------- real files against the reference
@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.name)
def test_rewrite_of_real_files_is_faithful(tmp_path, path):
    """Rewriting a real file gives its bytes back (vocab-only files, written by an older writer
    without the padding after an empty tensor table, gain only that padding)."""
    original = path.read_bytes()
    f = read_gguf(path)
    rewrite(f, tmp_path / "re.gguf")
    again = (tmp_path / "re.gguf").read_bytes()
    assert again[:len(original)] == original and again[len(original):] == bytes(len(again) - len(original))
    assert len(again) == (len(original) if f.tensors else f.data_offset)


@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.name)
def test_real_files_match_the_reference_reader(reference, path):
    ref = reference(path)
    f = read_gguf(path)
    fields = dict(ref["fields"])
    assert fields.pop("GGUF.version")[1] == f.version
    assert fields.pop("GGUF.tensor_count")[1] == len(f.tensors)
    assert fields.pop("GGUF.kv_count")[1] == len(f.fields)
    assert list(fields) == list(f.fields)
    for key, (types, contents) in fields.items():
        assert types_of(f.fields[key]) == types, key
        assert f.metadata[key] == contents, key
    assert (f.alignment, f.data_offset) == (ref["alignment"], ref["data_offset"])
    assert list(f.tensors) == [t[0] for t in ref["tensors"]]
    for name, qtype, shape, offset, nbytes, data in ref["tensors"]:
        info = f.tensors[name]
        assert (int(info.type), list(info.shape), info.offset, info.nbytes) == (qtype, shape, offset, nbytes)
        assert f.raw(name).tobytes() == data
        expected = gguf.quants.dequantize(np.frombuffer(data, np.uint8), gguf.GGMLQuantizationType(qtype))
        assert np.array_equal(f.tensor(name).numpy().reshape(-1), expected.reshape(-1))
    if path == TINY_LLAMA:
        assert f.metadata["general.architecture"] == "llama" and len(f.metadata["tokenizer.ggml.tokens"]) == 32000
        assert f.tensors["token_embd.weight"].torch_shape == (32000, 8)
        assert f.tensor("token_embd.weight", native=True).dtype == torch.float16


def test_type_tables_match_the_reference():
    assert {t.name: t.value for t in GGMLType} == {t.name: t.value for t in gguf.GGMLQuantizationType}
    assert {t.name: t.value for t in GGUFValueType} == {t.name: t.value for t in gguf.GGUFValueType}
    for t, sizes in BLOCK_SIZES.items():
        assert sizes == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(t))], t.name
