"""ggml block formats: quantize and dequantize bit-exact with llama.cpp's `gguf.quants` (bytes
equal, float32 values equal) on varied data, hypothesis-drawn blocks and random raw bytes;
the K-quant quantizers (Q4_K, Q5_K, Q6_K), which `gguf.quants` lacks, bit-exact with llama.cpp's
own library (`ggml_quantize_chunk`, as `llama-quantize` calls it without an importance matrix;
whole models through `llama_model_quantize` are in test_gguf_model.py); hand-worked K-quant
blocks; round-trip error bounds; speed; bad arguments."""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import gguf
import gguf.quants as ref
import llama_cpp
import numpy as np
import pytest
import torch
from llama_cpp._ctypes_extensions import load_shared_library
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from emergence.errors import InvalidArgument
from emergence.gguf import quants
from emergence.gguf.quants import BLOCK_SIZES, DEQUANTIZE, QUANTIZE, GGMLType, dequantize, quantize

REF_TYPE = {t: gguf.GGMLQuantizationType(int(t)) for t in GGMLType}
K_QUANTS = [GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]
# Byte ranges of each block's float16 scales (d, and dmin/m where the format has one).
F16_SCALES = {GGMLType.Q4_0: [0], GGMLType.Q4_1: [0, 2], GGMLType.Q5_0: [0], GGMLType.Q5_1: [0, 2],
              GGMLType.Q8_0: [0], GGMLType.Q2_K: [80, 82], GGMLType.Q3_K: [108], GGMLType.Q4_K: [0, 2],
              GGMLType.Q5_K: [0, 2], GGMLType.Q6_K: [208]}
REFERENCE_DEQUANTIZED = [GGMLType.F32, GGMLType.F16, GGMLType.BF16, *F16_SCALES]
K_QUANTIZED = [GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]  # quantized here; gguf.quants cannot
GGUF_QUANTIZED = [t for t in QUANTIZE if t not in K_QUANTIZED]
SMALL_BLOCKS = [t for t in GGUF_QUANTIZED if BLOCK_SIZES[t][0] <= 32]  # TQ1_0/TQ2_0: tests/test_ternary_gguf.py


def ref_quantize(x: np.ndarray, qtype: GGMLType) -> np.ndarray:
    out = ref.quantize(x, REF_TYPE[qtype])
    return out if out.dtype == np.uint8 else out.view(np.uint8)


def ref_dequantize(raw: np.ndarray, qtype: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    raw = raw.reshape(*shape[:-1], -1)
    if qtype is GGMLType.F32:
        raw = raw.view(np.float32)
    elif qtype is GGMLType.F16:
        raw = raw.view(np.float16)
    with np.errstate(invalid="ignore", over="ignore"):  # random bytes: NaN and inf scales
        return ref.dequantize(raw, REF_TYPE[qtype]).reshape(shape)


_GGML = load_shared_library("ggml-base", Path(llama_cpp.__file__).parent / "lib")
_GGML.ggml_quantize_chunk.restype = ctypes.c_size_t
_GGML.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                      ctypes.c_int64, ctypes.c_void_p]


