// Matrix-vector products with quantized weights, for batch-1 decoding: the weights stream
// from memory in their packed form, so each token reads 1-8.5 bits per weight instead of 16
// or 32 (and, for ggml's formats, the matrix product of a prompt's rows on the packed blocks:
// qgemm_ggml). For our own formats (int8, int4, NF4, ternary) the codes become fp32 values in
// registers (int8 and ternary widened and converted, int4 and NF4 by a table lookup) and the
// result equals x times the dequantized weight (up to fp32 summation order). For ggml's formats
// the activation vector is quantized the way llama.cpp does it (blocks of 32, int8 with scale
// max|x| / 127; Q8_K's 256 for the K-quants) and the dot products run on integers with
// AVX512-VNNI (ggml_rows.h): the numerics of llama.cpp's own CPU kernels, at a fraction of the
// instructions.
//
// Weight layouts (one row of K inputs per output; rows contiguous, `row_bytes` apart):
//   Q8_0     ggml blocks of 32: fp16 scale d, 32 int8 q;            w = d * q
//   Q4_0     ggml blocks of 32: fp16 scale d, 16 bytes; byte j holds element j (low nibble)
//            and element j + 16 (high nibble);                       w = d * (nibble - 8)
//   INT8     int8 per weight, one fp32 scale per row;                w = scale[row] * q
//   INT4     two 4-bit codes per byte, column 2j low, 2j + 1 high; per group of G columns
//            an fp32 scale and offset;                               w = code * scale + offset
//   TERNARY  2-bit codes c in {0, 1, 2} for {-1, 0, +1}: within each 64-column chunk, byte j
//            holds columns j, j + 16, j + 32, j + 48 in bits 0-1, 2-3, 4-5, 6-7; one fp32
//            scale per tensor;                                       w = scale * (c - 1)
//   NF4      two 4-bit codes per byte, column 2j high, 2j + 1 low (bitsandbytes' order); an
//            fp32 absmax per 64 columns and a 16-value table;       w = table[code] * absmax
//   Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K: ggml's blocks, in ggml_rows.h (codes, GEMV, rows;
//            prompts in qgemm_ggml below)
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "blas.h"
#include "gemv_rows.h"  // hsum4, gemm_rows
#include "team.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace emergence {

enum class WeightKind : int {
  F32 = 0, BF16 = 1, Q8_0 = 2, Q4_0 = 3, INT8 = 4, INT4 = 5, TERNARY = 6, NF4 = 7,
  Q4_1 = 8, Q5_0 = 9, Q5_1 = 10, Q4_K = 11, Q5_K = 12, Q6_K = 13  // ggml_rows.h
};

struct QuantMatrix {
  WeightKind kind;
  const uint8_t* data;     // packed weights
  int64_t row_bytes;       // bytes per row
  const float* scales;     // INT8: (N,); INT4: (N, K / group); NF4: (N, K / 64) absmax
  const float* offsets;    // INT4: (N, K / group); NF4: the 16-value code table
  int64_t group;           // INT4 group size (32, 64 or 128)
  float tensor_scale;      // TERNARY
  int64_t N, K;
};

// Rows ahead that the kernels prefetch: the hardware prefetcher falls behind on these short,
// compute-heavy rows (measured: Q8_0 decode 19 -> 12 ms per token on smollm2-135m).
constexpr int64_t PREFETCH_ROWS = 8;

inline float f16_to_f32(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m512 widen_i8(const void* p) {  // 16 int8 -> 16 fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Q8_0 and Q4_0 rows are decoded R at a time (R independent accumulator chains hide the FMA
// latency; the x loads are shared). Block b of row i starts at row + i * row_bytes + b * block.
template <int R>
inline void rows_q8_0(const uint8_t* row, int64_t row_bytes, const float* x, int64_t K, float* y) {
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / 32; ++b) {
    const __m512 x0 = _mm512_loadu_ps(x + 32 * b), x1 = _mm512_loadu_ps(x + 32 * b + 16);
    for (int i = 0; i < R; ++i) {
      const uint8_t* blk = row + i * row_bytes + b * 34;
      __m512 s = _mm512_mul_ps(widen_i8(blk + 2), x0);
      s = _mm512_fmadd_ps(widen_i8(blk + 18), x1, s);
      acc[i] = _mm512_fmadd_ps(s, _mm512_set1_ps(f16_to_f32(blk)), acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) y[i] = _mm512_reduce_add_ps(acc[i]);
}

template <int R>
inline void rows_q4_0(const uint8_t* row, int64_t row_bytes, const float* x, int64_t K, float* y) {
  const __m512i low4 = _mm512_set1_epi32(0xF), eight = _mm512_set1_epi32(8);
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / 32; ++b) {
    const __m512 x0 = _mm512_loadu_ps(x + 32 * b), x1 = _mm512_loadu_ps(x + 32 * b + 16);
    for (int i = 0; i < R; ++i) {
      const uint8_t* blk = row + i * row_bytes + b * 18;
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(v, low4), eight));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(v, 4), eight));
      __m512 s = _mm512_mul_ps(lo, x0);
      s = _mm512_fmadd_ps(hi, x1, s);
      acc[i] = _mm512_fmadd_ps(s, _mm512_set1_ps(f16_to_f32(blk)), acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) y[i] = _mm512_reduce_add_ps(acc[i]);
}

// int8 rows, 4 at a time (they share the x loads, and their four horizontal sums are done
// together; one row alone runs two FMA chains, one would be bound by the FMA's latency).
// y[i] = dot(row i, x), the row scale not applied.
inline void rows_int8_4(const int8_t* row, int64_t row_bytes, const float* x, int64_t K, float* y) {
  const int64_t K16 = K & ~int64_t(15);
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t k = 0; k < K16; k += 16) {
    const __m512 xv = _mm512_loadu_ps(x + k);
    for (int i = 0; i < 4; ++i) acc[i] = _mm512_fmadd_ps(widen_i8(row + i * row_bytes + k), xv, acc[i]);
  }
  _mm_storeu_ps(y, hsum4(acc[0], acc[1], acc[2], acc[3]));
  for (int i = 0; i < 4; ++i) {
    for (int64_t k = K16; k < K; ++k) y[i] += row[i * row_bytes + k] * x[k];
  }
}

