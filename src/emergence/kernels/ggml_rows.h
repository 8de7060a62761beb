// ggml's block formats with AVX512-VNNI: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (blocks of 32) and the
// K-quants Q4_K, Q5_K, Q6_K (super-blocks of 256), the types of llama.cpp's common GGUF files
// (Q4_K_M mixes Q4_K and Q6_K; rows that do not fill 256-blocks fall back to Q5_0 / Q5_1 /
// Q8_0). Here: their codes, the decoding GEMV, the rows dequantized; quant_rows.h's qgemm_ggml
// multiplies a prompt's rows on the same codes.
// Included by quant_rows.h, after its activation quantization for the 32-blocks (QuantizedX).
//
// llama.cpp's numerics: the activation vector is quantized first, to Q8_0 blocks of 32 for the
// 32-blocks (Q4_1 / Q5_1's Q8_1 holds the same values) and to Q8_K blocks of 256 for
// the K-quants (d = 1 / s, s = -127 / m, m the block's value of largest magnitude with its sign,
// q = min(127, round-to-even(x * s)), and the sums of q per 16). Each weight's code goes to the
// unsigned side of VPDPBUSD as is (0..15, 0..31 or 0..63, in element order), so every
// sub-block's dot product with q is exact in int32; the formats' offsets (Q5_0's -16, Q6_K's
// -32) and minimums come back through the sums of q, and the fp32 scales multiply last. The
// result is the dequantized weight times the quantized x (quant/methods.py, what GGMLLinear's
// eager forward computes) up to fp32 rounding.
//
// Layouts (gguf/quants.py has the same in numpy; element e of a block):
//   Q4_1  fp16 d, fp16 m, 16 bytes: byte j low nibble e = j, high e = j + 16       w = d q + m
//   Q5_0  fp16 d, uint32 qh (bit e: e's fifth bit), 16 bytes as Q4_1's            w = d (q - 16)
//   Q5_1  fp16 d, fp16 m, qh, 16 bytes                                             w = d q + m
//   Q4_K  fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins of 8 sub-blocks of 32, 128
//         bytes: the 32 bytes of chunk c hold e = 64c + j (low) and 64c + 32 + j (high)
//                                                                  w = d sc q - dmin mn
//   Q5_K  as Q4_K with 32 bytes qh after the scales: bit s of qh[j] is the fifth bit of
//         e = 32s + j                                               w = d sc q - dmin mn
//   Q6_K  128 bytes ql, 64 bytes qh, 16 int8 scales (sub-blocks of 16), fp16 d; in half h
//         (e = 128h + ...), e = 32t + j takes the low nibble (t = 0, 1) or high nibble (t = 2,
//         3) of ql[64h + 32 (t % 2) + j] and bits 2t, 2t + 1 of qh[32h + j]  w = d sc (q - 32)
#pragma once

