"""ggml's tensor types and block quantization formats, vectorised over whole tensors.

A ggml row of `ne0` elements is stored as `ne0 / block_size` blocks of `type_size` bytes each
(`BLOCK_SIZES`). Every format here is a pair of functions over all the blocks of a tensor at
once: `dequantize_blocks(n_blocks, type_size) uint8 -> (n_blocks, block_size) float32` and, where
it exists, `quantize_blocks` the other way. Plain types (F32, F16, ...) are blocks of one element.

Results are bit-exact with the reference implementation in llama.cpp's `gguf` Python package
(`gguf.quants`), which follows ggml's C reference code: the same float32 operations in the same
order, round-half-away-from-zero where ggml uses `roundf`, float16 scales rounded to nearest even.

    dequantize: F32 F16 BF16 F64 I8 I16 I32 I64 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K
    quantize:   F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0

The K-quants (Q2_K..Q6_K) are dequantize-only: their quantizers search scales iteratively
(`make_qx_quants`, `make_qkx2_quants` in ggml-quants.c) and the `gguf` package has no reference
quantizer to be bit-exact against. Q8_K, ggml's intermediate dot-product format, is read (a
float32 scale times int8 values) but never written. Q8_1 (whose block size the `gguf` package
and ggml disagree on: 40 and 36 bytes), the IQ*, TQ*, MXFP4, NVFP4 and Q1_0 families are known by
name and id but not supported.

The block quantizers expect finite inputs (as ggml does): a block whose scale is subnormal in
float32 gives the same undefined integer casts as the reference. F32/F16/BF16 keep inf and NaN.

`GGMLType` and `BLOCK_SIZES` live here and `format` re-exports them: the file format depends on
the block formats, never the other way round.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import IntEnum

import numpy as np
import torch

from ..errors import InvalidArgument

QK_K = 256  # elements per K-quant super-block


class GGMLType(IntEnum):
    """ggml tensor type ids, as stored in GGUF tensor infos (ggml.h `enum ggml_type`)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