def llama_cpp_quantize(x: np.ndarray, qtype: GGMLType) -> np.ndarray:
    """llama.cpp's quantizer (ggml_quantize_chunk, no importance matrix: the *_ref functions)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = x.reshape(-1, x.shape[-1])
    out = np.zeros((len(rows), quants.nbytes(qtype, (x.shape[-1],))), np.uint8)
    written = _GGML.ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, 0, len(rows), x.shape[-1], None)
    assert written == out.size
    return out.reshape(*x.shape[:-1], -1)


def k_blocks(seed: int, n: int) -> np.ndarray:
    """(n, 256) super-blocks drawn from kinds that exercise the K-quant searches: sub-blocks at
    scales from 1e-4 to 1e2, values on a coarse grid (ties), small integers, mostly zeros,
    positive only with an offset (a zero min), tiny negatives only, a few repeated values with
    both signs, one large outlier; then fixed blocks: all zero, constants of both signs, tiny
    (subnormal-free) values, a dynamic range of 1e-20 to 1e4 across the sub-blocks."""
    rng = np.random.default_rng(seed)
    out = np.empty((n + 6, 256), np.float32)
    for i in range(n):
        kind = i % 8
        b = rng.standard_normal((16, 16))
        if kind == 0:
            b *= 10.0 ** rng.uniform(-4, 2, (16, 1))
        elif kind == 1:
            b = np.round(b * 4) / 4
        elif kind == 2:
            b = rng.integers(-3, 4, (16, 16)).astype(float)
        elif kind == 3:
            b[rng.random((16, 16)) < 0.7] = 0
        elif kind == 4:
            b = np.abs(b) + rng.uniform(0, 5)
        elif kind == 5:
            b = -np.abs(b) * 1e-12
        elif kind == 6:
            b = rng.choice([-1.0, 0.5, 2.0, 0.0], (16, 16)) * 10.0 ** rng.uniform(-3, 3)
        else:
            b[rng.integers(0, 16), rng.integers(0, 16)] = 1e4
        out[i] = b.reshape(256)
    out[n] = 0
    out[n + 1], out[n + 2] = 0.3, -0.3
    out[n + 3] = rng.standard_normal(256) * 1e-19
    out[n + 4] = rng.standard_normal(256) * np.repeat(10.0 ** np.linspace(-20, 4, 16), 16)
    out[n + 5] = np.where(np.arange(256) % 2, 2.5, -2.5)
    return out


def varied(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Rows at scales from 1e-6 to 1e3, and the blocks that exercise each formula's edges:
    all zeros, one large outlier, negative only, tiny values, a constant, exact ties of
    magnitude with both signs, a single nonzero, values at f16's limits."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    rows = x.reshape(-1, shape[-1])
    rows *= (10.0 ** rng.uniform(-6, 3, (len(rows), 1))).astype(np.float32)
    blocks = x.reshape(-1, 32)
    n = len(blocks)
    edits = {
        0: np.zeros(32),
        1: np.r_[rng.standard_normal(31) * 0.01, 1000.0],
        2: -np.abs(rng.standard_normal(32)),
        3: rng.standard_normal(32) * 1e-7,
        4: np.full(32, 0.3),
        5: np.where(np.arange(32) % 2, 2.5, -2.5),
        6: np.r_[np.zeros(17), -3.0, np.zeros(14)],
        7: rng.uniform(-60000, 60000, 32),
        8: np.r_[rng.uniform(0, 1, 31), -1.0],  # the first largest magnitude is the negative one
        9: np.r_[127.0, np.arange(-15.5, 15.5)],  # Q8_0 scale 1: exact halves, rounded away from 0
    }
    for i, block in edits.items():
        blocks[i * (n // len(edits))] = block
    return x


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("qtype", GGUF_QUANTIZED, ids=lambda t: t.name)
def test_quantize_and_dequantize_match_the_reference(qtype, seed):
    shape = [(1, 512), (7, 512), (3, 2, 768)][seed]
    x = varied(seed, shape)
    got = quantize(x, qtype)
    expected = ref_quantize(x, qtype)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    assert np.array_equal(got, expected)
    back = dequantize(got, qtype, shape)
    assert back.dtype == torch.float32 and tuple(back.shape) == shape
    assert np.array_equal(back.numpy(), ref_dequantize(expected, qtype, shape))


def test_float_types_keep_special_values():
    """NaN payloads, infinities, overflow, subnormals and signed zeros through F32/F16/BF16."""
    bits = np.array([0x7F800001, 0x7FC00000, 0xFF800001, 0x7FBFFFFF, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x00000001,
                     0x80000000, 0x00000000, 0x477FF000, 0x477FEFFF, 0x33800000, 0x3F808000, 0x3F818000], np.uint32)
    x = np.tile(bits.view(np.float32), 3).reshape(3, -1)
    with np.errstate(invalid="ignore", over="ignore"):
        for qtype in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
            got = quantize(x, qtype)
            assert np.array_equal(got, ref_quantize(x, qtype)), qtype.name
            back = dequantize(got, qtype, x.shape).numpy()
            assert np.array_equal(back.view(np.uint32), ref_dequantize(got, qtype, x.shape).view(np.uint32)), qtype.name


TINY = float(np.float32(1e-20))  # smaller blocks would have subnormal scales: undefined casts in ggml too
FINITE = st.one_of(st.just(0.0), st.floats(TINY, 1e4, width=32), st.floats(-1e4, -TINY, width=32))


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(qtype=st.sampled_from(SMALL_BLOCKS), x=hnp.arrays(np.float32, st.sampled_from([(32,), (2, 64), (3, 32)]),
                                                            elements=FINITE))
def test_hypothesis_blocks_match_the_reference(qtype, x):
    got = quantize(x, qtype)
    assert np.array_equal(got, ref_quantize(x, qtype))
    assert np.array_equal(dequantize(got, qtype, x.shape).numpy(), ref_dequantize(got, qtype, x.shape))


# ------------------------------------------------------------- K-quants against llama.cpp
@pytest.mark.parametrize("qtype", K_QUANTIZED, ids=lambda t: t.name)
def test_k_quants_match_llama_cpp(qtype):
    """Bytes equal to llama.cpp's on 4,000 super-blocks of edge-case kinds, gaussian rows at
    scales from 1e-6 to 1e3 (with `varied`'s 32-element edge blocks inside), and a row of 256
    whose row count is odd; the dequantized values follow (the dequantizer is checked above)."""
    cases = [k_blocks(int(qtype), 4000), varied(int(qtype), (24, 1024)), varied(1, (3, 256))]
    for x in cases:
        got = quantize(x, qtype)
        assert got.shape == (*x.shape[:-1], x.shape[-1] // 256 * BLOCK_SIZES[qtype][1])
        expected = llama_cpp_quantize(x, qtype)
        same = (got == expected).reshape(-1, BLOCK_SIZES[qtype][1]).all(axis=1)
        assert same.all(), f"{(~same).sum()} of {same.size} super-blocks differ"


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(qtype=st.sampled_from(K_QUANTIZED), x=hnp.arrays(np.float32, st.sampled_from([(256,), (2, 256), (1, 512)]),
                                                         elements=FINITE))
def test_hypothesis_k_blocks_match_llama_cpp(qtype, x):
    assert np.array_equal(quantize(x, qtype), llama_cpp_quantize(x, qtype))


def test_k_quant_all_zero_and_constant_blocks():
    """All zeros: every byte 0 (scale and min 0, codes 0). A constant c > 0: Q4_K/Q5_K put it at
    the top of the grid (min 0, code 15 or 31); c < 0 is all min (scale 0, codes 0, min 63 * dmin);
    Q6_K puts it at the bottom (code 0, i.e. -32, scale -128). Each comes back within float16's
    rounding of the stored scales."""
    for qtype in K_QUANTIZED:
        raw = quantize(np.zeros((2, 256), np.float32), qtype)
        assert not raw.any(), qtype.name
        assert not dequantize(raw, qtype, (2, 256)).any()
        for c in (0.3, -0.3, 1000.0):
            x = np.full((1, 256), c, np.float32)
            raw = quantize(x, qtype)
            assert np.array_equal(raw, llama_cpp_quantize(x, qtype)), (qtype.name, c)
            back = dequantize(raw, qtype, x.shape).numpy()
            assert np.all(back == back[0, 0]), (qtype.name, c)
            assert abs(back[0, 0] - c) <= abs(c) * 2.0 ** -10, (qtype.name, c, back[0, 0])
    q4 = quantize(np.full((1, 256), 0.3, np.float32), GGMLType.Q4_K)[0]
    assert q4[2:4].tolist() == [0, 0] and set(q4[16:].tolist()) == {0xFF}  # dmin 0, every code 15
    q4 = quantize(np.full((1, 256), -0.3, np.float32), GGMLType.Q4_K)[0]
    assert q4[0:2].tolist() == [0, 0] and not q4[16:].any()  # d 0, every code 0
    assert q4[4:16].tolist() == [0] * 4 + [0xFF] * 4 + [0xF0] * 4  # scales 0, mins 63 (see the Q4_K layout below)
    q6 = quantize(np.full((1, 256), 0.3, np.float32), GGMLType.Q6_K)[0]
    assert not q6[:192].any() and q6[192:208].view(np.int8).tolist() == [-128] * 16


def test_q4_k_hand_worked_block():
    """Integer values 0..15 with 0 and 15 in every sub-block of 32: min 0 and scale 1 fit exactly,
    so every code is its value; d = fp16(1/63) with 6-bit scales 63, dmin 0 with mins 0. Layout:
    bytes 0-3 scale j | top bits of scale j+4 (63 -> 0xFF), 4-7 min j | top bits of min j+4 (0),
    8-11 the low nibbles of scale | min j+4 (0x0F); qs byte 32c + l holds sub-block 2c's value l
    in the low nibble and sub-block 2c+1's in the high one."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 16, (8, 32))
    x[:, 0], x[:, 1] = 0, 15
    raw = quantize(x.astype(np.float32).reshape(1, 256), GGMLType.Q4_K)[0]
    assert raw[0:2].tolist() == list(np.float16(1 / 63).tobytes()) and raw[2:4].tolist() == [0, 0]
    assert raw[4:16].tolist() == [0xFF] * 4 + [0] * 4 + [0x0F] * 4
    assert raw[16:].tolist() == (x[0::2] | (x[1::2] << 4)).reshape(-1).tolist()
    back = dequantize(raw, GGMLType.Q4_K, (256,)).numpy()
    assert np.array_equal(back, (np.float32(np.float16(1 / 63)) * np.float32(63)) * x.reshape(-1).astype(np.float32))


def test_q6_k_hand_worked_block():
    """Integers in -32..31 with -32 in every sub-block of 16: scale 1 per sub-block, d = -1/128,
    every int8 scale -128, codes value + 32; the block comes back exactly. Layout: ql byte
    64h + l holds the low nibbles of values 128h + l and 128h + 64 + l, byte 64h + 32 + l those of
    128h + 32 + l and 128h + 96 + l; qh byte 32h + l the top two bits of 128h + l + 32i at bits 2i."""
    rng = np.random.default_rng(1)
    x = rng.integers(-31, 32, (16, 16))
    x[:, 3] = -32
    raw = quantize(x.astype(np.float32).reshape(1, 256), GGMLType.Q6_K)[0]
    assert np.array_equal(raw, llama_cpp_quantize(x.astype(np.float32).reshape(1, 256), GGMLType.Q6_K)[0])
    assert raw[208:210].view(np.float16)[0] == -1 / 128 and raw[192:208].view(np.int8).tolist() == [-128] * 16
    codes = (x.reshape(2, 4, 32) + 32).astype(np.uint8)  # halves of 128, quarters of 32
    low, high = codes & 0x0F, codes >> 4
    assert raw[:128].tolist() == np.concatenate([low[:, 0] | (low[:, 2] << 4), low[:, 1] | (low[:, 3] << 4)],
                                                axis=1).reshape(-1).tolist()
    assert raw[128:192].tolist() == (high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) |
                                     (high[:, 3] << 6)).reshape(-1).tolist()
    assert np.array_equal(dequantize(raw, GGMLType.Q6_K, (256,)).numpy(), x.reshape(-1).astype(np.float32))


