"""ggml's tensor types and block quantization formats, vectorised over whole tensors.

A ggml row of `ne0` elements is stored as `ne0 / block_size` blocks of `type_size` bytes each
(`BLOCK_SIZES`). Every format here is a pair of functions over all the blocks of a tensor at
once: `dequantize_blocks(n_blocks, type_size) uint8 -> (n_blocks, block_size) float32` and, where
it exists, `quantize_blocks` the other way. Plain types (F32, F16, ...) are blocks of one element.

Results are bit-exact with the reference implementation in llama.cpp's `gguf` Python package
(`gguf.quants`) where it has one, and with ggml's C reference code (which it follows) for the
K-quants: the same float32 operations in the same order, round-half-away-from-zero where ggml
uses `roundf`, float16 scales rounded to nearest even.

    dequantize: F32 F16 BF16 F64 I8 I16 I32 I64 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K
                TQ1_0 TQ2_0
    quantize:   F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K TQ1_0 TQ2_0

Q4_K, Q5_K and Q6_K are quantized as ggml's reference quantizers do without an importance
matrix (`quantize_row_q4_K_ref` / `_q5_K_ref` / `_q6_K_ref` in ggml-quants.c, what llama.cpp's
`llama-quantize` runs when given no imatrix): a search for each sub-block's scale (and min) with
`make_qkx2_quants` (Q4_K, Q5_K: weighted least squares over 21 / 16 candidate grids) or
`make_qx_quants` (Q6_K: 19 candidate scales, weights x^2), 6-bit (or int8) sub-block scales
relative to a float16 super-block scale, then every value re-rounded against the stored scales.
The `gguf` package has no quantizer for them, so llama.cpp's own library is the reference here:
the tests compare bytes with `ggml_quantize_chunk` and with `llama_model_quantize` output. To be
bit-exact, the searches run the reference's float32 operations in its order, sums included
(accumulated sequentially, never pairwise), each product and sum rounded on its own (as
ggml-base is compiled for x86-64; a build whose compiler fuses a * b + c into one FMA, clang's
default on ARM64 for one, may make llama.cpp itself write other bytes now and then), and round
with its `nearest_int` bit trick. They are vectorised across sub-blocks but still iterate, so
they are slower than the other formats: per 16M values on one core about 3.7 s for Q4_K, 3.3 s
for Q5_K, 2.4 s for Q6_K (llama.cpp's scalar reference: 2.7, 1.9, 0.7 s). Q2_K and Q3_K are
read only.

Q8_K, ggml's intermediate dot-product format, is read (a float32 scale times int8 values) but
never written. Q8_1 (whose block size the `gguf` package and ggml disagree on: 40 and 36 bytes),
the IQ*, MXFP4, NVFP4 and Q1_0 families are known by name and id but not supported. TQ1_0 and
TQ2_0, the ternary formats llama.cpp runs BitNet b1.58 models in, are read and written.

The block quantizers expect finite inputs (as ggml does): a block whose scale is subnormal in
float32 gives the same undefined integer casts as the reference. F32/F16/BF16 keep inf and NaN.

`GGMLType` and `BLOCK_SIZES` live here and `format` re-exports them: the file format depends on
the block formats, never the other way round.
"""

from __future__ import annotations

