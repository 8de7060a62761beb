// The BLAS that torch ships, for the batched decoding step's fp32 products and the 4-bit
// formats' bf16 prompt products.
//
// libtorch_cpu exports the Fortran BLAS entry point sgemm_ (MKL's on x86 builds). Its packed,
// register-blocked kernel outruns gemm_rows (gemv_rows.h: dot products along K, 4 weight rows
// x 4 rows of X, a horizontal sum per output) once there are enough rows to pay for packing the
// weights on every call (decode.cpp's g_blas_rows; bench/bench_batched.py measures both). It is
// looked up at run time, so a torch without it leaves gemm_rows in charge instead of failing to
// load. Called on each thread's own slice of weight rows (team.h's parallel_rows): inside an
// OpenMP region MKL runs on the calling thread, so the slices never nest a second team.
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ATen.h>
#include <dlfcn.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

namespace emergence {

using SgemmFn = void (*)(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                         const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                         const float* beta, float* c, const int* ldc);

inline const SgemmFn kSgemm = reinterpret_cast<SgemmFn>(dlsym(RTLD_DEFAULT, "sgemm_"));

// oneDNN's fp32 product, through the operator torch's own CPU compiler calls for linear layers
// (mkldnn::_linear_pointwise; oneDNN is built into libtorch_cpu but exports no symbols). On the
// AMD EPYC (Zen 5) of bench/results/onednn.json oneDNN multiplies a prompt's and a training
// step's products 1.7-2.6x as fast as MKL's sgemm. Used on AMD CPUs;
// `set_onednn_products` switches it (the tests check both sides everywhere). Null where torch
// was built without oneDNN.
inline const c10::OperatorHandle* onednn_linear() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op ? &*op : nullptr;
}
inline std::atomic<bool> g_onednn_products{__builtin_cpu_is("amd")};
inline bool onednn_products() { return g_onednn_products.load(std::memory_order_relaxed) && onednn_linear() != nullptr; }

// Y[:, :rows] (B rows, ldy apart) = X (B, K) W^T on oneDNN, on the calling thread (inside an
// OpenMP region oneDNN does not start a second team). False if the operator failed (nothing
// may throw inside a team): the caller multiplies another way.
// T: float, or uint16_t for bf16 operands (fp32 sums; oneDNN rounds the result to bf16, here
// widened back to fp32).
template <typename T>
inline bool onednn_block(const T* w, int64_t rows, const T* x, int64_t B, float* y, int64_t ldy, int64_t K) {
  constexpr bool bf16 = std::is_same_v<T, uint16_t>;
  const auto dtype = bf16 ? at::kBFloat16 : at::kFloat;
  try {
    const at::Tensor X = at::from_blob(const_cast<T*>(x), {B, K}, dtype);
    const at::Tensor W = at::from_blob(const_cast<T*>(w), {rows, K}, dtype);
    std::vector<c10::IValue> stack{X, W, c10::IValue(), std::string("none"), c10::List<std::optional<at::Scalar>>(),
                                   c10::IValue()};
    onednn_linear()->callBoxed(&stack);
    const at::Tensor Y = stack.at(0).toTensor().to(at::kFloat).contiguous();  // (B, rows)
    const float* out = Y.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) std::memcpy(y + b * ldy, out + b * rows, rows * sizeof(float));
    return true;
  } catch (...) {
    return false;
  }
}

// Y[:, :rows] (B rows, ldy apart) = X (B, K) W^T for `rows` contiguous fp32 weight rows W
// (rows, K): oneDNN where onednn_products(), else the BLAS. In BLAS's column-major terms: Y^T's
// first rows (ldc ldy) = W (transposed, lda K) times X^T (ldb K).
inline void sgemm_block(const float* w, int64_t rows, const float* x, int64_t B, float* y, int64_t ldy, int64_t K) {
  if (onednn_products() && onednn_block(w, rows, x, B, y, ldy, K)) return;
  const int m = static_cast<int>(rows), n = static_cast<int>(B), k = static_cast<int>(K);
  const int lda = k, ldb = k, ldc = static_cast<int>(ldy);
  const float one = 1.0f, zero = 0.0f;
  kSgemm("T", "N", &m, &n, &k, &one, w, &lda, x, &ldb, &zero, y, &ldc);
}

// MKL's bf16 product with fp32 sums and result (cblas_gemm_bf16bf16f32, also exported by
// libtorch_cpu on x86), looked up the same way: AMX tiles or AVX512-BF16 dot products multiply
// where the CPU has them. Null where torch lacks it (the callers then stay in fp32).
using GemmBf16Fn = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                            int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc);

inline const GemmBf16Fn kGemmBf16 = reinterpret_cast<GemmBf16Fn>(dlsym(RTLD_DEFAULT, "cblas_gemm_bf16bf16f32"));

// Y[:, :rows] (B rows, ldy apart) = X (B, K) W^T for bf16 X and `rows` contiguous bf16 weight
// rows W (rows, K), the products summed in fp32. Row-major CBLAS: C (B, rows) = X W^T.
// Where onednn_products(), oneDNN's bf16 product instead (bench/bench_onednn.py measures it), its
// result rounded to bf16: each y within 2^-8 of itself of MKL's.
inline void bf16gemm_block(const uint16_t* w, int64_t rows, const uint16_t* x, int64_t B, float* y, int64_t ldy,
                           int64_t K) {
  if (onednn_products() && onednn_block(w, rows, x, B, y, ldy, K)) return;
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CBLAS's enum values
  kGemmBf16(kRowMajor, kNoTrans, kTrans, static_cast<int>(B), static_cast<int>(rows), static_cast<int>(K), 1.0f, x,
            static_cast<int>(K), w, static_cast<int>(K), 0.0f, y, static_cast<int>(ldy));
}

// Y (B, N)[:, row0:row1] = X (B, K) W[row0:row1]^T for a contiguous fp32 W (N, K). In BLAS's
// column-major terms: Y^T's rows row0..row1 (ldc N) = W's rows (transposed, lda K) times X^T
// (ldb K).
inline void sgemm_rows(const float* w, const float* x, int64_t B, float* y, int64_t N, int64_t row0, int64_t row1,
                       int64_t K) {
  sgemm_block(w + row0 * K, row1 - row0, x, B, y + row0, N, K);
}

}  // namespace emergence
