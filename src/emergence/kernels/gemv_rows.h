// Row kernels shared by the GEMV op (gemv.cpp) and the fused decode step (decode.cpp):
// y[r] = dot(W[r, :], x) for rows [row0, row1) of a contiguous (N, K) weight matrix, and the
// same for several vectors x at once (gemm_rows), accumulated in fp32 with AVX-512.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>

namespace emergence {


// Horizontal sum of 16 fp32 lanes.
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// [sum(v0), sum(v1), sum(v2), sum(v3)]: four horizontal sums in 14 instructions, against
// about 9 for each one alone.
inline __m128 hsum4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  // halves of each vector added: s01 = [v0.q0+v0.q2, v0.q1+v0.q3, v1.q0+v1.q2, v1.q1+v1.q3] (q: 128-bit lanes)
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, 0x44), _mm512_shuffle_f32x4(v0, v1, 0xEE));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(v2, v3, 0x44), _mm512_shuffle_f32x4(v2, v3, 0xEE));
  // lane k: four partial sums of v_k
  __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));  // within lanes: (e0+e2, e1+e3, ...)
  t = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));  // element 0 of lane k: sum(v_k)
  return _mm512_castps512_ps128(_mm512_maskz_compress_ps(0x1111, t));
}

// bf16 -> fp32 is a 16-bit left shift of the bit pattern.
inline __m512 load_bf16(const at::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __m512 load_bf16_masked(const at::BFloat16* p, __mmask16 m) {
  __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __m512 load_w(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_w(const at::BFloat16* p) { return load_bf16(p); }
inline __m512 load_w_masked(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_w_masked(const at::BFloat16* p, __mmask16 m) { return load_bf16_masked(p, m); }

// fp32 x against fp32 or bf16 (widened) weights. Four rows at a time share each load of x;
// the K tail is handled with masked loads.
template <typename T>
inline void gemv_rows(const T* w, const float* x, float* y, int64_t row0, int64_t row1, int64_t K) {
  const int64_t K16 = K & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - K16)) - 1);
  int64_t r = row0;
  for (; r + 4 <= row1; r += 4) {
    const T* w0 = w + r * K;
    const T* w1 = w0 + K;
    const T* w2 = w1 + K;
    const T* w3 = w2 + K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K16; k += 16) {
      __m512 xv = _mm512_loadu_ps(x + k);
      a0 = _mm512_fmadd_ps(load_w(w0 + k), xv, a0);
      a1 = _mm512_fmadd_ps(load_w(w1 + k), xv, a1);
      a2 = _mm512_fmadd_ps(load_w(w2 + k), xv, a2);
      a3 = _mm512_fmadd_ps(load_w(w3 + k), xv, a3);
    }
    if (tail) {
      __m512 xv = _mm512_maskz_loadu_ps(tail, x + K16);
      a0 = _mm512_fmadd_ps(load_w_masked(w0 + K16, tail), xv, a0);
      a1 = _mm512_fmadd_ps(load_w_masked(w1 + K16, tail), xv, a1);
      a2 = _mm512_fmadd_ps(load_w_masked(w2 + K16, tail), xv, a2);
      a3 = _mm512_fmadd_ps(load_w_masked(w3 + K16, tail), xv, a3);
    }
    _mm_storeu_ps(y + r, hsum4(a0, a1, a2, a3));
  }
  for (; r < row1; ++r) {
    const T* w0 = w + r * K;
    __m512 a0 = _mm512_setzero_ps();
    for (int64_t k = 0; k < K16; k += 16) a0 = _mm512_fmadd_ps(load_w(w0 + k), _mm512_loadu_ps(x + k), a0);
    if (tail) a0 = _mm512_fmadd_ps(load_w_masked(w0 + K16, tail), _mm512_maskz_loadu_ps(tail, x + K16), a0);
    y[r] = hsum(a0);
  }
}