namespace emergence {

// The 32-blocks whose only kernels are these (Q8_0 and Q4_0 also have widening ones without VNNI),
// and the K-quants.
constexpr bool is_vnni_only32(WeightKind k) { return k == WeightKind::Q4_1 || k == WeightKind::Q5_0 || k == WeightKind::Q5_1; }
constexpr bool is_kquant(WeightKind k) { return k == WeightKind::Q4_K || k == WeightKind::Q5_K || k == WeightKind::Q6_K; }

// Bytes of one block (32 elements) or super-block (256).
constexpr int64_t ggml_block_bytes(WeightKind k) {
  switch (k) {
    case WeightKind::Q8_0: return 34;
    case WeightKind::Q4_0: return 18;
    case WeightKind::Q4_1: return 20;
    case WeightKind::Q5_0: return 22;
    case WeightKind::Q5_1: return 24;
    case WeightKind::Q4_K: return 144;
    case WeightKind::Q5_K: return 176;
    case WeightKind::Q6_K: return 210;
    default: return 0;
  }
}

// The bias a 32-block format's unsigned codes carry (codes - bias = the signed values the
// block's scale multiplies; 0 where the format has a minimum instead).
constexpr int ggml_bias(WeightKind k) {
  return k == WeightKind::Q8_0 ? 128 : k == WeightKind::Q4_0 ? 8 : k == WeightKind::Q5_0 ? 16 : 0;
}

// x as Q8_K (quantize_row_q8_K_ref; quant/methods.py's quantize_activations_q8_k).
struct QuantizedXK {
  std::vector<int8_t> q;       // (K,)
  std::vector<float> d;        // (K / 256,)
  std::vector<int32_t> bsums;  // (K / 16,): the sum of q over each 16
};

// Many rows of x as Q8_K (quant_rows.h's qgemm_ggml for K-quant weights): M padded to whole tiles.
struct QuantizedRowsK {
  int64_t M = 0;
  std::vector<int8_t> q;       // (M, K)
  std::vector<float> d;        // (M, K / 256)
  std::vector<int32_t> bsums;  // (M, K / 16)
};

inline void quantize_x_k(const float* x, int64_t K, QuantizedXK& out) {
  out.q.resize(K), out.d.resize(K / 256), out.bsums.resize(K / 16);
  for (int64_t b = 0; b < K / 256; ++b) {
    const float* v = x + 256 * b;
    int8_t* q = out.q.data() + 256 * b;
    float amax = 0, top = 0;  // the first value of largest magnitude, with its sign
    for (int j = 0; j < 256; ++j) {
      if (std::fabs(v[j]) > amax) amax = std::fabs(v[j]), top = v[j];
    }
    if (amax == 0) {
      std::fill(q, q + 256, 0), out.d[b] = 0;
      std::fill(out.bsums.begin() + 16 * b, out.bsums.begin() + 16 * b + 16, 0);
      continue;
    }
    const float iscale = -127.0f / top;
    for (int j = 0; j < 256; ++j) q[j] = static_cast<int8_t>(std::min(127.0f, std::nearbyint(v[j] * iscale)));
    out.d[b] = 1.0f / iscale;
    for (int g = 0; g < 16; ++g) {
      int32_t s = 0;
      for (int j = 0; j < 16; ++j) s += q[16 * g + j];
      out.bsums[16 * b + g] = s;
    }
  }
}

// Two 256-bit halves as one 512-bit vector (the first in the low half).
__attribute__((target("avx512f")))
inline __m512i join(__m256i first, __m256i second) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1);
}

// The 32 codes of a 32-block in element order: 16 bytes of nibbles, byte j's low nibble element
// j and its high nibble element j + 16, plus (Q5) the fifth bits from the uint32 at qh.
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m256i codes32(const uint8_t* qs, const uint8_t* qh) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)), low4 = _mm_set1_epi8(0x0F);
  const __m256i nib = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low4), _mm_and_si128(v, low4));
  if (qh == nullptr) return nib;
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
  return _mm256_or_si256(nib, _mm256_maskz_set1_epi8(bits, 0x10));
}

// A 32-block's 32 codes, unsigned (where each format keeps its nibbles and fifth bits; Q8_0's
// int8 values + 128, Q4_0's nibbles are its values + 8).
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m256i ggml32_codes(WeightKind k, const uint8_t* blk) {
  switch (k) {
    case WeightKind::Q8_0:
      return _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2)),
                              _mm256_set1_epi8(static_cast<char>(0x80)));
    case WeightKind::Q4_0: return codes32(blk + 2, nullptr);
    case WeightKind::Q4_1: return codes32(blk + 4, nullptr);
    case WeightKind::Q5_0: return codes32(blk + 6, blk + 2);
    default: return codes32(blk + 8, blk + 4);
  }
}