# (elements per block, bytes per block) for every type emergence reads and writes.
BLOCK_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.F64: (1, 8),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.Q4_0: (32, 2 + 16),
    GGMLType.Q4_1: (32, 2 + 2 + 16),
    GGMLType.Q5_0: (32, 2 + 4 + 16),
    GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),
    GGMLType.Q8_0: (32, 2 + 32),
    GGMLType.Q2_K: (QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
    GGMLType.Q3_K: (QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
    GGMLType.Q4_K: (QK_K, 2 + 2 + 12 + QK_K // 2),
    GGMLType.Q5_K: (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    GGMLType.Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
    GGMLType.Q8_K: (QK_K, 4 + QK_K + 2 * QK_K // 16),
}

# The types that have a torch dtype of their own (stored elements are usable as they are).
TORCH_DTYPES: dict[GGMLType, torch.dtype] = {
    GGMLType.F32: torch.float32, GGMLType.F16: torch.float16, GGMLType.BF16: torch.bfloat16,
    GGMLType.F64: torch.float64, GGMLType.I8: torch.int8, GGMLType.I16: torch.int16,
    GGMLType.I32: torch.int32, GGMLType.I64: torch.int64,
}

_CHUNK_ELEMENTS = 1 << 22  # bounds the temporaries of one vectorised pass (~16 MB of float32)


def nbytes(qtype: GGMLType, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes of a tensor of `qtype` with row-major `shape` (its last dimension is the ggml row)."""
    block, size = BLOCK_SIZES[qtype]
    return math.prod(shape) // block * size


# --- helpers over (n_blocks, k) uint8 columns -------------------------------------------------

def _f16(b: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n, 1) float32: a float16 scale."""
    return b.view(np.float16).astype(np.float32)


def _to_f16(x: np.ndarray) -> np.ndarray:
    """(n, 1) float32 -> (n, 2) uint8: a float16 scale, rounded to nearest even."""
    return x.astype(np.float16).view(np.uint8)


def _bits(b: np.ndarray, shifts: tuple[int, ...], mask: int) -> np.ndarray:
    """(n, g, m) uint8 -> (n, g, len(shifts), m): each byte's fields at `shifts`, masked."""
    s = np.array(shifts, dtype=np.uint8).reshape(1, 1, -1, 1)
    return (b[:, :, None, :] >> s) & np.uint8(mask)


def _roundf(x: np.ndarray) -> np.ndarray:
    """C roundf: round half away from zero, exactly (no x + 0.5 rounding error)."""
    a = np.abs(x)
    floored = np.floor(a)
    return np.sign(x) * (floored + np.floor(2 * (a - floored)))


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d)


# --- plain types ------------------------------------------------------------------------------

def _plain(dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
        return blocks.view(dtype).astype(np.float32)
    return dequantize_blocks


def _dequantize_bf16(blocks: np.ndarray) -> np.ndarray:
    return (blocks.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)


def _quantize_f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.astype("<f4").view(np.uint8)


def _quantize_f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.astype("<f2").view(np.uint8)


def _quantize_bf16(blocks: np.ndarray) -> np.ndarray:
    # ggml_compute_fp32_to_bf16: NaNs are made quiet, everything else rounds to nearest even.
    n = blocks.view(np.uint32)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), n)
    n = (n.astype(np.uint64) + (0x7FFF + ((n >> 16) & 1))) >> 16
    return n.astype("<u2").view(np.uint8)


# --- 32-element blocks: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 --------------------------------------------
# Nibble layout: byte j holds element j (low 4 bits) and element j + 16 (high 4 bits); Q5 keeps
# the fifth bits of the 32 elements in a little-endian uint32 `qh`.

def _low_high(qs: np.ndarray) -> np.ndarray:
    """(n, 16) packed nibbles -> (n, 32) values 0..15: the 16 low nibbles, then the 16 high ones."""
    return _bits(qs[:, None, :], (0, 4), 0x0F).reshape(len(qs), 32)


def _pack_low_high(q: np.ndarray) -> np.ndarray:
    """(n, 32) values -> (n, 16) bytes: element j in the low nibble, element j + 16 in the high."""
    return (q[:, :16] & np.uint8(0x0F)) | (q[:, 16:] << np.uint8(4))


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) bits, bit i for element i."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _signed_max(blocks: np.ndarray) -> np.ndarray:
    """The value of largest magnitude in each block, with its sign (the first one on ties)."""
    imax = np.abs(blocks).argmax(axis=-1, keepdims=True)
    return np.take_along_axis(blocks, imax, axis=-1)


def _dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks[:, 0:2])
    q = _low_high(blocks[:, 2:18]).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


def _quantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    d = _signed_max(blocks) / -8
    q = np.trunc(blocks * _inverse(d) + np.float32(8.5), dtype=np.float32).astype(np.uint8).clip(0, 15)
    return np.concatenate([_to_f16(d), _pack_low_high(q)], axis=-1)


def _dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    q = _low_high(blocks[:, 4:20]).astype(np.float32)
    return d * q + m


def _quantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    hi, lo = blocks.max(axis=-1, keepdims=True), blocks.min(axis=-1, keepdims=True)
    d = (hi - lo) / 15
    q = np.trunc((blocks - lo) * _inverse(d) + np.float32(0.5), dtype=np.float32).astype(np.uint8).clip(0, 15)
    return np.concatenate([_to_f16(d), _to_f16(lo), _pack_low_high(q)], axis=-1)


def _dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks[:, 0:2])
    q = _low_high(blocks[:, 6:22]) | (_fifth_bits(blocks[:, 2:6]) << np.uint8(4))
    return d * (q.astype(np.int8) - np.int8(16)).astype(np.float32)


def _quantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    d = _signed_max(blocks) / -16
    q = np.trunc(blocks * _inverse(d) + np.float32(16.5), dtype=np.float32).astype(np.uint8).clip(0, 31)
    qh = np.packbits(q >> np.uint8(4), axis=-1, bitorder="little")
    return np.concatenate([_to_f16(d), qh, _pack_low_high(q)], axis=-1)


def _dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    q = _low_high(blocks[:, 8:24]) | (_fifth_bits(blocks[:, 4:8]) << np.uint8(4))
    return d * q.astype(np.float32) + m


def _quantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    hi, lo = blocks.max(axis=-1, keepdims=True), blocks.min(axis=-1, keepdims=True)
    d = (hi - lo) / 31
    q = np.trunc((blocks - lo) * _inverse(d) + np.float32(0.5), dtype=np.float32).astype(np.uint8).clip(0, 31)
    qh = np.packbits(q >> np.uint8(4), axis=-1, bitorder="little")
    return np.concatenate([_to_f16(d), _to_f16(lo), qh, _pack_low_high(q)], axis=-1)


def _dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks[:, 0:2])
    return blocks[:, 2:].view(np.int8).astype(np.float32) * d