def test_k_quants_beat_the_32_block_formats_of_their_width():
    """On gaussian weights the scale searches pay: relative RMS error (measured: Q4_K 0.0715 vs Q4_1
    0.0783 and Q4_0 0.0861; Q5_K 0.0362 vs Q5_1 0.0379; Q6_K 0.0178) at 4.5, 5.5 and 6.56 bits."""
    x = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)

    def rel_rms(qtype):
        back = dequantize(quantize(x, qtype), qtype, x.shape).numpy()
        return float(np.sqrt(((back - x) ** 2).mean() / (x ** 2).mean()))

    assert rel_rms(GGMLType.Q4_K) < min(rel_rms(GGMLType.Q4_1), rel_rms(GGMLType.Q4_0))
    assert rel_rms(GGMLType.Q4_K) < 0.075
    assert rel_rms(GGMLType.Q5_K) < rel_rms(GGMLType.Q5_1) and rel_rms(GGMLType.Q5_K) < 0.038
    assert rel_rms(GGMLType.Q6_K) < 0.019


@pytest.mark.parametrize("sane_scales", [False, True])
@pytest.mark.parametrize("qtype", REFERENCE_DEQUANTIZED, ids=lambda t: t.name)
def test_dequantize_random_raw_bytes(qtype, sane_scales):
    """Any bytes: random scales (NaN and inf included, compared NaN-equal) and random quants;
    then the same with finite float16 scales of varied sizes, compared exactly."""
    rng = np.random.default_rng(int(qtype) * 2 + sane_scales)
    block, size = BLOCK_SIZES[qtype]
    shape = (5, 4 * max(block, 64))
    raw = rng.integers(0, 256, (shape[0], shape[1] // block * size), dtype=np.uint8)
    if sane_scales:
        blocks = raw.reshape(-1, size)
        for at in F16_SCALES.get(qtype, []):
            scales = (rng.standard_normal(len(blocks)) * 10.0 ** rng.uniform(-5, 2, len(blocks))).astype(np.float16)
            blocks[:, at:at + 2] = scales.reshape(-1, 1).view(np.uint8)
        if qtype in (GGMLType.F16, GGMLType.BF16, GGMLType.F32):
            raw = quantize(rng.standard_normal(shape).astype(np.float32), qtype)
    got = dequantize(raw, qtype, shape).numpy()
    expected = ref_dequantize(raw, qtype, shape)
    assert np.array_equal(got, expected, equal_nan=not sane_scales)
    if sane_scales:
        assert np.isfinite(got).all()


def test_types_without_a_reference_dequantizer():
    """F64, the integer types and Q8_K (f32 d, int8 qs[256], int16 bsums[16]): by the C structs."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 8))
    assert torch.equal(dequantize(x.view(np.uint8), GGMLType.F64, (2, 8)), torch.from_numpy(x.astype(np.float32)))
    for qtype, dtype in [(GGMLType.I8, np.int8), (GGMLType.I16, np.int16), (GGMLType.I32, np.int32),
                         (GGMLType.I64, np.int64)]:
        v = rng.integers(-100, 100, (3, 4)).astype(dtype)
        assert dequantize(v.view(np.uint8), qtype, (3, 4)).tolist() == v.astype(np.float32).tolist()
    d = np.array([0.5, -3.0], dtype=np.float32)
    qs = rng.integers(-128, 128, (2, 256)).astype(np.int8)
    raw = np.concatenate([d.reshape(2, 1).view(np.uint8), qs.view(np.uint8), np.zeros((2, 32), np.uint8)], axis=1)
    assert np.array_equal(dequantize(raw, GGMLType.Q8_K, (2, 256)).numpy(), qs.astype(np.float32) * d[:, None])


@pytest.mark.parametrize("qtype", SMALL_BLOCKS, ids=lambda t: t.name)
def test_round_trip_error_bounds(qtype):
    """Per block, the error of quantize -> dequantize is within the format's step."""
    x = varied(7, (16, 512))
    back = dequantize(quantize(x, qtype), qtype, x.shape).numpy()
    block = BLOCK_SIZES[qtype][0]
    xb, err = x.reshape(-1, block), np.abs(back - x).reshape(-1, block)
    amax, lo = np.abs(xb).max(axis=1), xb.min(axis=1)
    span = xb.max(axis=1) - lo

    def f16(v):  # how far a value moves when stored as float16 (subnormals: absolute)
        return np.maximum(np.abs(v) * 2.0 ** -11, 2.0 ** -25)

    # Symmetric formats: half a step d (a full step at the clipped end of Q4_0/Q5_0), plus the
    # stored scale's float16 error times the largest quant; Q4_1/Q5_1 add their float16 minimum.
    bound = {
        GGMLType.F32: np.zeros_like(amax),
        GGMLType.F16: f16(amax),
        GGMLType.BF16: amax * 2.0 ** -8,
        GGMLType.Q8_0: amax / 127 / 2 + 127 * f16(amax / 127),
        GGMLType.Q4_0: amax / 8 + 8 * f16(amax / 8),
        GGMLType.Q5_0: amax / 16 + 16 * f16(amax / 16),
        GGMLType.Q4_1: span / 15 / 2 + 15 * f16(span / 15) + f16(lo),
        GGMLType.Q5_1: span / 31 / 2 + 31 * f16(span / 31) + f16(lo),
    }[qtype]
    assert (err.max(axis=1) <= bound * (1 + 1e-4)).all()
    if qtype is GGMLType.F32:
        assert np.array_equal(back, x)


def test_quantize_accepts_torch_and_strided_input():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    expected = ref_quantize(x.numpy(), GGMLType.Q8_0)
    assert np.array_equal(quantize(x, GGMLType.Q8_0), expected)
    wide = torch.randn(4, 128)
    wide[:, ::2] = x
    assert np.array_equal(quantize(wide[:, ::2], GGMLType.Q8_0), expected)  # a non-contiguous view
    as_bf16 = x.bfloat16()
    assert np.array_equal(quantize(as_bf16, GGMLType.BF16), ref_quantize(as_bf16.float().numpy(), GGMLType.BF16))
    raw = torch.from_numpy(expected.copy())
    assert torch.equal(dequantize(raw, GGMLType.Q8_0, (4, 64)), dequantize(expected, GGMLType.Q8_0, [4, 64]))
    strided = np.zeros((4, 80), np.uint8)
    strided[:, :68] = expected
    assert torch.equal(dequantize(strided[:, :68], GGMLType.Q8_0, (4, 64)),  # a non-contiguous view
                       dequantize(expected, GGMLType.Q8_0, (4, 64)))


def test_chunked_passes_equal_one_pass(monkeypatch):
    rng = np.random.default_rng(11)
    raw = rng.integers(0, 256, (9, 5 * 210), dtype=np.uint8)
    raw.reshape(-1, 210)[:, 208:210] = np.full((45, 1), 0.01, np.float16).view(np.uint8)
    x = varied(11, (9, 1024))
    whole_d, whole_q, whole_k = dequantize(raw, GGMLType.Q6_K, (9, 1280)), quantize(x, GGMLType.Q4_1), \
        quantize(x, GGMLType.Q4_K)
    monkeypatch.setattr(quants, "_CHUNK_ELEMENTS", 1000)  # 3 blocks of 256, 31 of 32 per pass
    assert torch.equal(dequantize(raw, GGMLType.Q6_K, (9, 1280)), whole_d)
    assert np.array_equal(quantize(x, GGMLType.Q4_1), whole_q)
    assert np.array_equal(quantize(x, GGMLType.Q4_K), whole_k)


def test_q4_k_dequantize_takes_milliseconds():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (576, 1536 // 256 * 144), dtype=np.uint8)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        out = dequantize(raw, GGMLType.Q4_K, (576, 1536))
        best = min(best, time.perf_counter() - start)
    assert out.shape == (576, 1536)
    assert best < 0.2, f"{best * 1e3:.0f} ms"


def test_supported_types_cover_the_reference():
    """Every type the gguf package can (de)quantize, among the types we read, we can too; it has
    no quantizer for the K-quants, of which we write Q4_K, Q5_K and Q6_K (judged by llama.cpp)."""
    x = np.ones((1, 256), np.float32)
    for qtype in BLOCK_SIZES:
        try:
            ref.quantize(x, REF_TYPE[qtype])
            can = True
        except NotImplementedError:
            can = False
        assert can == (qtype in GGUF_QUANTIZED), qtype.name
    assert set(QUANTIZE) == set(GGUF_QUANTIZED) | set(K_QUANTIZED)
    for qtype in K_QUANTS:
        assert qtype in DEQUANTIZE and (qtype in QUANTIZE) == (qtype in K_QUANTIZED)
    assert set(DEQUANTIZE) == set(BLOCK_SIZES)


@pytest.mark.parametrize("call, message", [
    (lambda: dequantize(np.zeros(33, np.uint8), GGMLType.Q8_0, (32,)), "takes 34 bytes, got 33"),
    (lambda: dequantize(np.zeros(34, np.uint8), GGMLType.Q8_0, (2, 16)), "multiple of 32"),
    (lambda: dequantize(np.zeros(8, np.float32), GGMLType.F32, (8,)), "uint8"),
    (lambda: dequantize(np.zeros(66, np.uint8), GGMLType.IQ2_XXS, (256,)), "cannot dequantize ggml type IQ2_XXS"),
    (lambda: dequantize(np.zeros(4, np.uint8), 5, (1,)), "unknown ggml type 5"),
    (lambda: dequantize(np.zeros(4, np.uint8), GGMLType.F32, (-1,)), "bad tensor shape"),
    (lambda: quantize(torch.zeros(256), GGMLType.Q3_K), "cannot quantize ggml type Q3_K"),
    (lambda: quantize(torch.zeros(2, 128), GGMLType.Q4_K), "multiple of 256"),
    (lambda: quantize(torch.zeros(48), GGMLType.Q4_0), "multiple of 32"),
])
def test_bad_arguments(call, message):
    with pytest.raises(InvalidArgument, match=message):
        call()
