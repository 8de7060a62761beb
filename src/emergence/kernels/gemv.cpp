// Matrix-vector products for batch-1 decoding on x86-64 CPUs.
//
// Decoding one token multiplies a single activation vector by every weight matrix, so
// its speed is set by how fast the weights stream from memory. oneDNN's bf16 GEMV reaches
// under half the memory bandwidth on the machines we measured; these kernels read each
// weight row once, in order, with wide loads and fp32 accumulation, split across threads
// by rows (AVX512-BF16 dot products for bf16 weights where the CPU has them). Semantics match torch.nn.functional.linear: y = x @ W.T (+ bias),
// accumulated in fp32, rounded once to the output dtype.
#include "gemv_rows.h"

using namespace emergence;

// x: (K,) any float dtype; weight: (N, K) contiguous bf16 or fp32; bias: (N,) or empty.
// Returns (N,) in weight's dtype.
torch::Tensor gemv(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous matrix");
  TORCH_CHECK(x.numel() == weight.size(1), "x must have weight.size(1) elements");
  const int64_t N = weight.size(0), K = weight.size(1);
  auto y = torch::empty({N}, x.options().dtype(torch::kFloat32));
  float* yp = y.data_ptr<float>();
  const int64_t grain = gemv_grain(N);
  if (weight.scalar_type() == torch::kBFloat16 && kHasAvx512Bf16 && x.scalar_type() == torch::kBFloat16) {
    // The activations are already bf16 (a bf16 model): dot products straight on bf16 pairs.
    auto xb = x.reshape({K}).contiguous();
    const at::BFloat16* xbp = xb.data_ptr<at::BFloat16>();
    const at::BFloat16* wp = weight.data_ptr<at::BFloat16>();
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) { gemv_rows_dpbf16(wp, xbp, yp, r0, r1, K); });
  } else if (weight.scalar_type() == torch::kBFloat16) {
    auto xf = x.reshape({K}).to(torch::kFloat32).contiguous();
    const float* xp = xf.data_ptr<float>();
    const at::BFloat16* wp = weight.data_ptr<at::BFloat16>();
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) { gemv_rows(wp, xp, yp, r0, r1, K); });
  } else {
    TORCH_CHECK(weight.scalar_type() == torch::kFloat32, "weight must be bf16 or fp32");
    auto xf = x.reshape({K}).to(torch::kFloat32).contiguous();
    const float* xp = xf.data_ptr<float>();
    const float* wp = weight.data_ptr<float>();
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) { gemv_rows(wp, xp, yp, r0, r1, K); });
  }
  if (bias.has_value() && bias->defined()) y.add_(bias->to(torch::kFloat32));
  return y.to(weight.scalar_type());
}

void register_decode_plan(pybind11::module& m);  // decode.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = W x (+ b) for one activation vector, fp32 accumulation");
  register_decode_plan(m);
}