def _quantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    d = np.abs(blocks).max(axis=-1, keepdims=True) / 127
    q = _roundf(blocks * _inverse(d)).astype(np.int8).view(np.uint8)
    return np.concatenate([_to_f16(d), q], axis=-1)


# --- K-quants: 256-element super-blocks of 16 or 8 sub-blocks with their own scales ------------

def _dequantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    # scales[16] (4-bit scale | 4-bit min), qs[64] (2-bit), f16 d, f16 dmin
    n = len(blocks)
    scales, qs = blocks[:, 0:16], blocks[:, 16:80]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    dl = (d * (scales & np.uint8(0x0F)).astype(np.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> np.uint8(4)).astype(np.float32)).reshape(n, 16, 1)
    q = _bits(qs.reshape(n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, 16, 16).astype(np.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _dequantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    # hmask[32] (third bit, set = no offset), qs[64] (low 2 bits), scales[12] (6-bit), f16 d
    n = len(blocks)
    hmask, qs, scales = blocks[:, 0:32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks[:, 108:110])
    low = _bits(scales[:, None, 0:8], (0, 4), 0x0F).reshape(n, 16)
    high = _bits(scales[:, None, 8:12], (0, 2, 4, 6), 0x03).reshape(n, 16)
    sc = ((low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)).astype(np.float32)
    dl = (d * sc).reshape(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, 16, 16)
    qh = _bits(hmask.reshape(n, 1, 32), tuple(range(8)), 0x01).reshape(n, 16, 16) ^ np.uint8(1)
    q = (ql.astype(np.int8) - (qh << np.uint8(2)).astype(np.int8)).astype(np.float32)
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 12) packed 6-bit scales and mins of 8 sub-blocks -> two (n, 8) uint8 (get_scale_min_k4)."""
    n = len(scales)
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.reshape(n, 8), mn.reshape(n, 8)


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: f16 d, f16 dmin, scales[12] -> per-sub-block scale and min, (n, 8, 1) each."""
    n = len(blocks)
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, mn = _k_scale_min(blocks[:, 4:16])
    return (d * sc.astype(np.float32)).reshape(n, 8, 1), (dmin * mn.astype(np.float32)).reshape(n, 8, 1)


def _dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    # f16 d, f16 dmin, scales[12], qs[128]: 32-byte groups hold sub-blocks 2i (low) and 2i+1 (high)
    n = len(blocks)
    d, dm = _k_scales(blocks)
    q = _bits(blocks[:, 16:144].reshape(n, 4, 32), (0, 4), 0x0F).reshape(n, 8, 32).astype(np.float32)
    return (d * q - dm).reshape(n, QK_K)


def _dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    # f16 d, f16 dmin, scales[12], qh[32] (bit i = fifth bit of sub-block i), qs[128]
    n = len(blocks)
    d, dm = _k_scales(blocks)
    ql = _bits(blocks[:, 48:176].reshape(n, 4, 32), (0, 4), 0x0F).reshape(n, 8, 32)
    qh = _bits(blocks[:, 16:48].reshape(n, 1, 32), tuple(range(8)), 0x01).reshape(n, 8, 32)
    q = (ql | (qh << np.uint8(4))).astype(np.float32)
    return (d * q - dm).reshape(n, QK_K)


def _dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    # ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16], f16 d
    n = len(blocks)
    ql, qh = blocks[:, 0:128], blocks[:, 128:192]
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = (_f16(blocks[:, 208:210]) * sc).reshape(n, 16, 1)
    low = _bits(ql.reshape(n, 2, 64), (0, 4), 0x0F).reshape(n, 8, 32)
    high = _bits(qh.reshape(n, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, 8, 32)
    q = ((low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)).reshape(n, 16, 16).astype(np.float32)
    return (d * q).reshape(n, QK_K)


def _dequantize_q8_k(blocks: np.ndarray) -> np.ndarray:
    # block_q8_K: f32 d, int8 qs[256], int16 bsums[16] (sums of 16 qs, for dot products)
    d = blocks[:, 0:4].view("<f4")
    return d * blocks[:, 4:260].view(np.int8).astype(np.float32)


DEQUANTIZE: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.F32: _plain("<f4"), GGMLType.F16: _plain("<f2"), GGMLType.BF16: _dequantize_bf16,
    GGMLType.F64: _plain("<f8"), GGMLType.I8: _plain("i1"), GGMLType.I16: _plain("<i2"),
    GGMLType.I32: _plain("<i4"), GGMLType.I64: _plain("<i8"),
    GGMLType.Q4_0: _dequantize_q4_0, GGMLType.Q4_1: _dequantize_q4_1,
    GGMLType.Q5_0: _dequantize_q5_0, GGMLType.Q5_1: _dequantize_q5_1,
    GGMLType.Q8_0: _dequantize_q8_0,
    GGMLType.Q2_K: _dequantize_q2_k, GGMLType.Q3_K: _dequantize_q3_k, GGMLType.Q4_K: _dequantize_q4_k,
    GGMLType.Q5_K: _dequantize_q5_k, GGMLType.Q6_K: _dequantize_q6_k, GGMLType.Q8_K: _dequantize_q8_k,
}

QUANTIZE: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.F32: _quantize_f32, GGMLType.F16: _quantize_f16, GGMLType.BF16: _quantize_bf16,
    GGMLType.Q4_0: _quantize_q4_0, GGMLType.Q4_1: _quantize_q4_1,
    GGMLType.Q5_0: _quantize_q5_0, GGMLType.Q5_1: _quantize_q5_1, GGMLType.Q8_0: _quantize_q8_0,
}