// R rows of a 32-block format times x quantized to Q8_0 (quantize_x with the format's bias: 128
// for Q8_0, 8 for Q4_0, 16 for Q5_0, so their accumulators start at -bias sum(q); 0 for Q4_1 /
// Q5_1, whose minimum m adds m d_x sum(q)); the rows share the loads of x. Two blocks a step:
// one VPDPBUSD over their 64 codes, lanes 0-7 the first block's, 8-15 the second's. Each row's
// sum is the same whatever R.
template <WeightKind KIND, int R>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512vnni")))
void rows_ggml32(const uint8_t* row, int64_t row_bytes, const QuantizedX& xq, int64_t K, float* y) {
  constexpr int64_t bytes = ggml_block_bytes(KIND);
  constexpr bool has_min = KIND == WeightKind::Q4_1 || KIND == WeightKind::Q5_1;
  auto codes = [](const uint8_t* blk) { return ggml32_codes(KIND, blk); };
  auto init = [&](int64_t b) {
    return has_min ? _mm256_setzero_si256() : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.init.data() + 8 * b));
  };
  __m512 acc[R];
  float mins[R], tail[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps(), mins[i] = 0, tail[i] = 0;
  const int64_t blocks = K / 32;
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    const __m512i xv = _mm512_loadu_si512(xq.q.data() + 32 * b), start = join(init(b), init(b + 1));
    const float dx0 = xq.d[b], dx1 = xq.d[b + 1];
    for (int i = 0; i < R; ++i) {
      const uint8_t* blk = row + i * row_bytes + b * bytes;
      _mm_prefetch(reinterpret_cast<const char*>(blk + PREFETCH_ROWS * row_bytes), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(blk + PREFETCH_ROWS * row_bytes + bytes), _MM_HINT_T0);
      const __m512i dot = _mm512_dpbusd_epi32(start, join(codes(blk), codes(blk + bytes)), xv);
      const __m512 scale = _mm512_insertf32x8(_mm512_set1_ps(f16_to_f32(blk) * dx0),
                                              _mm256_set1_ps(f16_to_f32(blk + bytes) * dx1), 1);
      acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[i]);
      if constexpr (has_min) {
        mins[i] += f16_to_f32(blk + 2) * (dx0 * static_cast<float>(xq.sum[b])) +
                   f16_to_f32(blk + bytes + 2) * (dx1 * static_cast<float>(xq.sum[b + 1]));
      }
    }
  }
  if (b < blocks) {  // an odd last block
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.q.data() + 32 * b));
    for (int i = 0; i < R; ++i) {
      const uint8_t* blk = row + i * row_bytes + b * bytes;
      const __m256i dot = _mm256_dpbusd_epi32(init(b), codes(blk), xv);
      tail[i] = hsum256(_mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(f16_to_f32(blk) * xq.d[b])));
      if constexpr (has_min) mins[i] += f16_to_f32(blk + 2) * (xq.d[b] * static_cast<float>(xq.sum[b]));
    }
  }
  for (int i = 0; i < R; ++i) y[i] = _mm512_reduce_add_ps(acc[i]) + tail[i] + mins[i];
}

// Q4_K / Q5_K: the 8 sub-blocks' 6-bit scales and minimums from the 12 packed bytes
// (get_scale_min_k4: scales 0-3 and minimums 0-3 in the low 6 bits of bytes 0-3 and 4-7, scales
// and minimums 4-7 in the nibbles of bytes 8-11 with their top 2 bits in the top bits of bytes
// 0-3 and 4-7), on four 32-bit words as llama.cpp's kernels unpack them: sc[0..7] the 8 scales,
// mn[0..7] the 8 minimums.
inline void scale_min_k4(const uint8_t* q, uint8_t* sc, uint8_t* mn) {
  constexpr uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, low2 = 0x03030303;
  uint32_t w[3];
  std::memcpy(w, q, 12);
  const uint32_t scales[2] = {w[0] & low6, (w[2] & low4) | (((w[0] >> 6) & low2) << 4)};
  const uint32_t mins[2] = {w[1] & low6, ((w[2] >> 4) & low4) | (((w[1] >> 6) & low2) << 4)};
  std::memcpy(sc, scales, 8), std::memcpy(mn, mins, 8);
}