import contextlib
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
    GGMLType.TQ1_0: (QK_K, (QK_K - 4 * QK_K // 64) // 5 + QK_K // 64 + 2),
    GGMLType.TQ2_0: (QK_K, QK_K // 4 + 2),
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


# --- ternary blocks: TQ1_0 and TQ2_0 --------------------------------------------------------
# 256 values in {-1, 0, 1} times one float16 scale d per block, the block's absmax (ggml-quants.c
# quantize_row_tq1_0_ref / tq2_0_ref; gguf.quants.TQ1_0 / TQ2_0). TQ2_0 packs each value + 1 in
# two bits: byte j of each 32-byte group holds elements j, j + 32, j + 64, j + 96 of its 128 at
# bits 0, 2, 4, 6. TQ1_0 packs five trits per byte (1.6 bits per value): the base-3 number
# q0 q1 q2 q3 q4 (q0 most significant) scaled to a byte as ceil(n * 256 / 243), so that the
# trit k is read back as the top bits of byte * 3^k * 3 >> 8; the first 240 values fill 48 such
# bytes (byte j of the first 32 holds elements j + 32 i, i = 0..4; of the next 16, 160 + j + 16 i),
# the last 16 four trits per byte in 4 bytes (element 240 + j + 4 i in byte j).
#
# A BitNet b1.58 matrix is values * scale with one scale for the whole tensor (its absmean); the
# absmax of every block holding a nonzero value is that scale, so these formats hold such a
# matrix exactly, up to the float16 rounding of the scale (a relative 2^-11 at most; none when the
# scale is a float16 value), and the values themselves exactly.

_TRIT_POWERS = np.array([81, 27, 9, 3, 1], dtype=np.uint8)


def _ternary_codes(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 256) float32 -> (codes 0..2 = round(x / absmax) + 1 (n, 256) uint8, absmax (n, 1))."""
    d = np.abs(blocks).max(axis=-1, keepdims=True)
    q = _roundf(blocks * _inverse(d))
    return (q.astype(np.int8) + np.int8(1)).astype(np.uint8), d


def _quantize_tq2_0(blocks: np.ndarray) -> np.ndarray:
    q, d = _ternary_codes(blocks)
    q = q.reshape(len(blocks), -1, 4, 32) << np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    qs = (q[:, :, 0] | q[:, :, 1] | q[:, :, 2] | q[:, :, 3]).reshape(len(blocks), QK_K // 4)
    return np.concatenate([qs, _to_f16(d)], axis=-1)


def _dequantize_tq2_0(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    q = _bits(blocks[:, :QK_K // 4].reshape(n, -1, 32), (0, 2, 4, 6), 0x03).reshape(n, QK_K)
    return _f16(blocks[:, QK_K // 4:]) * (q.astype(np.float32) - 1)


def _quantize_tq1_0(blocks: np.ndarray) -> np.ndarray:
    q, d = _ternary_codes(blocks)
    n = len(blocks)

    def pack(part: np.ndarray, digits: int, width: int) -> np.ndarray:
        powers = _TRIT_POWERS[:digits].astype(np.uint16).reshape(1, 1, digits, 1)
        number = (part.reshape(n, -1, digits, width).astype(np.uint16) * powers).sum(axis=2, dtype=np.uint16)
        return ((number.reshape(n, -1) * 256 + (243 - 1)) // 243).astype(np.uint8)

    return np.concatenate([pack(q[:, :160], 5, 32), pack(q[:, 160:240], 5, 16), pack(q[:, 240:], 4, 4),
                           _to_f16(d)], axis=-1)


def _dequantize_tq1_0(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)

    def unpack(part: np.ndarray, digits: int) -> np.ndarray:
        powers = _TRIT_POWERS[::-1][:digits].reshape(1, digits, 1)  # 1, 3, 9, ... (wrapping in uint8)
        shifted = (part[:, None, :] * powers).astype(np.uint16)  # (n, digits, width)
        return ((shifted * 3) >> 8).reshape(n, -1)

    q = np.concatenate([unpack(blocks[:, :32], 5), unpack(blocks[:, 32:48], 5), unpack(blocks[:, 48:52], 4)], axis=-1)
    return _f16(blocks[:, 52:54]) * (q.astype(np.float32) - 1)


# --- K-quant quantizers: ggml's reference searches, vectorised across sub-blocks --------------
# The searches work on "element-major" (k, m) arrays: column i is sub-block i, so that a sum over
# a sub-block is k - 1 additions of contiguous rows, in the reference's order.

_F = np.float32
GROUP_MAX_EPS = _F(1e-15)  # ggml-quants.c: a sub-block below this magnitude counts as all zero


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: adding 1.5 * 2^23 rounds to nearest (ties to even) and leaves the
    integer in the low mantissa bits; taken the same way here, it agrees for any input."""
    bits = (v.astype(_F, copy=False) + _F(12582912.0)).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _sum(terms: np.ndarray, *, start_with_first: bool = False) -> np.ndarray:
    """(k, m) -> (m,): the k terms of each column added one after the other in float32, as a C
    loop does (`s = 0; s += t[i]`, or `s = t[0]` when `start_with_first`)."""
    total = terms[0].copy() if start_with_first else terms[0] + _F(0)
    for t in terms[1:]:
        total += t
    return total


def _safe(d: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """d where `usable`, else 1: a divisor for lanes whose result is discarded anyway."""
    return np.where(usable, d, _F(1))


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                      nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants (use_mad false): x, weights w (k, m) -> codes L (k, m) in 0..nmax,
    scale (m,) and min (m,), x ~= scale * L - min.

    Start from the min-max grid (min clipped to <= 0), then for each candidate
    iscale = (nmax + rmin + rdelta * step) / (max - min) fit scale and min by weighted least
    squares to the codes it rounds to, keeping the fit with the smallest weighted squared
    error. As in the reference, `min` in the candidate grid is the best fit so far.
    """
    lo, hi = x.min(axis=0), x.max(axis=0)
    lo = np.where(lo > 0, _F(0), lo)
    flat = hi == lo  # all values equal (or all zero): codes 0, scale 0, min -lo
    sum_w = _sum(w, start_with_first=True)
    sum_x = _sum(w * x, start_with_first=True)
    iscale = _F(nmax) / _safe(hi - lo, ~flat)
    scale = _F(1) / iscale
    L = np.clip(_nearest_int(iscale * (x - lo)), 0, nmax)
    diff = scale * L.astype(_F) + lo - x
    best = _sum(w * (diff * diff))
    for step in range(nstep + 1):
        iscale = (_F(rmin) + _F(rdelta) * _F(step) + _F(nmax)) / _safe(hi - lo, ~flat)
        la = np.clip(_nearest_int(iscale * (x - lo)), 0, nmax)
        lf = la.astype(_F)
        wl = w * lf
        sum_l, sum_l2, sum_xl = _sum(wl), _sum(wl * lf), _sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        solvable = det > 0
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / _safe(det, solvable)
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / _safe(det, solvable)
        positive = this_min > 0  # a positive min is not representable: refit the scale alone
        this_scale = np.where(positive, sum_xl / _safe(sum_l2, positive), this_scale)
        this_min = np.where(positive, _F(0), this_min)
        diff = this_scale * lf + this_min - x
        error = _sum(w * (diff * diff))
        better = solvable & (error < best) & ~flat
        L = np.where(better, la, L)
        best = np.where(better, error, best)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    return np.where(flat, 0, L), np.where(flat, _F(0), scale), -lo


def _quantize_k_sub_blocks(blocks: np.ndarray, nmax: int, rmin: float, rdelta: float,
                           nstep: int) -> tuple[np.ndarray, ...]:
    """The part Q4_K and Q5_K share (quantize_row_q4_K_ref / q5_K_ref): (n, 256) -> f16 d (n, 2),
    f16 dmin (n, 2), the packed 6-bit scales and mins (n, 12), codes (n, 8, 32) in 0..nmax."""
    n = len(blocks)
    x = np.ascontiguousarray(blocks.reshape(n * 8, 32).T)  # (32, 8n)
    weights = np.sqrt(_sum(x * x) / _F(32)) + np.abs(x)  # av_x + |x|
    L, scales, mins = _make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
    max_scale = np.where(max_scale > 0, max_scale, _F(0))
    max_min = np.where(max_min > 0, max_min, _F(0))
    inv_scale = np.where(max_scale > 0, _F(63) / _safe(max_scale, max_scale > 0), _F(0))
    inv_min = np.where(max_min > 0, _F(63) / _safe(max_min, max_min > 0), _F(0))
    # uint8_t ls = nearest_int(...): the int is truncated to a byte, then capped at 63
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    # get_scale_min_k4's layout: bytes 0-3 scales 0-3, bytes 4-7 mins 0-3 (each with the top two
    # bits of scale / min j + 4 in bits 6-7), bytes 8-11 the low nibbles of scale | min j + 4
    packed = np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                             (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)], axis=1)
    d, dmin = _to_f16((max_scale / _F(63))[:, None]), _to_f16((max_min / _F(63))[:, None])
    # Re-round every value against the stored scales; a sub-block whose scale is 0 keeps its codes.
    sub_d = (_f16(d) * ls.astype(_F)).reshape(1, n * 8)
    sub_m = (_f16(dmin) * lm.astype(_F)).reshape(1, n * 8)
    live = sub_d != 0
    q = np.clip(_nearest_int((x + sub_m) / _safe(sub_d, live)), 0, nmax)
    codes = np.where(live, q, L).T.reshape(n, 8, 32).astype(np.uint8)
    return d, dmin, packed, codes


def _quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    d, dmin, scales, L = _quantize_k_sub_blocks(blocks, 15, -1.0, 0.1, 20)
    qs = (L[:, 0::2] | (L[:, 1::2] << np.uint8(4))).reshape(n, 128)  # sub-blocks 2i low, 2i+1 high
    return np.concatenate([d, dmin, scales, qs], axis=1)


def _quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    n = len(blocks)
    d, dmin, scales, L = _quantize_k_sub_blocks(blocks, 31, -0.5, 0.1, 15)
    qs = ((L[:, 0::2] & np.uint8(0x0F)) | ((L[:, 1::2] & np.uint8(0x0F)) << np.uint8(4))).reshape(n, 128)
    qh = np.packbits((L >> np.uint8(4)).transpose(0, 2, 1), axis=-1, bitorder="little").reshape(n, 32)
    return np.concatenate([d, dmin, scales, qh, qs], axis=1)


def _make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants with rmse_type 1 and no importance weights (weights x^2): x (k, m) ->
    codes (k, m) in 0..2 nmax - 1 (offset by nmax) and the scale (m,), x ~= scale * (L - nmax).

    The grid is anchored at the value of largest magnitude (-nmax there), then 18 more
    candidates -(nmax + 0.1 step) / max are tried; each gets its least-squares scale, and the
    one that explains the most weighted energy (sumlx^2 / suml2) wins."""
    imax = np.abs(x).argmax(axis=0)  # the first of equal magnitudes, as `ax > amax` keeps it
    signed_max = np.take_along_axis(x, imax[None], axis=0)[0]
    zero = np.abs(signed_max) < GROUP_MAX_EPS
    signed_max = _safe(signed_max, ~zero)
    w = x * x
    wx = w * x

    def fit(iscale):
        l = np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)
        lf = l.astype(_F)
        return l, _sum(wx * lf), _sum(w * lf * lf)

    L, sumlx, suml2 = fit(_F(-nmax) / signed_max)
    scale = np.where(suml2 != 0, sumlx / _safe(suml2, suml2 != 0), _F(0))
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        l, sumlx, suml2 = fit(-(_F(nmax) + _F(0.1) * _F(step)) / signed_max)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better, l, L)
        scale = np.where(better, sumlx / _safe(suml2, better), scale)
        best = np.where(better, scale * sumlx, best)
    return np.where(zero, 0, L + nmax), np.where(zero, _F(0), scale)


def _quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    # quantize_row_q6_K_ref: 16 sub-blocks of 16, int8 scales relative to d = max scale / -128
    n = len(blocks)
    x = np.ascontiguousarray(blocks.reshape(n * 16, 16).T)  # (16, 16n)
    L, scales = _make_qx_quants(x, 32)
    scales = scales.reshape(n, 16)
    max_scale = _signed_max(scales)
    empty = np.abs(max_scale) < GROUP_MAX_EPS  # the whole block is stored as zero bytes
    iscale = _F(-128) / _safe(max_scale, ~empty)
    d = _to_f16(_F(1) / iscale)
    sc = np.minimum(127, _nearest_int(iscale * scales)).astype(np.int8)
    sub_d = (_f16(d) * sc.astype(_F)).reshape(1, n * 16)
    live = sub_d != 0
    q = np.clip(_nearest_int(x / _safe(sub_d, live)), -32, 31) + 32
    # Each 128-value half as four quarters a, b, c, e of 32: ql holds a | c << 4 then b | e << 4,
    # qh the top two bits of a, b, c, e at bits 0, 2, 4, 6.
    L = np.where(live, q, L).T.reshape(n, 2, 4, 32).astype(np.uint8)
    low, high = L & np.uint8(0x0F), L >> np.uint8(4)
    four = np.uint8(4)
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << four), low[:, :, 1] | (low[:, :, 3] << four)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << np.uint8(2)) | (high[:, :, 2] << four) | (high[:, :, 3] << np.uint8(6))
    out = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), d], axis=1)
    out[empty[:, 0]] = 0
    return out