inline float row_int8(const int8_t* row, const float* x, int64_t K) {
  const int64_t K32 = K & ~int64_t(31);
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (int64_t k = 0; k < K32; k += 32) {
    a0 = _mm512_fmadd_ps(widen_i8(row + k), _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(widen_i8(row + k + 16), _mm512_loadu_ps(x + k + 16), a1);
  }
  float tail = 0;
  for (int64_t k = K32; k < K; ++k) tail += row[k] * x[k];
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) + tail;
}

// ------------------------------------------------------- ggml Q8_0 / Q4_0 with VNNI
inline const bool kHasAvx512Vnni = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");

// x as llama.cpp quantizes activations for these dot products (quantize_row_q8_0): blocks of
// 32, d = max|x| / 127 kept as fp16, q = round(x / d) half away from zero. The weights enter the unsigned side of VPDPBUSD offset by `bias` (Q8_0:
// w + 128; Q4_0: its 4-bit code, w + 8), so each block's accumulator starts at -bias * sum(q).
struct QuantizedX {
  std::vector<int8_t> q;      // (K,)
  std::vector<float> d;       // (K / 32,)
  std::vector<int32_t> init;  // (K / 32, 8): -bias * sum(q) in lane 0, zeros elsewhere
  std::vector<int32_t> sum;   // (K / 32,): sum(q) (Q4_1 / Q5_1's minimums, ggml_rows.h)
};

// 16 floats rounded half away from zero, as std::round: the truncation, plus the sign where the
// dropped fraction is at least one half (|v - trunc(v)| is exact in fp32).
__attribute__((target("avx512f,avx512dq")))
inline __m512i round_away(__m512 v) {
  const __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __mmask16 up = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(v, t)), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
  const __m512 sign = _mm512_or_ps(_mm512_set1_ps(1.0f), _mm512_and_ps(v, _mm512_set1_ps(-0.0f)));
  return _mm512_cvttps_epi32(_mm512_mask_add_ps(t, up, t, sign));
}

