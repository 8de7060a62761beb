// Matrix-vector products for batch-1 decoding on x86-64 CPUs.
//
// Decoding one token multiplies a single activation vector by every weight matrix, so
// its speed is set by how fast the weights stream from memory. oneDNN's bf16 GEMV reaches
// under half the memory bandwidth on the machines we measured; these kernels read each
// weight row once, in order, with wide loads and fp32 accumulation, split across threads
// by rows (AVX512-BF16 dot products for bf16 weights where the CPU has them). Semantics match torch.nn.functional.linear: y = x @ W.T (+ bias),
// accumulated in fp32, rounded once to the output dtype.
#include "gemv_rows.h"
#include "quant_rows.h"

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

// x: (B, K) fp32, or bf16 with bf16 weights; weight: (N, K) contiguous bf16 or fp32. Returns
// x W^T, (B, N) fp32: the batched decoding step's product (gemm_rows; bf16 x: gemm_rows_dpbf16
// where the CPU has AVX512-BF16), exposed for tests and benchmarks.
torch::Tensor gemm(torch::Tensor x, torch::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous matrix");
  const bool dot_bf16 = x.scalar_type() == torch::kBFloat16 && weight.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == weight.size(1) && (x.scalar_type() == torch::kFloat32 || dot_bf16),
              "x must be fp32 (B, K), or bf16 with bf16 weights, with K = weight.size(1)");
  TORCH_CHECK(!dot_bf16 || kHasAvx512Bf16, "bf16 x needs AVX512-BF16");
  const int64_t B = x.size(0), N = weight.size(0), K = weight.size(1);
  auto xc = x.contiguous();
  auto y = torch::empty({B, N}, xc.options().dtype(torch::kFloat32));
  float* yp = y.data_ptr<float>();
  if (dot_bf16) {
    const at::BFloat16* xp = xc.data_ptr<at::BFloat16>();
    const at::BFloat16* wp = weight.data_ptr<at::BFloat16>();
    at::parallel_for(0, N, gemv_grain(N), [&](int64_t r0, int64_t r1) { gemm_rows_dpbf16(wp, xp, B, yp, N, r0, r1, K); });
    return y;
  }
  const float* xp = xc.data_ptr<float>();
  if (weight.scalar_type() == torch::kBFloat16) {
    const at::BFloat16* wp = weight.data_ptr<at::BFloat16>();
    at::parallel_for(0, N, gemv_grain(N), [&](int64_t r0, int64_t r1) { gemm_rows(wp, xp, B, yp, N, r0, r1, K); });
  } else {
    TORCH_CHECK(weight.scalar_type() == torch::kFloat32, "weight must be bf16 or fp32");
    const float* wp = weight.data_ptr<float>();
    at::parallel_for(0, N, gemv_grain(N), [&](int64_t r0, int64_t r1) { gemm_rows(wp, xp, B, yp, N, r0, r1, K); });
  }
  return y;
}

// y (N,) fp32 = W x (+ bias) for a packed quantized W (layouts in quant_rows.h); x (K,).
torch::Tensor qgemv(int64_t kind, torch::Tensor x, torch::Tensor data, torch::Tensor scales, torch::Tensor offsets,
                    int64_t group, double tensor_scale, int64_t N, int64_t K, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.numel() == K, "x must have K elements");
  const QuantMatrix m = quant_matrix(kind, data, scales, offsets, group, tensor_scale, N, K);
  auto xf = x.reshape({K}).to(torch::kFloat32).contiguous();
  auto y = torch::empty({N}, xf.options());
  quant_gemv(m, xf.data_ptr<float>(), y.data_ptr<float>(), gemv_grain(N));
  if (bias.has_value() && bias->defined()) y.add_(bias->to(torch::kFloat32));
  return y;
}