// Codes of a K-quant super-block's elements 64c..64c+63 in element order, unsigned: Q4_K's
// 0..15, Q5_K's 0..31, Q6_K's 0..63 (its values + 32).
template <WeightKind KIND>
__attribute__((target("avx512f,avx512vl,avx512bw")))
inline __m512i kquant_codes64(const uint8_t* blk, int c) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  if constexpr (KIND == WeightKind::Q6_K) {  // half h = c / 2; t = 2 (c % 2) and 2 (c % 2) + 1
    const int h = c / 2, up = 4 * (c % 2);  // the high nibbles of ql for the half's second 64
    const uint8_t* ql = blk + 64 * h;
    const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * h));
    const __m256i three = _mm256_set1_epi8(3);
    auto part = [&](const uint8_t* q, int shift) {  // 32 codes: a nibble of q, bits `shift` of qh
      const __m256i l = _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)), up), low4);
      return _mm256_or_si256(l, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, shift), three), 4));
    };
    return join(part(ql, up), part(ql + 32, up + 2));
  } else {  // 32 bytes: low nibbles elements 64c..64c+31, high nibbles the next 32
    const uint8_t* qs = blk + (KIND == WeightKind::Q5_K ? 48 : 16);
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
    __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    if constexpr (KIND == WeightKind::Q5_K) {  // bit s of qh[j]: the fifth bit of element 32s + j
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16)), one = _mm256_set1_epi8(1);
      lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c), one), 4));
      hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * c + 1), one), 4));
    }
    return join(lo, hi);
  }
}

// A K-quant super-block's sub-block scales and minimums in fp32, as gguf/quants.py computes them
// (d * sc, dmin * mn; Q6_K: d * sc over 16 sub-blocks of 16, no minimum). Returns the sub-blocks.
template <WeightKind KIND>
inline int kquant_scales(const uint8_t* blk, float* dsc, float* dmn) {
  if constexpr (KIND == WeightKind::Q6_K) {
    const float d = f16_to_f32(blk + 208);
    for (int u = 0; u < 16; ++u) dsc[u] = d * static_cast<float>(static_cast<int8_t>(blk[192 + u])), dmn[u] = 0;
    return 16;
  } else {
    uint8_t sc[8], mn[8];
    scale_min_k4(blk + 4, sc, mn);
    const float d = f16_to_f32(blk), dmin = f16_to_f32(blk + 2);
    for (int u = 0; u < 8; ++u) dsc[u] = d * static_cast<float>(sc[u]), dmn[u] = dmin * static_cast<float>(mn[u]);
    return 8;
  }
}