__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
inline void quantize_x(const float* x, int64_t K, int bias, QuantizedX& out) {
  out.q.resize(K), out.d.resize(K / 32), out.init.assign(K / 32 * 8, 0), out.sum.resize(K / 32);
  for (int64_t b = 0; b < K / 32; ++b) {
    const __m512 lo = _mm512_loadu_ps(x + 32 * b), hi = _mm512_loadu_ps(x + 32 * b + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const float d = amax / 127.0f, inv = d > 0 ? 1.0f / d : 0.0f;
    const __m512i qlo = round_away(_mm512_mul_ps(lo, _mm512_set1_ps(inv)));
    const __m512i qhi = round_away(_mm512_mul_ps(hi, _mm512_set1_ps(inv)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + 32 * b), _mm512_cvtepi32_epi8(qlo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + 32 * b + 16), _mm512_cvtepi32_epi8(qhi));
    out.d[b] = _cvtsh_ss(_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT));
    out.sum[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
    out.init[8 * b] = -bias * out.sum[b];
  }
}

__attribute__((target("avx512f,avx512vl")))
inline float hsum256(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

}  // namespace emergence
#include "ggml_rows.h"  // every ggml format's codes and GEMV rows, on QuantizedX / QuantizedXK
namespace emergence {

// ----------------------------------------------- ggml blocks times many rows (prefill)
// Y (M, N) = X (M, K) W^T on the packed blocks, never dequantizing W: each row of X is quantized
// as quantize_x does (llama.cpp's Q8_0 activations) and every block's dot product runs on
// integers, scaled by the two blocks' scales into fp32 sums, as llama.cpp's CPU matrix products
// do (fp32 sums in another order than the one-row kernel above: within 1e-6 relative of it).
// A tile of 16 weight rows is unpacked once (to w + bias, unsigned) with the rows interleaved
// four bytes at a time, so one VPDPBUSD multiplies 4 columns of all 16 rows by 4 bytes of one
// activation row broadcast to every lane: the 16 lanes are the 16 outputs, and a block's 8
// instructions need one convert and one scaled add, with no horizontal sum. Q4_1 / Q5_0 / Q5_1
// unpack to their unsigned codes (ggml_rows.h's codes32): Q5_0's offset of 16 is the bias, and
// Q4_1 / Q5_1 add each block's minimum times d_x sum(q) of the activation row.
constexpr int kQgemmRows = 16, kQgemmCols = 8;

struct QuantizedRows {
  int64_t M = 0, blocks = 0;   // rows (padded to a multiple of kQgemmCols), blocks per row
  std::vector<int8_t> q;       // (M, K)
  std::vector<float> d;        // (M, blocks): the block scales
  std::vector<int32_t> init;   // (M, blocks): -bias * the block's sum of q
  std::vector<float> dsum;     // (M, blocks): d * the block's sum of q (the minimums' factor)
  QuantizedRowsK k;            // the rows as Q8_K, for K-quant weights
};

// In a team (team.h) `out` must be shared by its threads.
inline void quantize_rows(const float* x, int64_t M, int64_t K, int bias, QuantizedRows& out) {
  const int64_t nb = K / 32;
  serially([&] {
    out.M = (M + kQgemmCols - 1) / kQgemmCols * kQgemmCols, out.blocks = nb;
    out.q.assign(out.M * K, 0), out.d.assign(out.M * nb, 0.0f), out.init.assign(out.M * nb, 0);
    out.dsum.assign(out.M * nb, 0.0f);
  });
  parallel_rows(0, M, 16, [&](int64_t t0, int64_t t1) {
    QuantizedX row;
    for (int64_t t = t0; t < t1; ++t) {
      quantize_x(x + t * K, K, bias, row);
      std::memcpy(out.q.data() + t * K, row.q.data(), K);
      std::memcpy(out.d.data() + t * nb, row.d.data(), nb * sizeof(float));
      for (int64_t b = 0; b < nb; ++b) {
        out.init[t * nb + b] = row.init[8 * b];
        out.dsum[t * nb + b] = row.d[b] * static_cast<float>(row.sum[b]);
      }
    }
  });
}

// The rows of x as Q8_K (quantize_x_k), for a K-quant W. In a team `out` must be shared.
inline void quantize_rows_k(const float* x, int64_t M, int64_t K, QuantizedRowsK& out) {
  serially([&] {
    out.M = (M + kQgemmCols - 1) / kQgemmCols * kQgemmCols;
    out.q.assign(out.M * K, 0), out.d.assign(out.M * (K / 256), 0.0f), out.bsums.assign(out.M * (K / 16), 0);
  });
  parallel_rows(0, M, 16, [&](int64_t t0, int64_t t1) {
    QuantizedXK row;
    for (int64_t t = t0; t < t1; ++t) {
      quantize_x_k(x + t * K, K, row);
      std::memcpy(out.q.data() + t * K, row.q.data(), K);
      std::memcpy(out.d.data() + t * (K / 256), row.d.data(), (K / 256) * sizeof(float));
      std::memcpy(out.bsums.data() + t * (K / 16), row.bsums.data(), (K / 16) * sizeof(int32_t));
    }
  });
}

// A tile's 16 unpacked rows of W bytes (`stage`) as W / 4 column groups of 64 bytes: group g
// holds columns 4g..4g+3 of every row, row i's four in lane i (a transpose of 4-byte groups).
template <int W>
__attribute__((target("avx512f")))
inline void interleave_tile(const uint8_t (&stage)[kQgemmRows][W], uint8_t* out) {
  const __m512i rows_at = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32(W / 4));  // row i's dword 0 in `stage`
  for (int g = 0; g < W / 4; ++g)
    _mm512_storeu_si512(out + g * 64, _mm512_i32gather_epi32(_mm512_add_epi32(rows_at, _mm512_set1_epi32(g)), stage, 4));
}

template <WeightKind KIND>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512vnni")))
void qgemm_ggml_rows(const QuantMatrix& m, const QuantizedRows& X, float* y, int64_t M, int64_t r0, int64_t r1) {
  constexpr int R = kQgemmRows, T = kQgemmCols;
  constexpr bool has_min = KIND == WeightKind::Q4_1 || KIND == WeightKind::Q5_1;
  const int64_t K = m.K, nb = K / 32, N = m.N;
  const int64_t block_bytes = ggml_block_bytes(KIND);
  std::vector<uint8_t> wq(nb * 8 * 64);  // block b, column group g (4 columns): 16 rows x 4 bytes
  std::vector<float> wd(nb * 16);        // block b: the 16 rows' scales
  std::vector<float> wm(has_min ? nb * 16 : 0);  // and their minimums
  alignas(64) uint8_t stage[R][32] = {};  // one block of each row, unpacked
  for (int64_t r = r0; r < r1; r += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, r1 - r));
    std::memset(stage, 0, sizeof(stage)), std::fill(wd.begin(), wd.end(), 0.0f), std::fill(wm.begin(), wm.end(), 0.0f);
    for (int64_t b = 0; b < nb; ++b) {
      for (int i = 0; i < rows; ++i) {
        const uint8_t* blk = m.data + (r + i) * m.row_bytes + b * block_bytes;
        _mm256_store_si256(reinterpret_cast<__m256i*>(stage[i]), ggml32_codes(KIND, blk));  // w + bias, unsigned
        if constexpr (has_min) wm[b * 16 + i] = f16_to_f32(blk + 2);
        wd[b * 16 + i] = f16_to_f32(blk);
      }
      interleave_tile(stage, wq.data() + b * 8 * 64);
    }
    const __mmask16 keep = static_cast<__mmask16>((1u << rows) - 1);
    for (int64_t t = 0; t < X.M; t += T) {
      __m512 acc[T];
      for (int j = 0; j < T; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        __m512i s[T];
        for (int j = 0; j < T; ++j) s[j] = _mm512_set1_epi32(X.init[(t + j) * nb + b]);
        for (int g = 0; g < 8; ++g) {
          const __m512i w = _mm512_loadu_si512(wq.data() + (b * 8 + g) * 64);
          for (int j = 0; j < T; ++j) {
            int32_t four;
            std::memcpy(&four, X.q.data() + (t + j) * K + b * 32 + g * 4, 4);
            s[j] = _mm512_dpbusd_epi32(s[j], w, _mm512_set1_epi32(four));
          }
        }
        const __m512 dw = _mm512_loadu_ps(wd.data() + b * 16);
        for (int j = 0; j < T; ++j)
          acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[j]), _mm512_mul_ps(dw, _mm512_set1_ps(X.d[(t + j) * nb + b])),
                                   acc[j]);
        if constexpr (has_min) {
          const __m512 mw = _mm512_loadu_ps(wm.data() + b * 16);
          for (int j = 0; j < T; ++j) acc[j] = _mm512_fmadd_ps(mw, _mm512_set1_ps(X.dsum[(t + j) * nb + b]), acc[j]);
        }
      }
      for (int j = 0; j < T && t + j < M; ++j) _mm512_mask_storeu_ps(y + (t + j) * N + r, keep, acc[j]);
    }
  }
}