// How a GEMV walks its rows where memory is the limit: one row after another (one stream, the
// rows a fixed distance ahead prefetched) or a few rows side by side (their streams interleaved,
// each load of x shared). On the AMD EPYC (Zen 5) of bench/results/row_walk.json one row at a
// time decodes bf16, int8, Q8_0, int4 and NF4 weights faster (Q4_0 keeps 2 rows; Q8_0 and the
// other ggml formats now walk one row at a time everywhere, ggml_rows.h's two blocks per
// instruction); on the Intel Xeon of the earlier runs the interleaved rows measured faster, so
// other CPUs keep them. Set once at load;
// `set_one_row_streams` changes it between calls (bench/bench_row_walk.py, and the tests, which
// check both walks on every CPU).
inline std::atomic<bool> g_one_row_streams{__builtin_cpu_is("amd")};
constexpr int64_t ONE_ROW_PREFETCH = 8;  // rows ahead, as PREFETCH_ROWS for the quantized rows

// bf16 weights times a bf16 vector with AVX512-BF16's dot-product instruction: 32 weights
// per instruction, pairs multiplied exactly and summed into fp32 lanes. No widening of the
// weights, so the loop is limited by memory rather than by conversion work. Each row is one
// accumulator chain in column order whichever way the rows are walked (g_one_row_streams), so
// both give the same bits.
__attribute__((target("avx512f,avx512bw,avx512bf16")))
inline void gemv_rows_dpbf16(const at::BFloat16* w, const at::BFloat16* x, float* y, int64_t row0, int64_t row1,
                      int64_t K) {
  const int64_t K32 = K & ~int64_t(31);
  const __mmask32 tail = static_cast<__mmask32>((K - K32) == 0 ? 0 : ((1ull << (K - K32)) - 1));
  auto load = [](const at::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); };
  auto load_tail = [tail](const at::BFloat16* p) { return (__m512bh)_mm512_maskz_loadu_epi16(tail, p); };
  int64_t r = row0;
  if (g_one_row_streams.load(std::memory_order_relaxed)) {
    for (; r < row1; ++r) {
      const at::BFloat16* w0 = w + r * K;
      const bool ahead = r + ONE_ROW_PREFETCH < row1;
      __m512 a0 = _mm512_setzero_ps();
      for (int64_t k = 0; k < K32; k += 32) {  // 32 bf16 values: one cache line per step
        if (ahead) _mm_prefetch(reinterpret_cast<const char*>(w0 + ONE_ROW_PREFETCH * K + k), _MM_HINT_T0);
        a0 = _mm512_dpbf16_ps(a0, load(w0 + k), load(x + k));
      }
      if (tail) a0 = _mm512_dpbf16_ps(a0, load_tail(w0 + K32), load_tail(x + K32));
      y[r] = hsum(a0);
    }
    return;
  }
  for (; r + 4 <= row1; r += 4) {
    const at::BFloat16* w0 = w + r * K;
    const at::BFloat16* w1 = w0 + K;
    const at::BFloat16* w2 = w1 + K;
    const at::BFloat16* w3 = w2 + K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K32; k += 32) {
      // bf16 rows are short (a few cache lines): fetch the next four rows' same columns now,
      // or the hardware prefetcher lags and the loop runs at ~2/3 of the memory bandwidth.
      if (r + 8 <= row1) {
        _mm_prefetch(reinterpret_cast<const char*>(w0 + 4 * K + k), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w0 + 5 * K + k), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w0 + 6 * K + k), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w0 + 7 * K + k), _MM_HINT_T0);
      }
      __m512bh xv = load(x + k);
      a0 = _mm512_dpbf16_ps(a0, load(w0 + k), xv);
      a1 = _mm512_dpbf16_ps(a1, load(w1 + k), xv);
      a2 = _mm512_dpbf16_ps(a2, load(w2 + k), xv);
      a3 = _mm512_dpbf16_ps(a3, load(w3 + k), xv);
    }
    if (tail) {
      __m512bh xv = load_tail(x + K32);
      a0 = _mm512_dpbf16_ps(a0, load_tail(w0 + K32), xv);
      a1 = _mm512_dpbf16_ps(a1, load_tail(w1 + K32), xv);
      a2 = _mm512_dpbf16_ps(a2, load_tail(w2 + K32), xv);
      a3 = _mm512_dpbf16_ps(a3, load_tail(w3 + K32), xv);
    }
    y[r] = hsum(a0); y[r + 1] = hsum(a1); y[r + 2] = hsum(a2); y[r + 3] = hsum(a3);
  }
  for (; r < row1; ++r) {
    const at::BFloat16* w0 = w + r * K;
    __m512 a0 = _mm512_setzero_ps();
    for (int64_t k = 0; k < K32; k += 32) a0 = _mm512_dpbf16_ps(a0, load(w0 + k), load(x + k));
    if (tail) a0 = _mm512_dpbf16_ps(a0, load_tail(w0 + K32), load_tail(x + K32));
    y[r] = hsum(a0);
  }
}