DEQUANTIZE: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.F32: _plain("<f4"), GGMLType.F16: _plain("<f2"), GGMLType.BF16: _dequantize_bf16,
    GGMLType.F64: _plain("<f8"), GGMLType.I8: _plain("i1"), GGMLType.I16: _plain("<i2"),
    GGMLType.I32: _plain("<i4"), GGMLType.I64: _plain("<i8"),
    GGMLType.Q4_0: _dequantize_q4_0, GGMLType.Q4_1: _dequantize_q4_1,
    GGMLType.Q5_0: _dequantize_q5_0, GGMLType.Q5_1: _dequantize_q5_1,
    GGMLType.Q8_0: _dequantize_q8_0,
    GGMLType.Q2_K: _dequantize_q2_k, GGMLType.Q3_K: _dequantize_q3_k, GGMLType.Q4_K: _dequantize_q4_k,
    GGMLType.Q5_K: _dequantize_q5_k, GGMLType.Q6_K: _dequantize_q6_k, GGMLType.Q8_K: _dequantize_q8_k,
    GGMLType.TQ1_0: _dequantize_tq1_0, GGMLType.TQ2_0: _dequantize_tq2_0,
}

QUANTIZE: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.F32: _quantize_f32, GGMLType.F16: _quantize_f16, GGMLType.BF16: _quantize_bf16,
    GGMLType.Q4_0: _quantize_q4_0, GGMLType.Q4_1: _quantize_q4_1,
    GGMLType.Q5_0: _quantize_q5_0, GGMLType.Q5_1: _quantize_q5_1, GGMLType.Q8_0: _quantize_q8_0,
    GGMLType.Q4_K: _quantize_q4_k, GGMLType.Q5_K: _quantize_q5_k, GGMLType.Q6_K: _quantize_q6_k,
    GGMLType.TQ1_0: _quantize_tq1_0, GGMLType.TQ2_0: _quantize_tq2_0,
}

# Quantizers that search (the K-quants): their many passes over a chunk run fastest when it
# stays in cache, so they take smaller chunks.
_SEARCH_CHUNK_ELEMENTS = 1 << 18
_SEARCHING = (GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K)


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
    searching = qtype in _SEARCHING
    step = max(1, (min(_CHUNK_ELEMENTS, _SEARCH_CHUNK_ELEMENTS) if searching else _CHUNK_ELEMENTS) // block)
    fn = QUANTIZE[qtype]
    # The searches compute every candidate in every lane and discard some (a division by the
    # range of a constant sub-block, ...): those lanes may overflow or divide by zero harmlessly.
    with np.errstate(all="ignore") if searching else contextlib.nullcontext():
        for start in range(0, n_blocks, step):
            out[start:start + step] = fn(blocks[start:start + step])
    row = (shape[-1] if shape else 1) // block * size
    return out.reshape(*shape[:-1], row)
