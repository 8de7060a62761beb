"""ggml block formats: quantize and dequantize bit-exact with llama.cpp's `gguf.quants` (bytes
equal, float32 values equal) on varied data, hypothesis-drawn blocks and random raw bytes;
round-trip error bounds; speed; bad arguments."""

from __future__ import annotations

import time

import gguf
import gguf.quants as ref
import numpy as np
import pytest
import torch
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
@pytest.mark.parametrize("qtype", list(QUANTIZE), ids=lambda t: t.name)
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
@given(qtype=st.sampled_from(list(QUANTIZE)), x=hnp.arrays(np.float32, st.sampled_from([(32,), (2, 64), (3, 32)]),
                                                            elements=FINITE))
def test_hypothesis_blocks_match_the_reference(qtype, x):
    got = quantize(x, qtype)
    assert np.array_equal(got, ref_quantize(x, qtype))
    assert np.array_equal(dequantize(got, qtype, x.shape).numpy(), ref_dequantize(got, qtype, x.shape))


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


@pytest.mark.parametrize("qtype", list(QUANTIZE), ids=lambda t: t.name)
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
    whole_d, whole_q = dequantize(raw, GGMLType.Q6_K, (9, 1280)), quantize(x, GGMLType.Q4_1)
    monkeypatch.setattr(quants, "_CHUNK_ELEMENTS", 1000)  # 3 blocks of 256, 31 of 32 per pass
    assert torch.equal(dequantize(raw, GGMLType.Q6_K, (9, 1280)), whole_d)
    assert np.array_equal(quantize(x, GGMLType.Q4_1), whole_q)


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
    """Every type the gguf package can (de)quantize, among the types we read, we can too; and
    it has no quantizer for the K-quants (the reason they are dequantize-only)."""
    x = np.ones((1, 256), np.float32)
    for qtype in BLOCK_SIZES:
        try:
            ref.quantize(x, REF_TYPE[qtype])
            can = True
        except NotImplementedError:
            can = False
        assert can == (qtype in QUANTIZE), qtype.name
    for qtype in K_QUANTS:
        assert qtype in DEQUANTIZE and qtype not in QUANTIZE
    assert set(DEQUANTIZE) == set(BLOCK_SIZES)


@pytest.mark.parametrize("call, message", [
    (lambda: dequantize(np.zeros(33, np.uint8), GGMLType.Q8_0, (32,)), "takes 34 bytes, got 33"),
    (lambda: dequantize(np.zeros(34, np.uint8), GGMLType.Q8_0, (2, 16)), "multiple of 32"),
    (lambda: dequantize(np.zeros(8, np.float32), GGMLType.F32, (8,)), "uint8"),
    (lambda: dequantize(np.zeros(66, np.uint8), GGMLType.IQ2_XXS, (256,)), "cannot dequantize ggml type IQ2_XXS"),
    (lambda: dequantize(np.zeros(4, np.uint8), 5, (1,)), "unknown ggml type 5"),
    (lambda: dequantize(np.zeros(4, np.uint8), GGMLType.F32, (-1,)), "bad tensor shape"),
    (lambda: quantize(torch.zeros(256), GGMLType.Q4_K), "cannot quantize ggml type Q4_K"),
    (lambda: quantize(torch.zeros(48), GGMLType.Q4_0), "multiple of 32"),
])
def test_bad_arguments(call, message):
    with pytest.raises(InvalidArgument, match=message):
        call()