// A tile of the batched product: Y[c, r] = dot(W[r, :], X[c, :]) for R weight rows and C rows
// of X (C, K), fp32 accumulation. Each weight load feeds C FMAs and each X load R, so the
// loop runs on the FMA units rather than on loads; R x C accumulators stay in registers.
// `next`, when given, is the next R weight rows: fetched into cache while this tile computes,
// so memory keeps streaming during the passes that reuse rows already in L1.
template <typename T, int R, int C>
inline void gemm_tile(const T* w, const float* x, float* y, int64_t ldy, int64_t K, const T* next = nullptr) {
  const int64_t K16 = K & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - K16)) - 1);
  __m512 acc[R][C];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) acc[i][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K16; k += 16) {
    if (next && (k * sizeof(T)) % 64 == 0) {
      for (int i = 0; i < R; ++i) _mm_prefetch(reinterpret_cast<const char*>(next + i * K + k), _MM_HINT_T0);
    }
    __m512 xv[C];
    for (int c = 0; c < C; ++c) xv[c] = _mm512_loadu_ps(x + c * K + k);
    for (int i = 0; i < R; ++i) {
      const __m512 wv = load_w(w + i * K + k);
      for (int c = 0; c < C; ++c) acc[i][c] = _mm512_fmadd_ps(wv, xv[c], acc[i][c]);
    }
  }
  if (tail) {
    __m512 xv[C];
    for (int c = 0; c < C; ++c) xv[c] = _mm512_maskz_loadu_ps(tail, x + c * K + K16);
    for (int i = 0; i < R; ++i) {
      const __m512 wv = load_w_masked(w + i * K + K16, tail);
      for (int c = 0; c < C; ++c) acc[i][c] = _mm512_fmadd_ps(wv, xv[c], acc[i][c]);
    }
  }
  if constexpr (R == 4) {
    for (int c = 0; c < C; ++c) _mm_storeu_ps(y + c * ldy, hsum4(acc[0][c], acc[1][c], acc[2][c], acc[3][c]));
  } else {
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < C; ++c) y[c * ldy + i] = hsum(acc[i][c]);
  }
}

// Y (B, N) = X (B, K) W^T for weight rows [row0, row1) of a contiguous (N, K) matrix: the
// batched decoding step's linear layers, each weight row read from memory once for all B
// rows of X (which stay in L1), in tiles of 4 weight rows x 4 rows of X.
template <typename T>
inline void gemm_rows(const T* w, const float* x, int64_t B, float* y, int64_t N, int64_t row0, int64_t row1,
                      int64_t K) {
  int64_t r = row0;
  for (; r + 4 <= row1; r += 4) {
    const T* next = r + 8 <= row1 ? w + (r + 4) * K : nullptr;  // prefetched by the last tile
    int64_t b = 0;
    for (; b + 4 <= B; b += 4) {
      gemm_tile<T, 4, 4>(w + r * K, x + b * K, y + b * N + r, N, K, b + 4 >= B ? next : nullptr);
    }
    for (; b < B; ++b) gemm_tile<T, 4, 1>(w + r * K, x + b * K, y + b * N + r, N, K, b + 1 == B ? next : nullptr);
  }
  for (; r < row1; ++r) {
    int64_t b = 0;
    for (; b + 4 <= B; b += 4) gemm_tile<T, 1, 4>(w + r * K, x + b * K, y + b * N + r, N, K);
    for (; b < B; ++b) gemm_tile<T, 1, 1>(w + r * K, x + b * K, y + b * N + r, N, K);
  }
}