// A K-quant W the same way, a super-block at a time: the tile's 16 rows unpacked to their codes
// (kquant_codes64) and interleaved 4 bytes at a time, each sub-block's integer dot products
// (VPDPBUSD; Q6_K's start at -32 sum(q) per 16) scaled by the rows' fp32 d * sc and the
// activation row's d, the minimums (d_min * mn times d sum(q) over the sub-block) taken off.
template <WeightKind KIND>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512vnni")))
void qgemm_kquant_rows(const QuantMatrix& m, const QuantizedRowsK& X, float* y, int64_t M, int64_t r0, int64_t r1) {
  constexpr int R = kQgemmRows, T = kQgemmCols;
  constexpr int size = KIND == WeightKind::Q6_K ? 16 : 32, subs = 256 / size;  // a sub-block's elements; per super-block
  const int64_t K = m.K, ns = K / 256, N = m.N, bytes = ggml_block_bytes(KIND);
  std::vector<uint8_t> wq(ns * 64 * 64);  // super-block s, column group g (4 columns): 16 rows x 4 bytes
  std::vector<float> wd(ns * subs * 16), wm(ns * subs * 16);  // each sub-block's 16 rows' d * sc, dmin * mn
  alignas(64) uint8_t stage[R][256] = {};  // one super-block of each row, unpacked
  float dsc[16], dmn[16];
  for (int64_t r = r0; r < r1; r += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, r1 - r));
    std::memset(stage, 0, sizeof(stage)), std::fill(wd.begin(), wd.end(), 0.0f), std::fill(wm.begin(), wm.end(), 0.0f);
    for (int64_t s = 0; s < ns; ++s) {
      for (int i = 0; i < rows; ++i) {
        const uint8_t* blk = m.data + (r + i) * m.row_bytes + s * bytes;
        for (int c = 0; c < 4; ++c) _mm512_store_si512(stage[i] + 64 * c, kquant_codes64<KIND>(blk, c));
        kquant_scales<KIND>(blk, dsc, dmn);
        for (int u = 0; u < subs; ++u) wd[(s * subs + u) * 16 + i] = dsc[u], wm[(s * subs + u) * 16 + i] = dmn[u];
      }
      interleave_tile(stage, wq.data() + s * 64 * 64);
    }
    const __mmask16 keep = static_cast<__mmask16>((1u << rows) - 1);
    for (int64_t t = 0; t < X.M; t += T) {
      __m512 acc[T];
      for (int j = 0; j < T; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t s = 0; s < ns; ++s) {
        for (int u = 0; u < subs; ++u) {
          __m512i sum[T];
          for (int j = 0; j < T; ++j) {
            const int32_t* bs = X.bsums.data() + (t + j) * (K / 16) + s * 16;
            sum[j] = _mm512_set1_epi32(KIND == WeightKind::Q6_K ? -32 * bs[u] : 0);
          }
          for (int g = u * size / 4; g < (u + 1) * size / 4; ++g) {
            const __m512i w = _mm512_loadu_si512(wq.data() + (s * 64 + g) * 64);
            for (int j = 0; j < T; ++j) {
              int32_t four;
              std::memcpy(&four, X.q.data() + (t + j) * K + s * 256 + g * 4, 4);
              sum[j] = _mm512_dpbusd_epi32(sum[j], w, _mm512_set1_epi32(four));
            }
          }
          const __m512 dw = _mm512_loadu_ps(wd.data() + (s * subs + u) * 16);
          const __m512 mw = _mm512_loadu_ps(wm.data() + (s * subs + u) * 16);
          for (int j = 0; j < T; ++j) {
            const float dx = X.d[(t + j) * ns + s];
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[j]), _mm512_mul_ps(dw, _mm512_set1_ps(dx)), acc[j]);
            if constexpr (KIND != WeightKind::Q6_K) {
              const int32_t* bs = X.bsums.data() + (t + j) * (K / 16) + s * 16;
              acc[j] = _mm512_fnmadd_ps(mw, _mm512_set1_ps(dx * static_cast<float>(bs[2 * u] + bs[2 * u + 1])), acc[j]);
            }
          }
        }
      }
      for (int j = 0; j < T && t + j < M; ++j) _mm512_mask_storeu_ps(y + (t + j) * N + r, keep, acc[j]);
    }
  }
}

// Whether qgemm_ggml multiplies this kind on its blocks: every ggml kind.
constexpr bool ggml_block_gemm(WeightKind k) {
  return k == WeightKind::Q8_0 || k == WeightKind::Q4_0 || is_vnni_only32(k) || is_kquant(k);
}

// Y (M, N) fp32 = X (M, K) W^T for a ggml W (the caller checks: kHasAvx512Vnni); tiles of 16
// rows of W split across threads. X: scratch for x quantized, shared in a team.
inline void qgemm_ggml(const QuantMatrix& m, const float* x, int64_t M, float* y, QuantizedRows& X) {
  const int64_t tiles = (m.N + kQgemmRows - 1) / kQgemmRows;
  if (is_kquant(m.kind)) {
    quantize_rows_k(x, M, m.K, X.k);
    parallel_rows(0, tiles, 1, [&](int64_t a, int64_t b) {
      const int64_t r0 = a * kQgemmRows, r1 = std::min(m.N, b * kQgemmRows);
      switch (m.kind) {
        case WeightKind::Q4_K: qgemm_kquant_rows<WeightKind::Q4_K>(m, X.k, y, M, r0, r1); break;
        case WeightKind::Q5_K: qgemm_kquant_rows<WeightKind::Q5_K>(m, X.k, y, M, r0, r1); break;
        default: qgemm_kquant_rows<WeightKind::Q6_K>(m, X.k, y, M, r0, r1); break;
      }
    });
    return;
  }
  quantize_rows(x, M, m.K, ggml_bias(m.kind), X);
  parallel_rows(0, tiles, 1, [&](int64_t a, int64_t b) {
    const int64_t r0 = a * kQgemmRows, r1 = std::min(m.N, b * kQgemmRows);
    switch (m.kind) {
      case WeightKind::Q4_0: qgemm_ggml_rows<WeightKind::Q4_0>(m, X, y, M, r0, r1); break;
      case WeightKind::Q4_1: qgemm_ggml_rows<WeightKind::Q4_1>(m, X, y, M, r0, r1); break;
      case WeightKind::Q5_0: qgemm_ggml_rows<WeightKind::Q5_0>(m, X, y, M, r0, r1); break;
      case WeightKind::Q5_1: qgemm_ggml_rows<WeightKind::Q5_1>(m, X, y, M, r0, r1); break;
      default: qgemm_ggml_rows<WeightKind::Q8_0>(m, X, y, M, r0, r1); break;
    }
  });
}