// Q4_K / Q5_K / Q6_K row times x quantized to Q8_K, 64 elements a step: VPMADDUBSW multiplies
// their codes (<= 63) by q and adds neighbours (|sum| <= 2 * 63 * 128, no saturation), VPMADDWD
// multiplies each pair by its sub-block's integer scale and adds pairs: 16 int32 lanes, lane L
// holding elements 4L..4L+3 of the step. A super-block's lanes are exact in int32 and become
// fp32 once, times d_x d; the minimums (Q4_K / Q5_K) and Q6_K's offset of 32 come from the sums
// of q per 16.
template <WeightKind KIND>
__attribute__((target("avx512f,avx512vl,avx512bw")))
float row_kquant(const uint8_t* row, int64_t row_bytes, const QuantizedXK& xq, int64_t K) {
  constexpr int64_t bytes = ggml_block_bytes(KIND);
  __m512 acc = _mm512_setzero_ps();
  float mins = 0;
  for (int64_t s = 0; s < K / 256; ++s) {
    const uint8_t* blk = row + s * bytes;
    for (int64_t off = 0; off < bytes; off += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(blk + PREFETCH_ROWS * row_bytes + off), _MM_HINT_T0);
    }
    const int8_t* q8 = xq.q.data() + 256 * s;
    const int32_t* bsums = xq.bsums.data() + 16 * s;
    __m512i isum = _mm512_setzero_si512();
    float d;
    if constexpr (KIND == WeightKind::Q6_K) {
      // int16 scales of the 16 sub-blocks; pair p of step c is in sub-block 4c + p / 8
      const __m512i scales = _mm512_cvtepi8_epi16(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192))));
      const __m512i sub = _mm512_set_epi16(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2,
                                           1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
      int32_t offset = 0;  // the codes are q + 32: take 32 sc sum(q) back per sub-block of 16
      for (int j = 0; j < 16; ++j) offset += static_cast<int8_t>(blk[192 + j]) * bsums[j];
      for (int c = 0; c < 4; ++c) {
        const __m512i scale = _mm512_permutexvar_epi16(_mm512_add_epi16(sub, _mm512_set1_epi16(4 * c)), scales);
        const __m512i pairs = _mm512_maddubs_epi16(kquant_codes64<KIND>(blk, c), _mm512_loadu_si512(q8 + 64 * c));
        isum = _mm512_add_epi32(isum, _mm512_madd_epi16(pairs, scale));
      }
      isum = _mm512_mask_sub_epi32(isum, 1, isum, _mm512_set1_epi32(32 * offset));  // lane 0
      d = f16_to_f32(blk + 208);
    } else {
      uint8_t sc[8], mn[8];
      scale_min_k4(blk + 4, sc, mn);
      int32_t summ = 0;
      for (int j = 0; j < 8; ++j) summ += mn[j] * (bsums[2 * j] + bsums[2 * j + 1]);
      // int16 scales of the 8 sub-blocks; pair p of step c is in sub-block 2c + p / 16
      const __m512i scales = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc))));
      const __m512i sub = _mm512_set_epi16(1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                                           0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
      for (int c = 0; c < 4; ++c) {  // sub-blocks 2c and 2c + 1
        const __m512i scale = _mm512_permutexvar_epi16(_mm512_add_epi16(sub, _mm512_set1_epi16(2 * c)), scales);
        const __m512i pairs = _mm512_maddubs_epi16(kquant_codes64<KIND>(blk, c), _mm512_loadu_si512(q8 + 64 * c));
        isum = _mm512_add_epi32(isum, _mm512_madd_epi16(pairs, scale));
      }
      d = f16_to_f32(blk);
      mins += xq.d[s] * (f16_to_f32(blk + 2) * static_cast<float>(summ));
    }
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(xq.d[s] * d), acc);
  }
  return _mm512_reduce_add_ps(acc) - mins;
}

// y[r0:r1] = rows r0..r1 of W times x for the formats above. xq / xk: x quantized (the
// caller's, prepared before).
inline void ggml_gemv_rows(const QuantMatrix& m, const QuantizedX& xq, const QuantizedXK& xk, float* y, int64_t r0,
                           int64_t r1) {
  const int64_t K = m.K, rb = m.row_bytes;
  int64_t r = r0;
  if (m.kind == WeightKind::Q4_0) {  // 2 rows at a time, sharing the loads of x (measured faster
    // than 1 or 4 on the Xeon, and on the EPYC than one row at a time); each row's sum is the one
    // a row alone gets
    for (; r + 2 <= r1; r += 2) rows_ggml32<WeightKind::Q4_0, 2>(m.data + r * rb, rb, xq, K, y + r);
  }
  for (; r < r1; ++r) {
    const uint8_t* row = m.data + r * rb;
    switch (m.kind) {
      case WeightKind::Q8_0: rows_ggml32<WeightKind::Q8_0, 1>(row, rb, xq, K, y + r); break;
      case WeightKind::Q4_0: rows_ggml32<WeightKind::Q4_0, 1>(row, rb, xq, K, y + r); break;
      case WeightKind::Q4_1: rows_ggml32<WeightKind::Q4_1, 1>(row, rb, xq, K, y + r); break;
      case WeightKind::Q5_0: rows_ggml32<WeightKind::Q5_0, 1>(row, rb, xq, K, y + r); break;
      case WeightKind::Q5_1: rows_ggml32<WeightKind::Q5_1, 1>(row, rb, xq, K, y + r); break;
      case WeightKind::Q4_K: y[r] = row_kquant<WeightKind::Q4_K>(row, rb, xk, K); break;
      case WeightKind::Q5_K: y[r] = row_kquant<WeightKind::Q5_K>(row, rb, xk, K); break;
      default: y[r] = row_kquant<WeightKind::Q6_K>(row, rb, xk, K); break;
    }
  }
}