// The batched product's tile with AVX512-BF16 dot products: X is bf16 (C, K) as well (a bf16
// model's activations are bf16 values), and one VDPBF16PS multiplies 32 weights of a row by 32
// values of a row of X, pairs exact and summed into 16 fp32 lanes: half the instructions of
// widening the weights and FMAs, and no conversion work.
template <int R, int C>
__attribute__((target("avx512f,avx512bw,avx512bf16")))
inline void gemm_tile_dpbf16(const at::BFloat16* w, const at::BFloat16* x, float* y, int64_t ldy, int64_t K,
                             const at::BFloat16* next = nullptr) {
  const int64_t K32 = K & ~int64_t(31);
  const __mmask32 tail = static_cast<__mmask32>((K - K32) == 0 ? 0 : ((1ull << (K - K32)) - 1));
  __m512 acc[R][C];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < C; ++c) acc[i][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K32; k += 32) {
    if (next) {  // 32 bf16 values: one cache line of each next row per step
      for (int i = 0; i < R; ++i) _mm_prefetch(reinterpret_cast<const char*>(next + i * K + k), _MM_HINT_T0);
    }
    __m512bh xv[C];
    for (int c = 0; c < C; ++c) xv[c] = (__m512bh)_mm512_loadu_si512(x + c * K + k);
    for (int i = 0; i < R; ++i) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + i * K + k);
      for (int c = 0; c < C; ++c) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], wv, xv[c]);
    }
  }
  if (tail) {
    __m512bh xv[C];
    for (int c = 0; c < C; ++c) xv[c] = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + c * K + K32);
    for (int i = 0; i < R; ++i) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, w + i * K + K32);
      for (int c = 0; c < C; ++c) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], wv, xv[c]);
    }
  }
  if constexpr (R == 4) {
    for (int c = 0; c < C; ++c) _mm_storeu_ps(y + c * ldy, hsum4(acc[0][c], acc[1][c], acc[2][c], acc[3][c]));
  } else {
    for (int i = 0; i < R; ++i)
      for (int c = 0; c < C; ++c) y[c * ldy + i] = hsum(acc[i][c]);
  }
}

// gemm_rows for bf16 weights and bf16 rows of X on AVX512-BF16 (gemm_tile_dpbf16): the same
// tiles of 4 weight rows x 4 rows of X.
__attribute__((target("avx512f,avx512bw,avx512bf16")))
inline void gemm_rows_dpbf16(const at::BFloat16* w, const at::BFloat16* x, int64_t B, float* y, int64_t N,
                             int64_t row0, int64_t row1, int64_t K) {
  int64_t r = row0;
  for (; r + 4 <= row1; r += 4) {
    const at::BFloat16* next = r + 8 <= row1 ? w + (r + 4) * K : nullptr;  // prefetched by the last tile
    int64_t b = 0;
    for (; b + 4 <= B; b += 4)
      gemm_tile_dpbf16<4, 4>(w + r * K, x + b * K, y + b * N + r, N, K, b + 4 >= B ? next : nullptr);
    for (; b < B; ++b) gemm_tile_dpbf16<4, 1>(w + r * K, x + b * K, y + b * N + r, N, K, b + 1 == B ? next : nullptr);
  }
  for (; r < row1; ++r) {
    int64_t b = 0;
    for (; b + 4 <= B; b += 4) gemm_tile_dpbf16<1, 4>(w + r * K, x + b * K, y + b * N + r, N, K);
    for (; b < B; ++b) gemm_tile_dpbf16<1, 1>(w + r * K, x + b * K, y + b * N + r, N, K);
  }
}

inline const bool kHasAvx512Bf16 = __builtin_cpu_supports("avx512bf16");

// Rows per parallel task: a multiple of 4, large enough that thread start-up is amortised.
inline int64_t gemv_grain(int64_t N) {
  return std::max<int64_t>(64, ((N / (4 * at::get_num_threads())) + 3) & ~int64_t(3));
}

}  // namespace emergence