inline float dot_f32(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc);
  if (k < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - k)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), _mm512_maskz_loadu_ps(m, b + k), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// int4 and NF4 rows share one kernel: a code becomes its value by a 16-entry table lookup
// (VPERMPS, which reads only the low 4 bits of each index lane): the table is 0..15 for int4
// (the value is then code * scale + offset, the offsets' share added after) and the NF4 code
// book for NF4 (value table[code] * absmax). 128 columns a step: the chunk's 64 packed bytes
// are one vector of 16 lanes of 8 codes, and shifting it right by 4j brings code j of every
// lane to its low bits, so 8 lookups cover the chunk with no widening or conversion. x_split
// holds x re-ordered to match (see split_x); the columns past the last whole chunk (K % 128,
// a multiple of 32) go 32 at a time, each 16 packed bytes widened to one lane per byte.
// The per-column scales (groups of 32, 64 or 128 columns; NF4's absmax per 64) apply to each
// chunk's partial sums lane by lane: lane i holds columns 8i..8i+7, all in one group.
struct Nibbles {
  __m512 table;         // code -> value
  __m512i scale_lane;   // lane i -> which of the chunk's 128 / group scales: 8i / group
  __mmask16 scale_mask; // the chunk's 128 / group scales
  int64_t group, groups;  // columns per scale; scales per row
};

inline Nibbles nibbles(const QuantMatrix& m) {
  Nibbles n;
  n.group = m.kind == WeightKind::NF4 ? 64 : m.group;
  n.groups = m.K / n.group;
  alignas(64) int32_t lane[16];
  for (int i = 0; i < 16; ++i) lane[i] = 8 * i / static_cast<int32_t>(n.group);
  n.scale_lane = _mm512_load_si512(lane);
  n.scale_mask = static_cast<__mmask16>((1u << (128 / n.group)) - 1);
  n.table = m.kind == WeightKind::NF4 ? _mm512_loadu_ps(m.offsets)
                                      : _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return n;
}

// x_split (K,): each whole 128-column chunk as 8 vectors, vector j lane i holding the column of
// code j of lane i: byte 4i + j / 2, its low nibble for even j; then each 32-column step of the
// rest as the 16 low nibbles' columns, then the 16 high nibbles'. int4 keeps column 2b in byte
// b's low nibble, NF4 in its high one (low_odd).
inline void split_x(const float* x, int64_t K, bool low_odd, float* xs) {
  const int lo = low_odd ? 1 : 0;
  const int64_t whole = K / 128 * 128;
  for (int64_t c = 0; c < whole; c += 128) {
    for (int j = 0; j < 8; ++j) {
      for (int i = 0; i < 16; ++i) xs[c + 16 * j + i] = x[c + 8 * i + (j ^ lo)];
    }
  }
  for (int64_t c = whole; c < K; c += 32) {
    for (int j = 0; j < 16; ++j) xs[c + j] = x[c + 2 * j + lo], xs[c + 16 + j] = x[c + 2 * j + 1 - lo];
  }
}

// R rows at once (they share the x loads); y[i] = sum over columns of value * scale * x, the
// offsets' share not included.
template <int R>
inline void rows_4bit(const uint8_t* row, int64_t row_bytes, const float* scales, const Nibbles& n, const float* xs,
                      int64_t K, float* y) {
  const int64_t whole = K / 128 * 128;
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t c = 0; c < whole; c += 128) {
    __m512i w[R];
    __m512 s0[R], s1[R];  // two chains a row
    for (int i = 0; i < R; ++i) {
      w[i] = _mm512_loadu_si512(row + i * row_bytes + c / 2);
      s0[i] = _mm512_setzero_ps(), s1[i] = _mm512_setzero_ps();
    }
#pragma GCC unroll 4
    for (int j = 0; j < 8; j += 2) {
      const __m512 x0 = _mm512_loadu_ps(xs + c + 16 * j), x1 = _mm512_loadu_ps(xs + c + 16 * j + 16);
      for (int i = 0; i < R; ++i) {
        s0[i] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(w[i], 4 * j), n.table), x0, s0[i]);
        s1[i] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(w[i], 4 * j + 4), n.table), x1, s1[i]);
      }
    }
    for (int i = 0; i < R; ++i) {
      const __m512 scale =
          _mm512_permutexvar_ps(n.scale_lane, _mm512_maskz_loadu_ps(n.scale_mask, scales + i * n.groups + c / n.group));
      acc[i] = _mm512_fmadd_ps(_mm512_add_ps(s0[i], s1[i]), scale, acc[i]);
    }
  }
  for (int64_t c = whole; c < K; c += 32) {
    const __m512 x0 = _mm512_loadu_ps(xs + c), x1 = _mm512_loadu_ps(xs + c + 16);
    for (int i = 0; i < R; ++i) {
      const __m512i v =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i * row_bytes + c / 2)));
      const __m512 s = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), n.table), x1,
                                       _mm512_mul_ps(_mm512_permutexvar_ps(v, n.table), x0));
      acc[i] = _mm512_fmadd_ps(s, _mm512_set1_ps(scales[i * n.groups + c / n.group]), acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) y[i] = _mm512_reduce_add_ps(acc[i]);
}

inline float row_ternary(const uint8_t* row, const float* x, int64_t K) {
  const __m512i three = _mm512_set1_epi32(3), one = _mm512_set1_epi32(1);
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t c = 0; c < K; c += 64) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c / 4)));
    for (int part = 0; part < 4; ++part) {  // one accumulator per part: independent FMA chains
      const __m512i code = _mm512_and_si512(_mm512_srli_epi32(v, 2 * part), three);
      acc[part] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(code, one)), _mm512_loadu_ps(x + c + 16 * part),
                                  acc[part]);
    }
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