def _type(qtype: GGMLType | int, table: dict, verb: str) -> GGMLType:
    try:
        qtype = GGMLType(qtype)
    except ValueError:
        raise InvalidArgument(f"unknown ggml type {qtype}") from None
    if qtype not in table:
        raise InvalidArgument(f"cannot {verb} ggml type {qtype.name}")
    return qtype


def _check_shape(shape: tuple[int, ...], qtype: GGMLType) -> None:
    if any(type(d) is not int or d < 0 for d in shape):
        raise InvalidArgument(f"bad tensor shape {shape}")
    block = BLOCK_SIZES[qtype][0]
    if (shape[-1] if shape else 1) % block:
        raise InvalidArgument(f"{qtype.name} rows must be a multiple of {block} elements, got shape {shape}")


def dequantize(raw: np.ndarray | torch.Tensor, qtype: GGMLType | int,
               shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Raw ggml bytes of a tensor -> a float32 tensor of row-major `shape`.

    `raw` is a uint8 array (any shape, C-contiguous or not) of exactly the tensor's bytes; it
    is read, never written, so a read-only memory map is fine.
    """
    qtype = _type(qtype, DEQUANTIZE, "dequantize")
    shape = tuple(int(d) for d in shape)
    _check_shape(shape, qtype)
    if isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().numpy()
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
        raise InvalidArgument("dequantize expects a uint8 array of raw bytes")
    block, size = BLOCK_SIZES[qtype]
    n_blocks = math.prod(shape) // block
    if raw.size != n_blocks * size:
        raise InvalidArgument(f"{qtype.name} tensor of shape {shape} takes {n_blocks * size} bytes, got {raw.size}")
    blocks = np.ascontiguousarray(raw).reshape(n_blocks, size)
    out = np.empty((n_blocks, block), dtype=np.float32)
    step = max(1, _CHUNK_ELEMENTS // block)
    fn = DEQUANTIZE[qtype]
    with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN scales in the data give inf/NaN, as in ggml
        for start in range(0, n_blocks, step):
            out[start:start + step] = fn(blocks[start:start + step])
    return torch.from_numpy(out).reshape(shape)


def quantize(t: torch.Tensor | np.ndarray, qtype: GGMLType | int) -> np.ndarray:
    """A tensor -> its raw ggml bytes, a uint8 array of shape (*t.shape[:-1], bytes per row).

    Values are taken as float32 (other dtypes are cast first, as the reference does); the last
    dimension is the ggml row and must be a multiple of the type's block size.
    """
    qtype = _type(qtype, QUANTIZE, "quantize")
    if isinstance(t, torch.Tensor):
        t = t.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(t, dtype=np.float32)
    shape = x.shape
    _check_shape(shape, qtype)
    block, size = BLOCK_SIZES[qtype]
    n_blocks = x.size // block
    blocks = x.reshape(n_blocks, block)
    out = np.empty((n_blocks, size), dtype=np.uint8)
    step = max(1, _CHUNK_ELEMENTS // block)
    fn = QUANTIZE[qtype]
    for start in range(0, n_blocks, step):
        out[start:start + step] = fn(blocks[start:start + step])
    row = (shape[-1] if shape else 1) // block * size
    return out.reshape(*shape[:-1], row)