// A K-quant row of K values as fp32 (gguf/quants.py's values: the sub-block's d * sc times the
// code, minus its dmin * mn; Q6_K's code minus 32).
template <WeightKind KIND>
__attribute__((target("avx512f,avx512vl,avx512bw")))
inline void kquant_dequantize_row(const uint8_t* row, int64_t K, float* w) {
  constexpr int64_t bytes = ggml_block_bytes(KIND);
  constexpr int size = KIND == WeightKind::Q6_K ? 16 : 32;  // elements a sub-block
  constexpr int bias = KIND == WeightKind::Q6_K ? 32 : 0;
  alignas(64) uint8_t q[256];
  float dsc[16], dmn[16];
  for (int64_t s = 0; s < K / 256; ++s) {
    const uint8_t* blk = row + s * bytes;
    for (int c = 0; c < 4; ++c) _mm512_store_si512(q + 64 * c, kquant_codes64<KIND>(blk, c));
    const int subs = kquant_scales<KIND>(blk, dsc, dmn);
    float* out = w + 256 * s;
    for (int u = 0; u < subs; ++u) {
      for (int j = 0; j < size; ++j) {
        const float v = dsc[u] * static_cast<float>(q[size * u + j] - bias);
        out[size * u + j] = KIND == WeightKind::Q6_K ? v : v - dmn[u];
      }
    }
  }
}

// Row r as fp32, the values of gguf/quants.py's dequantize (the same fp32 operations: the scale
// products first, then a multiply and an add or subtract). Every ggml format (the codes need no
// VNNI): a packed token table's lookups and the eager forward.
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline void ggml_dequantize_row(const QuantMatrix& m, int64_t r, float* w) {
  const uint8_t* row = m.data + r * m.row_bytes;
  const int64_t bytes = ggml_block_bytes(m.kind);
  alignas(32) uint8_t q[32];
  if (!is_kquant(m.kind)) {
    const int bias = ggml_bias(m.kind);
    for (int64_t b = 0; b < m.K / 32; ++b) {
      const uint8_t* blk = row + b * bytes;
      _mm256_store_si256(reinterpret_cast<__m256i*>(q), ggml32_codes(m.kind, blk));
      const float d = f16_to_f32(blk);
      float* out = w + 32 * b;
      if (m.kind != WeightKind::Q4_1 && m.kind != WeightKind::Q5_1) {
        for (int j = 0; j < 32; ++j) out[j] = d * static_cast<float>(q[j] - bias);
      } else {
        const float mn = f16_to_f32(blk + 2);
        for (int j = 0; j < 32; ++j) out[j] = d * static_cast<float>(q[j]) + mn;
      }
    }
    return;
  }
  switch (m.kind) {
    case WeightKind::Q4_K: kquant_dequantize_row<WeightKind::Q4_K>(row, m.K, w); break;
    case WeightKind::Q5_K: kquant_dequantize_row<WeightKind::Q5_K>(row, m.K, w); break;
    default: kquant_dequantize_row<WeightKind::Q6_K>(row, m.K, w); break;
  }
}

}  // namespace emergence