// y (N,) = W x for a quantized W; rows split across threads.
inline void quant_gemv(const QuantMatrix& m, const float* x, float* y, int64_t grain) {
  const int64_t K = m.K;
  const bool four_bit = m.kind == WeightKind::INT4 || m.kind == WeightKind::NF4;
  // int4, NF4: x re-ordered for rows_4bit; int4: sum of x per group; ggml: x quantized.
  // Each thread's own (a team's threads each prepare them), kept between calls: no allocation
  // per product on the decode path. Named through references: the row lambdas below may run on
  // other threads, where the thread_local names would be those threads' own buffers.
  thread_local std::vector<float> split_buffer, sums_buffer;
  thread_local QuantizedX quantized_buffer;
  thread_local QuantizedXK quantized_k_buffer;
  std::vector<float>& x_split = split_buffer;
  std::vector<float>& sums = sums_buffer;
  QuantizedX& xq = quantized_buffer;
  QuantizedXK& xk = quantized_k_buffer;
  const bool ggml = m.kind == WeightKind::Q8_0 || m.kind == WeightKind::Q4_0;
  if (is_vnni_only32(m.kind) || is_kquant(m.kind) || (ggml && kHasAvx512Vnni)) {
    // ggml's formats on integers (quant_matrix checked VNNI for all but Q8_0 / Q4_0)
    if (is_kquant(m.kind)) quantize_x_k(x, K, xk);
    else quantize_x(x, K, ggml_bias(m.kind), xq);
    parallel_rows(0, m.N, grain, [&](int64_t r0, int64_t r1) { ggml_gemv_rows(m, xq, xk, y, r0, r1); });
    return;
  }
  Nibbles nib;
  if (four_bit) {
    nib = nibbles(m);
    x_split.resize(K);
    split_x(x, K, m.kind == WeightKind::NF4, x_split.data());
  }
  if (m.kind == WeightKind::INT4) {
    sums.resize(nib.groups);
    for (int64_t g = 0; g < nib.groups; ++g) {
      float s = 0;
      for (int64_t k = g * nib.group; k < (g + 1) * nib.group; ++k) s += x[k];
      sums[g] = s;
    }
  }
  const bool one_row = g_one_row_streams.load(std::memory_order_relaxed);
  parallel_rows(0, m.N, grain, [&](int64_t r0, int64_t r1) {
    int64_t r = r0;
    if (four_bit) {  // 2 rows at a time share the x loads (or 1: g_one_row_streams)
      const int64_t G = nib.groups;
      auto finish = [&](int64_t i) {  // int4: the offsets' share, sum_g offset[g] * sum(x over group g)
        if (m.kind == WeightKind::INT4) y[i] += dot_f32(m.offsets + i * G, sums.data(), G);
      };
      auto prefetch = [&](int64_t row, int64_t n) {  // the codes, scales and offsets of n rows from `row`
        const uint8_t* ahead = m.data + row * m.row_bytes;
        for (int64_t off = 0; off < n * m.row_bytes; off += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
        const float* per_group[2] = {m.scales, m.kind == WeightKind::INT4 ? m.offsets : nullptr};
        for (const float* p : per_group) {
          if (p == nullptr) continue;
          const char* at = reinterpret_cast<const char*>(p + row * G);
          for (int64_t off = 0; off < n * G * 4; off += 64) _mm_prefetch(at + off, _MM_HINT_T0);
        }
      };
      for (; r + 2 <= r1 && !one_row; r += 2) {
        if (r + PREFETCH_ROWS + 1 < r1) prefetch(r + PREFETCH_ROWS, 2);
        rows_4bit<2>(m.data + r * m.row_bytes, m.row_bytes, m.scales + r * G, nib, x_split.data(), K, y + r);
        finish(r), finish(r + 1);
      }
      for (; r < r1; ++r) {
        if (r + PREFETCH_ROWS < r1) prefetch(r + PREFETCH_ROWS, 1);
        rows_4bit<1>(m.data + r * m.row_bytes, m.row_bytes, m.scales + r * G, nib, x_split.data(), K, y + r);
        finish(r);
      }
      return;
    }
    if (m.kind == WeightKind::INT8) {
      for (; r + 4 <= r1 && !one_row; r += 4) {  // 4 rows at a time, or 1 (g_one_row_streams)
        if (r + PREFETCH_ROWS + 3 < r1) {  // the 4 rows PREFETCH_ROWS ahead
          const uint8_t* ahead = m.data + (r + PREFETCH_ROWS) * m.row_bytes;
          for (int64_t off = 0; off < 4 * m.row_bytes; off += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
        }
        rows_int8_4(reinterpret_cast<const int8_t*>(m.data + r * m.row_bytes), m.row_bytes, x, K, y + r);
        for (int i = 0; i < 4; ++i) y[r + i] *= m.scales[r + i];
      }
    }
    if (ggml) {  // no VNNI: widen the codes to fp32
      const bool q8 = m.kind == WeightKind::Q8_0;
      for (; r + 4 <= r1; r += 4) {
        const uint8_t* row = m.data + r * m.row_bytes;
        q8 ? rows_q8_0<4>(row, m.row_bytes, x, K, y + r) : rows_q4_0<4>(row, m.row_bytes, x, K, y + r);
      }
      for (; r < r1; ++r) {
        const uint8_t* row = m.data + r * m.row_bytes;
        q8 ? rows_q8_0<1>(row, m.row_bytes, x, K, y + r) : rows_q4_0<1>(row, m.row_bytes, x, K, y + r);
      }
      return;
    }
    for (; r < r1; ++r) {
      const uint8_t* row = m.data + r * m.row_bytes;
      if (r + PREFETCH_ROWS < r1) {  // the row PREFETCH_ROWS ahead, one cache line at a time
        const uint8_t* ahead = row + PREFETCH_ROWS * m.row_bytes;
        for (int64_t off = 0; off < m.row_bytes; off += 64) _mm_prefetch(reinterpret_cast<const char*>(ahead + off), _MM_HINT_T0);
      }
      switch (m.kind) {
        case WeightKind::INT8: y[r] = m.scales[r] * row_int8(reinterpret_cast<const int8_t*>(row), x, K); break;
        case WeightKind::TERNARY: y[r] = m.tensor_scale * row_ternary(row, x, K); break;
        default: TORCH_CHECK(false, "not a quantized weight kind");
      }
    }
  });
}

// Row r of a quantized weight as fp32 (K values into w): a packed embedding's lookup, and the
// rows of dequantize_rows. Same values as each format's dequantize() in Python.
inline void dequantize_row(const QuantMatrix& m, int64_t r, float* w) {
  // 16 lanes at a time, the same operations in the same order as the scalar definitions (one
  // multiply; int4: a multiply, then an add), so the values are identical
  const int64_t K = m.K;
  const uint8_t* row = m.data + r * m.row_bytes;
  const __m128i low4 = _mm_set1_epi8(0x0F);
  switch (m.kind) {
    case WeightKind::INT8: {
      const __m512 scale = _mm512_set1_ps(m.scales[r]);
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) _mm512_storeu_ps(w + k, _mm512_mul_ps(scale, widen_i8(row + k)));
      for (; k < K; ++k) w[k] = m.scales[r] * static_cast<int8_t>(row[k]);
      break;
    }
    case WeightKind::INT4: {  // byte j: column 2j in the low nibble, 2j + 1 in the high one
      const float* scales = m.scales + r * (K / m.group);
      const float* offsets = m.offsets + r * (K / m.group);
      for (int64_t k = 0; k < K; k += 32) {  // 16 bytes, 32 columns of one group (group % 32 == 0)
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2));
        const __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
        const __m512 scale = _mm512_set1_ps(scales[k / m.group]), offset = _mm512_set1_ps(offsets[k / m.group]);
        const __m128i first = _mm_unpacklo_epi8(lo, hi), second = _mm_unpackhi_epi8(lo, hi);
        const __m512 c0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(first));
        const __m512 c1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(second));
        _mm512_storeu_ps(w + k, _mm512_add_ps(_mm512_mul_ps(c0, scale), offset));
        _mm512_storeu_ps(w + k + 16, _mm512_add_ps(_mm512_mul_ps(c1, scale), offset));
      }
      break;
    }
    case WeightKind::NF4: {  // byte j: column 2j in the high nibble, 2j + 1 in the low one
      const float* absmax = m.scales + r * (K / 64);
      const __m512 table = _mm512_loadu_ps(m.offsets);
      for (int64_t k = 0; k < K; k += 32) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2));
        const __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
        const __m512 a = _mm512_set1_ps(absmax[k / 64]);
        const __m512i c0 = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
        const __m512i c1 = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo));
        _mm512_storeu_ps(w + k, _mm512_mul_ps(_mm512_permutexvar_ps(c0, table), a));
        _mm512_storeu_ps(w + k + 16, _mm512_mul_ps(_mm512_permutexvar_ps(c1, table), a));
      }
      break;
    }
    case WeightKind::TERNARY:
      for (int64_t c = 0; c < K; c += 64) {
        for (int j = 0; j < 16; ++j) {
          const uint8_t byte = row[c / 4 + j];
          for (int part = 0; part < 4; ++part) w[c + 16 * part + j] = m.tensor_scale * (((byte >> (2 * part)) & 3) - 1);
        }
      }
      break;
    default: ggml_dequantize_row(m, r, w);  // (quant_matrix checked the kind)
  }
}

