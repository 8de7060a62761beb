// Matrix-vector products with quantized weights, for batch-1 decoding: the weights stream
// from memory in their packed form and are widened to fp32 in registers, so each token reads
// 1-8.5 bits per weight instead of 16 or 32. The activation vector x stays fp32 and the
// result equals x times the dequantized weight (up to fp32 summation order).
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
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <vector>

namespace emergence {

enum class WeightKind : int { F32 = 0, BF16 = 1, Q8_0 = 2, Q4_0 = 3, INT8 = 4, INT4 = 5, TERNARY = 6, NF4 = 7 };

struct QuantMatrix {
  WeightKind kind;
  const uint8_t* data;     // packed weights
  int64_t row_bytes;       // bytes per row
  const float* scales;     // INT8: (N,); INT4: (N, K / group); NF4: (N, K / 64) absmax
  const float* offsets;    // INT4: (N, K / group); NF4: the 16-value code table
  int64_t group;           // INT4 group size (a multiple of 32)
  float tensor_scale;      // TERNARY
  int64_t N, K;
};

inline float f16_to_f32(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m512 widen_i8(const void* p) {  // 16 int8 -> 16 fp32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

inline float row_q8_0(const uint8_t* row, const float* x, int64_t K) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / 32; ++b) {
    const uint8_t* blk = row + b * 34;
    __m512 s = _mm512_mul_ps(widen_i8(blk + 2), _mm512_loadu_ps(x + 32 * b));
    s = _mm512_fmadd_ps(widen_i8(blk + 18), _mm512_loadu_ps(x + 32 * b + 16), s);
    acc = _mm512_fmadd_ps(s, _mm512_set1_ps(f16_to_f32(blk)), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

inline float row_q4_0(const uint8_t* row, const float* x, int64_t K) {
  const __m512i low4 = _mm512_set1_epi32(0xF), eight = _mm512_set1_epi32(8);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / 32; ++b) {
    const uint8_t* blk = row + b * 18;
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)));
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(v, low4), eight));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(v, 4), eight));
    __m512 s = _mm512_mul_ps(lo, _mm512_loadu_ps(x + 32 * b));
    s = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 32 * b + 16), s);
    acc = _mm512_fmadd_ps(s, _mm512_set1_ps(f16_to_f32(blk)), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

inline float row_int8(const int8_t* row, const float* x, int64_t K) {
  const int64_t K16 = K & ~int64_t(15);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < K16; k += 16) acc = _mm512_fmadd_ps(widen_i8(row + k), _mm512_loadu_ps(x + k), acc);
  float tail = 0;
  for (int64_t k = K16; k < K; ++k) tail += row[k] * x[k];
  return _mm512_reduce_add_ps(acc) + tail;
}

// x_split: x re-ordered per 32-column chunk as its 16 even then 16 odd columns, matching the
// low and high nibbles of 16 packed bytes; x_group_sums: sum of x over each group.
inline float row_int4(const uint8_t* row, const float* scales, const float* offsets, int64_t group,
                      const float* x_split, const float* x_group_sums, int64_t K) {
  const __m512i low4 = _mm512_set1_epi32(0xF);
  __m512 acc = _mm512_setzero_ps();
  float offset_total = 0;
  for (int64_t g = 0; g < K / group; ++g) {
    __m512 s = _mm512_setzero_ps();
    for (int64_t c = g * group; c < (g + 1) * group; c += 32) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c / 2)));
      s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low4)), _mm512_loadu_ps(x_split + c), s);
      s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), _mm512_loadu_ps(x_split + c + 16), s);
    }
    acc = _mm512_fmadd_ps(s, _mm512_set1_ps(scales[g]), acc);
    offset_total += offsets[g] * x_group_sums[g];
  }
  return _mm512_reduce_add_ps(acc) + offset_total;
}

// x_split as for INT4, but the high nibble holds the even column here.
inline float row_nf4(const uint8_t* row, const float* absmax, const __m512 table, const float* x_split, int64_t K) {
  const __m512i low4 = _mm512_set1_epi32(0xF);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / 64; ++b) {
    __m512 s = _mm512_setzero_ps();
    for (int64_t c = 64 * b; c < 64 * (b + 1); c += 32) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c / 2)));
      s = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table), _mm512_loadu_ps(x_split + c), s);
      s = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_and_si512(v, low4), table), _mm512_loadu_ps(x_split + c + 16), s);
    }
    acc = _mm512_fmadd_ps(s, _mm512_set1_ps(absmax[b]), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

inline float row_ternary(const uint8_t* row, const float* x, int64_t K) {
  const __m512i three = _mm512_set1_epi32(3), one = _mm512_set1_epi32(1);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < K; c += 64) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c / 4)));
    for (int part = 0; part < 4; ++part) {
      const __m512i code = _mm512_and_si512(_mm512_srli_epi32(v, 2 * part), three);
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(code, one)), _mm512_loadu_ps(x + c + 16 * part), acc);
    }
  }
  return _mm512_reduce_add_ps(acc);
}

// y (N,) = W x for a quantized W; rows split across threads.
inline void quant_gemv(const QuantMatrix& m, const float* x, float* y, int64_t grain) {
  const int64_t K = m.K;
  std::vector<float> x_split, sums;
  if (m.kind == WeightKind::INT4 || m.kind == WeightKind::NF4) {
    x_split.resize(K);
    for (int64_t c = 0; c < K; c += 32) {
      for (int j = 0; j < 16; ++j) x_split[c + j] = x[c + 2 * j], x_split[c + 16 + j] = x[c + 2 * j + 1];
    }
  }
  if (m.kind == WeightKind::INT4) {
    sums.resize(K / m.group);
    for (int64_t g = 0; g < K / m.group; ++g) {
      float s = 0;
      for (int64_t k = g * m.group; k < (g + 1) * m.group; ++k) s += x[k];
      sums[g] = s;
    }
  }
  const __m512 table = m.kind == WeightKind::NF4 ? _mm512_loadu_ps(m.offsets) : _mm512_setzero_ps();
  at::parallel_for(0, m.N, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = m.data + r * m.row_bytes;
      switch (m.kind) {
        case WeightKind::Q8_0: y[r] = row_q8_0(row, x, K); break;
        case WeightKind::Q4_0: y[r] = row_q4_0(row, x, K); break;
        case WeightKind::INT8: y[r] = m.scales[r] * row_int8(reinterpret_cast<const int8_t*>(row), x, K); break;
        case WeightKind::INT4:
          y[r] = row_int4(row, m.scales + r * (K / m.group), m.offsets + r * (K / m.group), m.group, x_split.data(),
                          sums.data(), K);
          break;
        case WeightKind::TERNARY: y[r] = m.tensor_scale * row_ternary(row, x, K); break;
        case WeightKind::NF4: y[r] = row_nf4(row, m.scales + r * (K / 64), table, x_split.data(), K); break;
        default: TORCH_CHECK(false, "not a quantized weight kind");
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
      TORCH_CHECK(group % 32 == 0 && K % group == 0, "INT4 needs a group size that is a multiple of 32 and divides K");
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