// Y (M, N) fp32 = X (M, K) W^T (+ bias) for a packed W and many rows of X (a prompt): ggml's
// formats on their blocks (qgemm_ggml, with VNNI), int8 / int4 / NF4 / ternary widened a tile of
// rows at a time (qgemm_widened); bf16: the widened formats' operands rounded to bf16 and
// multiplied by MKL's bf16 product (refused where torch's BLAS lacks it; the caller asks for it
// for int4 and NF4 prompts on CPUs with AVX512-BF16).
torch::Tensor qgemm(int64_t kind, torch::Tensor x, torch::Tensor data, torch::Tensor scales, torch::Tensor offsets,
                    int64_t group, double tensor_scale, int64_t N, int64_t K, c10::optional<torch::Tensor> bias,
                    bool bf16) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be (M, K)");
  const QuantMatrix m = quant_matrix(kind, data, scales, offsets, group, tensor_scale, N, K);
  const bool ggml = ggml_block_gemm(m.kind);
  TORCH_CHECK(ggml || m.kind == WeightKind::INT8 || m.kind == WeightKind::INT4 || m.kind == WeightKind::NF4 ||
                  m.kind == WeightKind::TERNARY, "qgemm: a packed weight kind");
  TORCH_CHECK(!ggml || kHasAvx512Vnni, "qgemm on ggml blocks needs AVX512-VNNI");
  TORCH_CHECK(!bf16 || (!ggml && kGemmBf16 != nullptr), "qgemm: bf16 products are for the widened formats, "
              "with torch's BLAS providing cblas_gemm_bf16bf16f32");
  auto xf = x.to(torch::kFloat32).contiguous();
  auto y = torch::empty({x.size(0), N}, xf.options());
  if (ggml) {
    QuantizedRows scratch;
    qgemm_ggml(m, xf.data_ptr<float>(), x.size(0), y.data_ptr<float>(), scratch);
  } else if (bf16) {
    std::vector<uint16_t> xb(xf.numel());
    to_bf16(xf.data_ptr<float>(), xf.numel(), xb.data());
    qgemm_widened(m, xf.data_ptr<float>(), x.size(0), y.data_ptr<float>(), xb.data());
  } else {
    qgemm_widened(m, xf.data_ptr<float>(), x.size(0), y.data_ptr<float>());
  }
  if (bias.has_value() && bias->defined()) y.add_(bias->to(torch::kFloat32));
  return y;
}

// The packed weight as fp32 (N, K).
torch::Tensor qdequantize(int64_t kind, torch::Tensor data, torch::Tensor scales, torch::Tensor offsets, int64_t group,
                          double tensor_scale, int64_t N, int64_t K) {
  const QuantMatrix m = quant_matrix(kind, data, scales, offsets, group, tensor_scale, N, K);
  auto out = torch::empty({N, K}, torch::kFloat32);
  dequantize_rows(m, out.data_ptr<float>(), std::max<int64_t>(16, N / (4 * at::get_num_threads())));
  return out;
}

void register_decode_plan(pybind11::module& m);  // decode.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = W x (+ b) for one activation vector, fp32 accumulation");
  m.def("gemm", &gemm, "y = x W^T for a few fp32 rows x (B, K), fp32 accumulation");
  m.def("qgemv", &qgemv, "y = W x (+ b) for a packed quantized W, fp32 result");
  m.def("onednn_products", &emergence::onednn_products, "whether fp32 prompt products run on oneDNN (blas.h)");
  m.def("set_onednn_products", [](bool on) { emergence::g_onednn_products.store(on); },
        "fp32 prompt products on oneDNN (or the BLAS); only between calls, never while a kernel runs");
  m.def("one_row_streams", [] { return emergence::g_one_row_streams.load(); }, "whether GEMVs walk one row at a time");
  m.def("set_one_row_streams", [](bool on) { emergence::g_one_row_streams.store(on); },
        "walk one row at a time (or rows side by side); only between calls, never while a kernel runs");
  m.def("qgemm", &qgemm, "Y = X W^T (+ b) for a packed W: ggml's formats on their blocks, our own formats widened by tiles",
        pybind11::arg("kind"), pybind11::arg("x"), pybind11::arg("data"), pybind11::arg("scales"),
        pybind11::arg("offsets"), pybind11::arg("group"), pybind11::arg("tensor_scale"), pybind11::arg("N"),
        pybind11::arg("K"), pybind11::arg("bias"), pybind11::arg("bf16") = false);
  m.attr("has_bf16_gemm") = kGemmBf16 != nullptr;
  m.def("qdequantize", &qdequantize, "a packed quantized weight as fp32 (N, K)");
  // An empty region on the calling thread's team: its sleeping workers wake now, not at the
  // next step (see kernels.wake_thread_team).
  m.def("wake_team", [] { emergence::team([] {}); }, "run an empty parallel region on this thread's team",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  register_decode_plan(m);
}