// The whole weight as fp32 (N, K) row-major, rows split across threads: the eager forward pass
// (prefill, batches) multiplies by it.
inline void dequantize_rows(const QuantMatrix& m, float* out, int64_t grain) {
  parallel_rows(0, m.N, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) dequantize_row(m, r, out + r * m.K);
  });
}

// 16 fp32 bit patterns rounded to the nearest bf16 value, ties to even (torch's
// .to(torch.bfloat16)): add 0x7FFF plus the bit that becomes the last kept one, clear the low
// 16 bits. For finite values (to_bf16 keeps NaNs apart).
inline __m512i round_bf16_bits(__m512i u) {
  const __m512i carry = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
  return _mm512_and_si512(_mm512_add_epi32(u, carry), _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u)));
}

// 16 finite fp32 values rounded to bf16, kept as fp32 (a bf16 model's intermediate results).
inline __m512 round_bf16(__m512 v) { return _mm512_castsi512_ps(round_bf16_bits(_mm512_castps_si512(v))); }

// fp32 -> bf16, rounded to nearest with ties to even (round_bf16_bits); a NaN stays a (quiet) NaN.
inline void to_bf16(const float* in, int64_t n, uint16_t* out) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
  const __m512i quiet_nan = _mm512_set1_epi32(0x7FC0);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i u = _mm512_castps_si512(_mm512_loadu_ps(in + i));
    const __m512i rounded = _mm512_srli_epi32(round_bf16_bits(u), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs_mask), inf);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet_nan)));
  }
  for (; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, in + i, 4);
    out[i] = (u & 0x7FFFFFFF) > 0x7F800000 ? 0x7FC0 : static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
  }
}

// Y (M, N) = X (M, K) W^T for our own formats (int8, int4, NF4, ternary) and many rows of X
// (a prompt in the eager forward pass): each thread widens its share of W a tile of rows at a
// time into its own fp32 buffer (dequantize_row: the values of dequantize()) and multiplies
// the tile with torch's BLAS while it is in cache (gemm_rows where the BLAS is missing), so the
// whole fp32 matrix never exists: N x K x 4 bytes written and read back per call before.
// xb: X rounded to bf16 (M, K), or null. Given, the tiles are bf16 (each row widened, then
// rounded) and multiplied by MKL's bf16 product (fp32 sums; AMX tiles where the CPU has them), or
// oneDNN's where onednn_products() (its result rounded to bf16), as bitsandbytes'
// 4-bit layers compute in their bf16 compute dtype: for 4-bit weights, whose quantization step
// is 1/15 of a group's range, the 2^-8 relative rounding of each operand is far below the
// weights' own error.
inline void qgemm_widened(const QuantMatrix& m, const float* x, int64_t M, float* y, const uint16_t* xb = nullptr) {
  const int64_t K = m.K;
  if (xb != nullptr) {  // bf16 tiles of <= 1 MiB: each row widened to fp32, then rounded into the tile
    const int64_t tile = std::clamp<int64_t>((1024 * 1024 / (2 * K)) / 16 * 16, 16, 4096);
    // (a share for every thread: a matrix of fewer rows than a tile is split, not left to one)
    const int64_t share = (m.N + at::get_num_threads() - 1) / at::get_num_threads();
    parallel_rows(0, m.N, std::min(tile, (share + 15) / 16 * 16), [&](int64_t r0, int64_t r1) {
      thread_local std::vector<float> row;
      thread_local std::vector<uint16_t> wb;
      row.resize(K);
      wb.resize(tile * K);
      for (int64_t t = r0; t < r1; t += tile) {
        const int64_t rows = std::min(tile, r1 - t);
        for (int64_t r = 0; r < rows; ++r) {
          dequantize_row(m, t + r, row.data());
          to_bf16(row.data(), K, wb.data() + r * K);
        }
        bf16gemm_block(wb.data(), rows, xb, M, y + t, m.N, K);
      }
    });
    return;
  }
  // rows a tile: <= 1 MiB of fp32, half this Xeon's L2 per core: large enough that packing X
  // again for every tile (the BLAS does) costs little, small enough to stay in cache
  const int64_t tile = std::clamp<int64_t>((1024 * 1024 / (4 * K)) / 16 * 16, 16, 512);
  parallel_rows(0, m.N, tile, [&](int64_t r0, int64_t r1) {
    thread_local std::vector<float> w;
    w.resize(tile * K);
    for (int64_t t = r0; t < r1; t += tile) {
      const int64_t rows = std::min(tile, r1 - t);
      for (int64_t r = 0; r < rows; ++r) dequantize_row(m, t + r, w.data() + r * K);
      if (kSgemm) {
        sgemm_block(w.data(), rows, x, M, y + t, m.N, K);
      } else {
        gemm_rows(w.data(), x, M, y + t, m.N, 0, rows, K);
      }
    }
  });
}

// Checks a packed weight's shape against its kind and returns the view the kernels read.
inline QuantMatrix quant_matrix(int64_t kind, const at::Tensor& data, const at::Tensor& scales, const at::Tensor& offsets,
                                int64_t group, double tensor_scale, int64_t N, int64_t K) {
  const auto k = static_cast<WeightKind>(kind);
  int64_t row_bytes = 0;
  switch (k) {
    case WeightKind::Q8_0: TORCH_CHECK(K % 32 == 0, "Q8_0 needs K % 32 == 0"); row_bytes = K / 32 * 34; break;
    case WeightKind::Q4_0: TORCH_CHECK(K % 32 == 0, "Q4_0 needs K % 32 == 0"); row_bytes = K / 32 * 18; break;
    case WeightKind::INT8:
      row_bytes = K;
      TORCH_CHECK(scales.numel() == N && scales.scalar_type() == at::kFloat, "INT8 needs (N,) fp32 scales");
      break;
    case WeightKind::INT4:
      // (rows_4bit's 128-column steps hold whole groups: 32, 64 or 128, as quant/methods.py's INT4_GROUP_SIZES)
      TORCH_CHECK((group == 32 || group == 64 || group == 128) && K % group == 0,
                  "INT4 needs a group size of 32, 64 or 128 that divides K");
      TORCH_CHECK(scales.numel() == N * (K / group) && offsets.numel() == N * (K / group) &&
                      scales.scalar_type() == at::kFloat && offsets.scalar_type() == at::kFloat,
                  "INT4 needs (N, K / group) fp32 scales and offsets");
      row_bytes = K / 2;
      break;
    case WeightKind::TERNARY: TORCH_CHECK(K % 64 == 0, "ternary needs K % 64 == 0"); row_bytes = K / 4; break;
    case WeightKind::NF4:
      TORCH_CHECK(K % 64 == 0, "NF4 needs K % 64 == 0");
      TORCH_CHECK(scales.numel() == N * (K / 64) && scales.scalar_type() == at::kFloat, "NF4 needs (N, K / 64) absmax");
      TORCH_CHECK(offsets.numel() == 16 && offsets.scalar_type() == at::kFloat, "NF4 needs its 16-value table");
      row_bytes = K / 2;
      break;
    case WeightKind::Q4_1: case WeightKind::Q5_0: case WeightKind::Q5_1: case WeightKind::Q4_K: case WeightKind::Q5_K:
    case WeightKind::Q6_K: {
      const int64_t block = is_kquant(k) ? 256 : 32;
      TORCH_CHECK(K % block == 0, "this ggml type needs K % ", block, " == 0");
      TORCH_CHECK(kHasAvx512Vnni, "the kernels for this ggml type need AVX512-VNNI");
      row_bytes = K / block * ggml_block_bytes(k);
      break;
    }
    default: TORCH_CHECK(false, "unknown quantized weight kind ", kind);
  }
  TORCH_CHECK(data.is_contiguous() && data.element_size() == 1 && data.numel() == N * row_bytes,
              "packed weight has the wrong number of bytes");
  TORCH_CHECK(!scales.defined() || scales.numel() == 0 || scales.is_contiguous(), "scales must be contiguous");
  TORCH_CHECK(!offsets.defined() || offsets.numel() == 0 || offsets.is_contiguous(), "offsets must be contiguous");
  return QuantMatrix{k,
                     static_cast<const uint8_t*>(data.data_ptr()),
                     row_bytes,
                     scales.defined() && scales.numel() ? scales.data_ptr<float>() : nullptr,
                     offsets.defined() && offsets.numel() ? offsets.data_ptr<float>() : nullptr,
                     group,
                     static_cast<float>(tensor_scale),
                     N,
                     K};
}

}  // namespace emergence
