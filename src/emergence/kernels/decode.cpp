// Whole decoding steps, from the new token ids to the next-token logits, in one native call.
//
// In eager PyTorch a 30-layer model issues ~450 small operators per token, each paying
// dispatch and thread start-up: on a 2-core CPU that costs as much time as streaming the
// weights. A DecodePlan holds the model's weights once and runs every layer here.
//
// One call runs R token rows through every layer. Each row belongs to a sequence of the paged
// KV cache (kv_cache.py): row r extends sequence rows[r], sits at position positions[r] (also
// its slot in the sequence), writes its key and value into the block tables[rows[r]][pos / bs]
// at offset pos % bs, and attends causally to that sequence's slots [0, pos] (the last
// `window` of them with a sliding window). Every row's key and value are stored before any
// row attends, so the rows of one prompt see their predecessors.
// One thread team runs the whole call (team.h): every matrix product, the attention, the
// activation and the row-by-row work between them (norms, RoPE, KV stores, residuals) split
// their rows across the team and end at a barrier; a mixture of experts' gathers and sums run
// on the first thread. No fork or join per product.
// - One row (batch-1 decoding): the matrix-vector products are split across threads by rows
//   (gemv_rows.h, quant_rows.h).
// - Several rows (a decode batch's step, or prompts prefilled together): each linear layer is
//   one matrix product over the rows (gemm_rows: register tiles of 4 weight rows x 4 rows; fp32
//   from g_blas_rows rows on, torch's BLAS, blas.h), so the weights are read once per call
//   instead of once per row. Only the rows named in out_rows (each sequence's last token) go
//   through the final norm and the output head.
// Packed ggml weights (Q8_0, Q4_0, Q4_1, Q5_x, K-quants) multiply 3 rows or more on their
// blocks (qgemm_ggml); a prompt's 16 rows or more through int4 / NF4 weights take the eager
// forward's products where the caller asks (forward's prompt_products: the weight widened a tile
// at a time, qgemm_widened); the other packed formats, and every decoding step, keep their GEMV,
// row after row. A fused matrix stacked from parts of different formats (a GGUF's q/k/v in Q4_K
// and Q6_K) runs each part's GEMV into its rows, for prompts too.
// Norms, RoPE, attention over the KV cache, activations and residuals run in plain loops (the
// softmax and SiLU on a 16-lane exp, exp16).
//
// The block follows the model's family switches (config.py): norms before each sublayer, after
// it or both; attention and MLP in sequence or in parallel (one norm or two); q/k norms per
// head or over all heads; RoPE on all or the first rotary_dim dimensions of a head, from the
// global or the local table, or none (per layer); a window per layer; scaled and soft-capped
// attention scores; SwiGLU, GeGLU, ReLU^2-gated, tanh or erf GELU MLPs; RMS sub-norms before the
// attention's and the MLP's output projections (BitNet); embeddings scaled by sqrt(D); a head
// bias and soft-capped logits. A mixture-of-experts layer routes each row to its top-k experts, groups
// the rows by expert and reads only the chosen experts' weights, once per call (plus a shared
// expert's, Qwen2-MoE).
//
// Numerics follow the model's eager forward pass (model.py): an fp32 model computes in fp32;
// a bf16 model keeps its activations in bf16, rounding after the same operations eager bf16
// does (each linear, norm, rotation, activation and residual add), with fp32 accumulation.
//
// Shapes: B rows, D n_embd, H query heads, KV key/value heads, hd head_dim, F intermediate
// size, V vocabulary. KV pools: (n_layer, num_blocks, KV, block_size, hd), contiguous.
#include "blas.h"
#include "gemv_rows.h"
#include "quant_rows.h"
#include "team.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <vector>

namespace {

// Scratch memory on 64-byte (cache-line, AVX-512 register) boundaries: the row kernels load
// activations with unaligned loads, and a row that straddles cache lines costs a second line
// on every load (measured: a 16-row step of emergence-6m 12% slower with malloc's alignment).
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    const std::size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes > 0 ? bytes : 64);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) { std::free(p); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <typename T>
using Buffer = std::vector<T, CacheLineAllocator<T>>;

// Rows from which an fp32 product goes to torch's BLAS (blas.h) rather than gemm_rows. Below,
// its packing of the weights on every call costs more than its faster kernel saves;
// bench/bench_batched.py times both sides of it in one run (set_blas_rows switches it).
std::atomic<int64_t> g_blas_rows{64};

// e^x in 16 lanes: 2^n e^r with n = round(x log2 e) and r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2]
// (ln 2 split in two parts so r is exact), e^r by Cephes' degree-6 polynomial for expf (about
// 1 ulp), 2^n applied by VSCALEFPS (underflowing to 0 below e^-103). The softmax and SiLU loops
// run on it instead of one libm expf call per value.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-103.972077f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

// p[0:S] = softmax numerators exp(p - max p), in place; returns their sum.
inline float exp_minus_max(float* p, int64_t S) {
  const int64_t S16 = S & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (S - S16)) - 1);
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < S16; j += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(p + j));
  if (tail) top = _mm512_mask_max_ps(top, tail, top, _mm512_maskz_loadu_ps(tail, p + S16));
  const __m512 t = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < S16; j += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p + j), t));
    _mm512_storeu_ps(p + j, e);
    total = _mm512_add_ps(total, e);
  }
  if (tail) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, p + S16), t));
    _mm512_mask_storeu_ps(p + S16, tail, e);
    total = _mm512_mask_add_ps(total, tail, total, e);
  }
  return _mm512_reduce_add_ps(total);
}

using emergence::gemv_grain;
using emergence::gemv_rows;
using emergence::gemv_rows_dpbf16;
using emergence::kHasAvx512Bf16;
using emergence::parallel_rows;
using emergence::serially;

struct Linear {
  at::Tensor weight;  // (N, K) contiguous, fp32 or bf16; empty when packed
  at::Tensor bias;    // (N,) or empty
  int64_t N = 0, K = 0;
  // A quantized weight: the packed tensors (kept alive here) and the view the kernels read.
  bool packed = false;
  at::Tensor data, scales, offsets;
  emergence::QuantMatrix q{};
  int act_bits = 0;  // 8: quantize the input vector per token to 8 bits first (BitNet b1.58)
  // A stack of packed parts instead (quant/linear.py's StackedLinear: a fused matrix whose parts
  // a GGUF file holds in different types): part i's N rows are the output rows from row0 on.
  std::vector<Linear> parts;
  int64_t row0 = 0;
};

struct Layer {
  at::Tensor attn_norm_w, attn_norm_b, mlp_norm_w, mlp_norm_b;  // (D,); biases empty for RMSNorm
  Linear qkv, o, up, down;  // up is gate_up (2F rows: gate then up) for a gated MLP
  at::Tensor attn_post_w, mlp_post_w;  // (D,) norms after the sublayers (post and sandwich norms)
  at::Tensor q_norm_w, k_norm_w;  // (hd,) per head, or (H hd,) and (KV hd,) over all heads; or empty
  at::Tensor attn_sub_w, mlp_sub_w;  // (H hd,) and (F,) RMSNorms before o and down (BitNet); or empty
  // T5's decoder: cross-attention after self-attention (its norm, q and o; the keys and values
  // come with each call, per sequence); absent (N 0) elsewhere
  at::Tensor cross_norm_w;
  Linear cross_q, cross_o;
  int64_t window = 0;  // the keys a query sees (0: all)
  int rope = 1;  // 0: no RoPE (NoPE layer), 1: the global table, 2: the local one
  // A mixture of experts in place of up/down: the router (E rows) and each expert's gate_up
  // (2Fe, D) and down (D, Fe), views into the stacked weights; a shared expert and its gate.
  Linear router, shared_up, shared_down, shared_gate;
  std::vector<Linear> expert_up, expert_down;
  int64_t expert_width = 0, shared_width = 0;
};

// The family switches as numbers (fused_decode.py writes them from the Config).
enum Mlp { SWIGLU = 0, GEGLU = 1, GELU_TANH = 2, GELU_ERF = 3, RELU2_GLU = 4, RELU = 5 };
enum Placement { PRE = 0, POST = 1, SANDWICH = 2 };
enum Parallel { SEQUENTIAL = 0, SHARED_NORM = 1, TWO_NORMS = 2 };
enum QkNorm { NO_QK_NORM = 0, PER_HEAD = 1, ALL_HEADS = 2 };

inline bool present(const at::Tensor& t) { return t.defined() && t.numel() > 0; }

// Read access to an fp32 or bf16 tensor's elements without data_ptr's checks on every read;
// false when the tensor is absent (an empty bias).
struct Vec {
  const float* f = nullptr;
  const at::BFloat16* h = nullptr;
  explicit Vec(const at::Tensor& t) {
    if (!present(t)) return;
    if (t.scalar_type() == at::kFloat) f = t.data_ptr<float>();
    else h = t.data_ptr<at::BFloat16>();
  }
  float operator[](int64_t i) const { return f ? f[i] : static_cast<float>(h[i]); }
  explicit operator bool() const { return f || h; }
};

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

class DecodePlan {
 public:
  // dims: n_layer, H, KV, hd, D, F, V, rotary_dim, expert width Fe and
  // shared expert width Fs (0: none); kinds: rms_norm, Mlp, Placement, Parallel,
  // QkNorm; scalars: eps, attention scale (0: 1/sqrt(hd)), score cap, logit cap, embedding
  // scale (0: none), head scale (0: none; T5's d_model ** -0.5 before a tied head); windows and
  // ropes: one per layer (Layer::window, Layer::rope). rel_bias: T5's self-attention bias by
  // distance, (positions, H) fp32, [d, h] added to head h's score of the key d positions before
  // the query; or empty.
  DecodePlan(std::vector<int64_t> dims, std::vector<int64_t> kinds, std::vector<double> scalars,
             std::vector<int64_t> windows, std::vector<int64_t> ropes, at::Tensor tok_embeddings,
             at::Tensor pos_embeddings, at::Tensor rope_inv_freq, at::Tensor local_inv_freq, at::Tensor norm_w,
             at::Tensor norm_b, at::Tensor lm_head, at::Tensor lm_head_bias,
             std::vector<std::vector<at::Tensor>> layers, at::Tensor rel_bias)
      : tok_(tok_embeddings), pos_(pos_embeddings), inv_freq_(rope_inv_freq), local_inv_freq_(local_inv_freq),
        norm_w_(norm_w), norm_b_(norm_b), rel_bias_(rel_bias) {
    TORCH_CHECK(dims.size() == 10, "dims: n_layer, n_head, n_kv_head, head_dim, n_embd, intermediate, vocab, "
                "rotary_dim, expert width, shared expert width");
    n_layer_ = dims[0], H_ = dims[1], KV_ = dims[2], hd_ = dims[3], D_ = dims[4], F_ = dims[5], V_ = dims[6];
    rd_ = dims[7];
    const int64_t expert_width = dims[8], shared_width = dims[9];
    moe_width_ = std::max({int64_t(1), expert_width, shared_width});
    TORCH_CHECK(kinds.size() == 8 && scalars.size() == 6, "kinds: 8 switches, scalars: 6 values");
    rms_norm_ = kinds[0] != 0, mlp_ = static_cast<int>(kinds[1]), placement_ = static_cast<int>(kinds[2]);
    parallel_ = static_cast<int>(kinds[3]), qk_norm_ = static_cast<int>(kinds[4]);
    gated_ = mlp_ == SWIGLU || mlp_ == GEGLU || mlp_ == RELU2_GLU;
    n_experts_ = kinds[5], top_k_ = kinds[6], norm_topk_ = kinds[7] != 0;
    eps_ = static_cast<float>(scalars[0]);
    scale_ = scalars[1] > 0 ? static_cast<float>(scalars[1]) : 1.0f / std::sqrt(static_cast<float>(hd_));
    score_cap_ = static_cast<float>(scalars[2]), logit_cap_ = static_cast<float>(scalars[3]);
    embed_scale_ = static_cast<float>(scalars[4]), head_scale_ = static_cast<float>(scalars[5]);
    TORCH_CHECK(!present(rel_bias_) || (rel_bias_.dim() == 2 && rel_bias_.size(1) == H_ &&
                                        rel_bias_.scalar_type() == at::kFloat && rel_bias_.is_contiguous()),
                "the relative position bias must be (positions, n_head) contiguous fp32");
    TORCH_CHECK(H_ % KV_ == 0 && rd_ % 2 == 0 && rd_ <= hd_, "bad head layout");
    TORCH_CHECK(static_cast<int64_t>(windows.size()) == n_layer_ && static_cast<int64_t>(ropes.size()) == n_layer_,
                "one window and one RoPE kind per layer");
    dtype_ = tok_.scalar_type();
    TORCH_CHECK(dtype_ == at::kFloat || dtype_ == at::kBFloat16, "weights must be fp32 or bf16");
    bf16_ = dtype_ == at::kBFloat16;
    if (embed_scale_ > 0) embed_scale_ = r(embed_scale_);  // eager multiplies by it in the model's dtype
    lm_head_ = make_linear(lm_head, lm_head_bias, V_, D_);
    embed_ = Linear{at::Tensor(), at::Tensor(), V_, D_};  // used when set_quantized packs the embedding
    TORCH_CHECK(static_cast<int64_t>(layers.size()) == n_layer_, "one weight list per layer");
    const int64_t qkv_rows = (H_ + 2 * KV_) * hd_;
    for (int64_t i = 0; i < n_layer_; ++i) {
      auto& w = layers[i];
      TORCH_CHECK(w.size() == 27, "27 tensors per layer");
      Layer l;
      l.attn_norm_w = w[0], l.attn_norm_b = w[1];
      l.qkv = make_linear(w[2], w[3], qkv_rows, D_);
      l.o = make_linear(w[4], w[5], D_, H_ * hd_);
      l.mlp_norm_w = w[6], l.mlp_norm_b = w[7];
      l.attn_sub_w = w[16], l.mlp_sub_w = w[17];
      TORCH_CHECK((!present(l.attn_sub_w) || l.attn_sub_w.numel() == H_ * hd_) &&
                      (!present(l.mlp_sub_w) || l.mlp_sub_w.numel() == F_), "sub-norm weights of unexpected shape");
      if (present(w[18])) {  // a mixture of experts: router (E, D), gate_up (E, 2Fe, D), down (E, D, Fe)
        // (the stacked weights are empty when the experts are packed: set_quantized fills them)
        TORCH_CHECK(n_experts_ > 0 && expert_width > 0 && w[18].size(0) == n_experts_, "expert weights missing");
        TORCH_CHECK(!present(w[19]) || (w[19].dim() == 3 && w[19].size(0) == n_experts_ && w[20].dim() == 3),
                    "expert weights of unexpected shape");
        l.expert_width = expert_width;
        l.router = make_linear(w[18], at::Tensor(), n_experts_, D_);
        for (int64_t e = 0; e < n_experts_; ++e) {
          l.expert_up.push_back(make_linear(present(w[19]) ? w[19][e] : w[19], at::Tensor(), 2 * expert_width, D_));
          l.expert_down.push_back(make_linear(present(w[20]) ? w[20][e] : w[20], at::Tensor(), D_, expert_width));
        }
        if (present(w[21]) || present(w[23])) {  // a shared expert (its gate_up and down may be packed)
          TORCH_CHECK(present(w[23]) && shared_width > 0, "shared expert weights missing");
          l.shared_width = shared_width;
          l.shared_up = make_linear(w[21], at::Tensor(), 2 * l.shared_width, D_);
          l.shared_down = make_linear(w[22], at::Tensor(), D_, l.shared_width);
          l.shared_gate = make_linear(w[23], at::Tensor(), 1, D_);
        }
      } else {
        l.up = make_linear(w[8], w[9], gated_ ? 2 * F_ : F_, D_);
        l.down = make_linear(w[10], w[11], D_, F_);
      }
      l.attn_post_w = w[12], l.mlp_post_w = w[13], l.q_norm_w = w[14], l.k_norm_w = w[15];
      TORCH_CHECK(qk_norm_ == NO_QK_NORM || (present(l.q_norm_w) && present(l.k_norm_w)), "q/k norm weights missing");
      TORCH_CHECK(placement_ == PRE || (present(l.attn_post_w) && present(l.mlp_post_w)), "post-norm weights missing");
      if (present(w[25])) {  // cross-attention (T5's decoder): its norm, q (H hd, D) and o (D, H hd)
        TORCH_CHECK(present(w[24]) && present(w[26]) && placement_ == PRE && parallel_ == SEQUENTIAL && !bf16_,
                    "cross-attention needs its norm and o weights, pre-norm sequential blocks and fp32 weights");
        l.cross_norm_w = w[24];
        l.cross_q = make_linear(w[25], at::Tensor(), H_ * hd_, D_);
        l.cross_o = make_linear(w[26], at::Tensor(), D_, H_ * hd_);
        cross_ = true;
      }
      l.window = windows[i], l.rope = static_cast<int>(ropes[i]);
      TORCH_CHECK(l.rope == 0 || (l.rope == 1 && present(inv_freq_)) || (l.rope == 2 && present(local_inv_freq_)),
                  "a layer's RoPE table is missing");
      layers_.push_back(std::move(l));
    }
  }

  // Replace linear `slot` of `layer` (-1: the output head; -2: the token embedding, whose rows
  // are looked up, then tok_embeddings is an empty tensor of the model's dtype) with a packed
  // quantized weight (layouts in quant_rows.h). Slots: 0 qkv, 1 o, 2 up/gate_up, 3 down; a
  // mixture of experts' 4 shared expert gate_up, 5 its down, 6 expert `expert`'s gate_up, 7 its down.
  // part >= 0: the stacked matrix's part that starts at output row `row0` and has `rows` rows
  // (the parts are set in order; the layer's bias stays the stack's).
  void set_quantized(int64_t layer, int64_t slot, int64_t expert, int64_t kind, at::Tensor data, at::Tensor scales,
                     at::Tensor offsets, int64_t group, double tensor_scale, int64_t act_bits, int64_t part,
                     int64_t row0, int64_t rows) {
    TORCH_CHECK(layer >= -2 && layer < n_layer_ && slot >= 0 && slot < 8, "no such linear layer");
    Linear* target = layer == -2 ? &embed_ : &lm_head_;
    if (layer >= 0) {
      Layer& l = layers_[layer];
      if (slot >= 6) TORCH_CHECK(expert >= 0 && expert < static_cast<int64_t>(l.expert_up.size()), "no such expert");
      if (slot >= 4) TORCH_CHECK(!l.expert_up.empty(), "not a mixture-of-experts layer");
      Linear* slots[] = {&l.qkv, &l.o, &l.up, &l.down, &l.shared_up, &l.shared_down,
                         slot == 6 ? &l.expert_up[expert] : nullptr, slot == 7 ? &l.expert_down[expert] : nullptr};
      target = slots[slot];
    }
    if (part >= 0) {
      TORCH_CHECK(part == static_cast<int64_t>(target->parts.size()) && rows > 0 && row0 >= 0 && row0 + rows <= target->N,
                  "stacked parts go in order, within the matrix's rows");
      TORCH_CHECK(row0 == (part == 0 ? 0 : target->parts.back().row0 + target->parts.back().N), "stacked parts must tile the rows");
      target->parts.push_back(Linear{at::Tensor(), at::Tensor(), rows, target->K});
      target->parts.back().row0 = row0;
      target->packed = true;
      target = &target->parts.back();
    }
    Linear& L = *target;
    L.q = emergence::quant_matrix(kind, data, scales, offsets, group, tensor_scale, L.N, L.K);
    L.data = data, L.scales = scales, L.offsets = offsets;
    L.packed = true;
    L.act_bits = static_cast<int>(act_bits);
    TORCH_CHECK(act_bits == 0 || act_bits == 8, "act_bits must be 0 or 8");
  }

  // Run tokens[r] at position positions[r] of sequence rows[r] (whose blocks are
  // tables[rows[r]]), for every row r; store their keys and values in the pools k and v;
  // return the logits (len(out_rows), V), fp32 holding values of the model's dtype, of the
  // rows out_rows. With cross-attention (T5), cross_k[s] and cross_v[s] are sequence s's
  // encoder keys and values, (n_layer, H, source length, hd) contiguous fp32; otherwise empty.
  at::Tensor forward(const std::vector<int64_t>& tokens, const std::vector<int64_t>& rows,
                     const std::vector<int64_t>& positions, const std::vector<int64_t>& out_rows,
                     const std::vector<std::vector<int64_t>>& tables, const at::Tensor& k, const at::Tensor& v,
                     const std::vector<at::Tensor>& cross_k, const std::vector<at::Tensor>& cross_v,
                     int64_t prompt_products) {
    const int64_t R = static_cast<int64_t>(tokens.size());
    TORCH_CHECK(prompt_products >= 0 && prompt_products <= 2, "prompt_products: 0, 1 (fp32) or 2 (bf16)");
    TORCH_CHECK(prompt_products != 2 || emergence::kGemmBf16 != nullptr, "bf16 prompt products need torch's bf16 GEMM");
    prompt_products_ = static_cast<int>(prompt_products);
    TORCH_CHECK(R > 0 && static_cast<int64_t>(rows.size()) == R && static_cast<int64_t>(positions.size()) == R,
                "one row and one position per token, at least one token");
    TORCH_CHECK(k.dim() == 5 && k.size(0) == n_layer_ && k.size(2) == KV_ && k.size(4) == hd_ && k.is_contiguous() &&
                    v.is_contiguous() && k.sizes() == v.sizes() && k.scalar_type() == dtype_ &&
                    v.scalar_type() == dtype_ && k.device().is_cpu() && v.device().is_cpu(),
                "KV pools must be (n_layer, num_blocks, n_kv_head, block_size, head_dim), contiguous CPU tensors in "
                "the model's dtype");
    num_blocks_ = k.size(1), block_size_ = k.size(3);
    tables_ = &tables;
    rows_.resize(R);
    for (int64_t r = 0; r < R; ++r) {
      TORCH_CHECK(rows[r] >= 0 && rows[r] < static_cast<int64_t>(tables.size()), "a row's sequence out of range");
      TORCH_CHECK(tokens[r] >= 0 && tokens[r] < (embed_.packed ? embed_.N : tok_.size(0)), "token id out of range");
      const auto& table = tables[rows[r]];
      TORCH_CHECK(positions[r] >= 0 && positions[r] / block_size_ < static_cast<int64_t>(table.size()),
                  "a position past its sequence's blocks");
      rows_[r] = Row{rows[r], positions[r]};
    }
    for (const auto& table : tables)
      for (int64_t block : table) TORCH_CHECK(block >= 0 && block < num_blocks_, "a block id out of range");
    for (int64_t o : out_rows) TORCH_CHECK(o >= 0 && o < R, "an output row out of range");
    // (checked here: nothing may throw inside the thread team)
    if (present(pos_))
      for (const Row& row : rows_) TORCH_CHECK(row.pos < pos_.size(0), "position past the learned position table");
    if (present(rel_bias_))
      for (const Row& row : rows_) TORCH_CHECK(row.pos < rel_bias_.size(0), "position past the relative bias table");
    cross_seqs_.clear();
    TORCH_CHECK(cross_k.size() == (cross_ ? tables.size() : 0) && cross_v.size() == cross_k.size(),
                cross_ ? "cross-attention keys and values for every sequence" : "cross keys and values for a model "
                "without cross-attention");
    for (size_t s = 0; s < cross_k.size(); ++s) {
      const at::Tensor &ck = cross_k[s], &cv = cross_v[s];
      TORCH_CHECK(ck.dim() == 4 && ck.size(0) == n_layer_ && ck.size(1) == H_ && ck.size(2) > 0 && ck.size(3) == hd_ &&
                      ck.sizes() == cv.sizes() && ck.scalar_type() == at::kFloat && cv.scalar_type() == at::kFloat &&
                      ck.is_contiguous() && cv.is_contiguous() && ck.device().is_cpu() && cv.device().is_cpu(),
                  "cross keys and values must be (n_layer, n_head, source length, head_dim) contiguous fp32 CPU tensors");
      cross_seqs_.push_back(CrossSeq{ck.data_ptr<float>(), cv.data_ptr<float>(), ck.size(2)});
    }
    // (once true it stays true: set_quantized only fills weights)
    weights_ready_ = weights_ready_ || weights_ready();
    TORCH_CHECK(weights_ready_, "a linear layer has no weight (a packed weight never set)");
    return run(tokens.data(), k, v, out_rows);
  }

 private:
  // One row of a call: its sequence (an index into tables_) and its position there.
  struct Row {
    int64_t seq, pos;
  };
  // One sequence's encoder keys and values (n_layer, H, S, hd) for cross-attention.
  struct CrossSeq {
    const float *k, *v;
    int64_t S;
  };

  // The call behind forward(): rows_ (one token each) through every layer. Every row's key and
  // value are stored before any row attends, so the rows of one prompt see their predecessors.
  // Returns the logits of out_rows (all rows when empty).
  at::Tensor run(const int64_t* tokens, const at::Tensor& k, const at::Tensor& v, const std::vector<int64_t>& out_rows) {
    const int64_t B = static_cast<int64_t>(rows_.size());
    const int64_t qkv_rows = (H_ + 2 * KV_) * hd_, half = rd_ / 2, hidden = gated_ ? 2 * F_ : F_;
    x_.resize(B * D_), xn_.resize(B * D_), tmp_.resize(B * D_), par_.resize(B * D_), qkv_.resize(B * qkv_rows);
    attn_.resize(B * H_ * hd_), hidden_.resize(B * hidden), act_.resize(B * F_), logits_.resize(B * V_);
    if (cross_) cq_.resize(B * H_ * hd_);
    cos_.resize(2 * B * half), sin_.resize(2 * B * half);  // the global table's, then the local one's
    if (n_experts_ > 0) {  // the largest expert batch: every row through one expert
      moe_logits_.resize(B * n_experts_), moe_x_.resize(B * D_), moe_h_.resize(B * 2 * moe_width_);
      moe_a_.resize(B * moe_width_), moe_out_.resize(B * D_), moe_gate_.resize(B);
    }
    const int64_t n_out = out_rows.empty() ? B : static_cast<int64_t>(out_rows.size());
    emergence::team([&] { step(tokens, k, v, out_rows); });
    return torch::from_blob(logits_.data(), {n_out, V_}, at::kFloat).clone();
  }

  // The body of run(), on every thread of its team.
  void step(const int64_t* tokens, const at::Tensor& k, const at::Tensor& v, const std::vector<int64_t>& out_rows) {
    const int64_t B = static_cast<int64_t>(rows_.size());
    const int64_t qkv_rows = (H_ + 2 * KV_) * hd_, half = rd_ / 2;
    each_row(B, [&](int64_t b) { embed(tokens[b], b); });
    for (int64_t l = 0; l < n_layer_; ++l) {
      const Layer& L = layers_[l];
      // attention: its input normed (pre and sandwich norms; a post-norm block reads x itself)
      const float* in = x_.data();
      if (placement_ != POST) {
        each_row(B, [&](int64_t b) { norm_row(b, L.attn_norm_w, L.attn_norm_b); });
        in = xn_.data();
      }
      linear(L.qkv, in, B, qkv_.data());
      each_row(B, [&](int64_t b) {  // (rows of one sequence write their own slots)
        float* q = qkv_.data() + b * qkv_rows;
        qk_norms(L, q);
        if (L.rope > 0) {
          const int64_t t = L.rope - 1;
          rotate(q, H_ + KV_, cos_.data() + (t * B + b) * half, sin_.data() + (t * B + b) * half);  // q and k
        }
        store_kv(k, v, l, rows_[b], q + H_ * hd_);
      });
      attention(k, v, l);
      if (present(L.attn_sub_w)) {
        each_row(B, [&](int64_t b) { sub_norm(L.attn_sub_w, attn_.data() + b * H_ * hd_, H_ * hd_); });
      }
      if (parallel_ != SEQUENTIAL) {  // x + attn(n(x)) + mlp(n'(x)): the MLP reads x, not x + attn
        linear(L.o, attn_.data(), B, par_.data());
        if (parallel_ == TWO_NORMS) each_row(B, [&](int64_t b) { norm_row(b, L.mlp_norm_w, L.mlp_norm_b); });
        mlp(L, xn_.data(), B);  // into tmp_
        each_row(B, [&](int64_t b) {
          residual(b, par_.data());
          residual(b, tmp_.data());
        });
        continue;
      }
      linear(L.o, attn_.data(), B, tmp_.data());
      in = x_.data();
      const bool cross = L.cross_q.N > 0;
      each_row(B, [&](int64_t b) {
        post_norm(L.attn_post_w, b);
        residual(b, tmp_.data());
        if (cross) norm_row(b, L.cross_norm_w, at::Tensor());
        else if (placement_ != POST) norm_row(b, L.mlp_norm_w, L.mlp_norm_b);
      });
      if (cross) {  // T5's decoder: x + cross_attn(norm(x)) between self-attention and the MLP
        linear(L.cross_q, xn_.data(), B, cq_.data());
        cross_attention(l);
        linear(L.cross_o, attn_.data(), B, tmp_.data());
        each_row(B, [&](int64_t b) {
          residual(b, tmp_.data());
          norm_row(b, L.mlp_norm_w, L.mlp_norm_b);
        });
      }
      if (placement_ != POST) in = xn_.data();
      mlp(L, in, B);
      each_row(B, [&](int64_t b) {
        post_norm(L.mlp_post_w, b);
        residual(b, tmp_.data());
      });
    }
    // the output rows' final norms, gathered so that the head is one product over them
    const int64_t n_out = out_rows.empty() ? B : static_cast<int64_t>(out_rows.size());
    parallel_rows(0, n_out, 1, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        const int64_t b = out_rows.empty() ? o : out_rows[o];
        float* out = tmp_.data() + o * D_;
        norm(x_.data() + b * D_, norm_w_, norm_b_, out, D_);
        if (head_scale_ > 0) {
          for (int64_t i = 0; i < D_; ++i) out[i] = r(out[i] * head_scale_);
        }
      }
    });
    linear(lm_head_, tmp_.data(), n_out, logits_.data());  // rounded to the model's dtype, as eager
    if (logit_cap_ > 0) {  // cap * tanh(logits / cap), each operation rounded as eager rounds it
      parallel_rows(0, n_out * V_, 4096, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) logits_[i] = r(r(std::tanh(r(logits_[i] / logit_cap_))) * logit_cap_);
      });
    }
  }

  // f(b) for the rows b in [0, B): the work between the products is row by row, so it is split
  // by rows across the team as well (one row: the first thread's, the others wait at the barrier).
  template <typename F>
  void each_row(int64_t B, const F& f) const {
    parallel_rows(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) f(b);
    });
  }

  // xn_ row b = x_ row b normed by a sublayer's norm.
  void norm_row(int64_t b, const at::Tensor& weight, const at::Tensor& bias) {
    norm(x_.data() + b * D_, weight, bias, xn_.data() + b * D_, D_);
  }

  // Every linear layer has its weight (dense, or packed by set_quantized).
  bool weights_ready() const {
    auto ready = [](const Linear& L) { return L.packed || present(L.weight) || L.N == 0; };
    bool ok = ready(lm_head_);
    for (const Layer& L : layers_) {
      if (L.expert_up.empty()) {
        ok = ok && ready(L.qkv) && ready(L.o) && ready(L.up) && ready(L.down);
        continue;
      }
      ok = ok && ready(L.qkv) && ready(L.o) && ready(L.router);
      for (size_t e = 0; e < L.expert_up.size(); ++e) ok = ok && ready(L.expert_up[e]) && ready(L.expert_down[e]);
      if (L.shared_width > 0) ok = ok && ready(L.shared_up) && ready(L.shared_down) && ready(L.shared_gate);
    }
    return ok;
  }

  // x_ row b = the embedding of `token` (scaled, plus its learned position); the row's RoPE
  // angles into cos_ / sin_.
  void embed(int64_t token, int64_t b) {
    const int64_t B = static_cast<int64_t>(rows_.size()), half = rd_ / 2;
    const Row& row = rows_[b];
    float* x = x_.data() + b * D_;
    const Vec tok(tok_), learned(pos_);
    if (embed_.packed) {  // a quantized table: the row dequantized, in the model's dtype as eager casts it
      emergence::dequantize_row(embed_.q, token, x);
      for (int64_t i = 0; i < D_; ++i) x[i] = r(x[i]);
    } else {
      for (int64_t i = 0; i < D_; ++i) x[i] = tok[token * D_ + i];
    }
    if (embed_scale_ > 0) {
      for (int64_t i = 0; i < D_; ++i) x[i] = r(x[i] * embed_scale_);
    }
    if (learned) {
      for (int64_t i = 0; i < D_; ++i) x[i] = r(x[i] + learned[row.pos * D_ + i]);
    }
    for (int t = 0; t < 2; ++t) {  // every layer's angles of this position, per table
      const at::Tensor& freq = t == 0 ? inv_freq_ : local_inv_freq_;
      if (present(freq)) rope_angles(freq, row.pos, cos_.data() + (t * B + b) * half, sin_.data() + (t * B + b) * half);
    }
  }

  // tmp_ (B, D) = the MLP of in (B, D): up (or gate and up), the activation, down.
  void mlp(const Layer& L, const float* in, int64_t B) {
    if (!L.expert_up.empty()) {
      experts(L, in, B, tmp_.data());
      return;
    }
    linear(L.up, in, B, hidden_.data());
    activate_rows(hidden_.data(), act_.data(), B, F_);
    if (present(L.mlp_sub_w)) each_row(B, [&](int64_t b) { sub_norm(L.mlp_sub_w, act_.data() + b * F_, F_); });
    linear(L.down, act_.data(), B, tmp_.data());
  }

  // a (B, n) = the MLP's activation of the rows h (B, 2n: gate then up; (B, n) ungated), element
  // by element split across the team (an exp per element: ~8 us for one row of a 1536-wide MLP
  // on one thread).
  void activate_rows(const float* h, float* a, int64_t B, int64_t n) {
    const int64_t stride = gated_ ? 2 * n : n;
    parallel_rows(0, B * n, 512, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1;) {
        const int64_t b = e / n, i0 = e % n, i1 = std::min(n, i0 + (e1 - e));
        activate(h + b * stride, a + b * n, n, i0, i1);
        e += i1 - i0;
      }
    });
  }

  // One row x (n,) RMS-normed in place by a sub-norm of weight (n,) (BitNet).
  void sub_norm(const at::Tensor& weight, float* x, int64_t n) const {
    thread_local Buffer<float> normed;  // each thread's own
    normed.resize(n);
    norm(x, weight, at::Tensor(), normed.data(), n, true);
    std::copy_n(normed.data(), n, x);
  }

  // out (B, D) = the mixture of experts of the rows x (B, D), as model.MoE computes it: for each
  // row the softmax of the router's logits in fp32 and its top k (renormalised with norm_topk);
  // then expert by expert, the rows routed to it gathered and run through its gated MLP as one
  // product (its weights read once for all of them, and only the chosen experts' at all), each
  // result times the row's weight (in the model's dtype) added in expert order, as the eager sum
  // runs; plus the shared expert times sigmoid(shared_gate(x)) over all rows. (The moe_ scratch
  // is sized by run().)
  void experts(const Layer& L, const float* x, int64_t B, float* out) {
    const int64_t E = n_experts_;
    linear(L.router, x, B, moe_logits_.data());
    // every thread of the team routes the rows alike, into its own lists, from the same logits
    std::vector<std::vector<std::pair<int64_t, float>>> routed(E);  // expert -> (row, weight)
    std::vector<std::pair<float, int64_t>> probs(E);
    for (int64_t b = 0; b < B; ++b) {
      const float* logits = moe_logits_.data() + b * E;
      float top = -INFINITY, total = 0, sum = 0;
      for (int64_t e = 0; e < E; ++e) top = std::max(top, logits[e]);
      for (int64_t e = 0; e < E; ++e) total += (probs[e].first = std::exp(logits[e] - top)), probs[e].second = e;
      for (auto& q : probs) q.first /= total;
      std::partial_sort(probs.begin(), probs.begin() + top_k_, probs.end(), [](const auto& u, const auto& v) {
        return u.first > v.first || (u.first == v.first && u.second < v.second);
      });
      for (int64_t j = 0; j < top_k_; ++j) sum += probs[j].first;
      for (int64_t j = 0; j < top_k_; ++j)
        routed[probs[j].second].emplace_back(b, r(norm_topk_ ? probs[j].first / sum : probs[j].first));
    }
    serially([&] { std::fill(out, out + B * D_, 0.0f); });
    for (int64_t e = 0; e < E; ++e) {
      const auto& rows = routed[e];
      const int64_t n = static_cast<int64_t>(rows.size());
      if (n == 0) continue;
      serially([&] {
        for (int64_t j = 0; j < n; ++j) std::copy_n(x + rows[j].first * D_, D_, moe_x_.data() + j * D_);
      });
      linear(L.expert_up[e], moe_x_.data(), n, moe_h_.data());
      activate_rows(moe_h_.data(), moe_a_.data(), n, L.expert_width);
      linear(L.expert_down[e], moe_a_.data(), n, moe_out_.data());
      serially([&] {
        for (int64_t j = 0; j < n; ++j) {
          float* o = out + rows[j].first * D_;
          const float* y = moe_out_.data() + j * D_;
          for (int64_t i = 0; i < D_; ++i) o[i] = r(o[i] + r(y[i] * rows[j].second));
        }
      });
    }
    if (L.shared_width > 0) {
      linear(L.shared_gate, x, B, moe_gate_.data());
      linear(L.shared_up, x, B, moe_h_.data());
      activate_rows(moe_h_.data(), moe_a_.data(), B, L.shared_width);
      linear(L.shared_down, moe_a_.data(), B, moe_out_.data());
      serially([&] {
        for (int64_t b = 0; b < B; ++b) {
          const float gate = r(1.0f / (1.0f + std::exp(-moe_gate_[b])));
          for (int64_t i = 0; i < D_; ++i) out[b * D_ + i] = r(out[b * D_ + i] + r(gate * moe_out_[b * D_ + i]));
        }
      });
    }
  }

  // a[i0:i1] of the MLP's activation of h (n, or 2n for a gated MLP: gate then up), rounded as
  // eager rounds it.
  void activate(const float* h, float* a, int64_t n, int64_t i0, int64_t i1) const {
    switch (mlp_) {
      case SWIGLU: {
        int64_t i = i0;
        // 16 at a time: silu(g) = g / (1 + e^-g), times up (bf16: each rounded, as the eager ops)
        for (; i + 16 <= i1; i += 16) {
          const __m512 g = _mm512_loadu_ps(h + i);
          const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
          const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
          const __m512 up = _mm512_loadu_ps(h + n + i);
          _mm512_storeu_ps(a + i, bf16_ ? emergence::round_bf16(_mm512_mul_ps(emergence::round_bf16(silu), up))
                                        : _mm512_mul_ps(silu, up));
        }
        for (; i < i1; ++i) a[i] = r(r(h[i] / (1.0f + std::exp(-h[i]))) * h[n + i]);
        break;
      }
      case GEGLU:
        for (int64_t i = i0; i < i1; ++i) a[i] = r(r(gelu_tanh(h[i])) * h[n + i]);
        break;
      case RELU2_GLU:  // relu(gate)^2 * up
        for (int64_t i = i0; i < i1; ++i) {
          const float g = h[i] > 0 ? h[i] : 0.0f;
          a[i] = r(r(g * g) * h[n + i]);
        }
        break;
      case GELU_TANH:
        for (int64_t i = i0; i < i1; ++i) a[i] = r(gelu_tanh(h[i]));
        break;
      case RELU:  // T5 v1.0
        for (int64_t i = i0; i < i1; ++i) a[i] = h[i] > 0 ? h[i] : 0.0f;
        break;
      default:
        for (int64_t i = i0; i < i1; ++i) a[i] = r(0.5f * h[i] * (1.0f + std::erf(h[i] * 0.70710678118654752f)));
    }
  }

  // tmp_ row b normed in place by a sublayer's post-norm (post and sandwich norms), if any.
  void post_norm(const at::Tensor& weight, int64_t b) {
    if (placement_ == PRE) return;
    norm(tmp_.data() + b * D_, weight, at::Tensor(), xn_.data() + b * D_, D_);
    std::copy_n(xn_.data() + b * D_, D_, tmp_.data() + b * D_);
  }

  // One row's q (H hd) and k (KV hd, following q) RMS-normed: each head (Qwen3, Gemma 3) or
  // all heads' width at once (OLMo 2).
  void qk_norms(const Layer& L, float* q) const {
    if (qk_norm_ == NO_QK_NORM) return;
    float* k = q + H_ * hd_;
    if (qk_norm_ == ALL_HEADS) {
      sub_norm(L.q_norm_w, q, H_ * hd_);
      sub_norm(L.k_norm_w, k, KV_ * hd_);
      return;
    }
    for (int64_t h = 0; h < H_ + KV_; ++h) sub_norm(h < H_ ? L.q_norm_w : L.k_norm_w, q + h * hd_, hd_);
  }

  Linear make_linear(const at::Tensor& w, const at::Tensor& b, int64_t N, int64_t K) {
    TORCH_CHECK(!present(b) || (b.numel() == N && b.scalar_type() == dtype_), "bias of unexpected shape or dtype");
    if (!present(w)) return Linear{w, b, N, K};  // a packed weight follows through set_quantized
    TORCH_CHECK(w.dim() == 2 && w.size(0) == N && w.size(1) == K && w.is_contiguous() && w.scalar_type() == dtype_,
                "weight of unexpected shape, layout or dtype");
    return Linear{w, b, N, K};
  }

  // x_ row b += t's row b, rounded to the model's dtype: the residual stream's update.
  void residual(int64_t b, const float* t) {
    float* x = x_.data() + b * D_;
    t += b * D_;
    if (bf16_) {
      for (int64_t i = 0; i < D_; ++i) x[i] = static_cast<float>(c10::BFloat16(x[i] + t[i]));
    } else {
      for (int64_t i = 0; i < D_; ++i) x[i] += t[i];
    }
  }

  // A bf16 model rounds each intermediate result to bf16, as its eager forward pass does.
  inline float r(float v) const { return bf16_ ? static_cast<float>(c10::BFloat16(v)) : v; }

  static float gelu_tanh(float v) {
    const float k = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * v * (1.0f + std::tanh(k * (v + 0.044715f * v * v * v)));
  }

  // RMSNorm (LLaMA; always for q/k norms: `rms`) or LayerNorm (GPT-2) of x (n,) into out (n,),
  // statistics in fp32.
  void norm(const float* x, const at::Tensor& weight, const at::Tensor& bias, float* out, int64_t n,
            bool rms = false) const {
    const Vec w(weight), b(bias);
    if (rms_norm_ || rms) {
      double ss = 0;
      for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
      const float inv = 1.0f / std::sqrt(static_cast<float>(ss / n) + eps_);
      for (int64_t i = 0; i < n; ++i) out[i] = r(w[i] * r(x[i] * inv));
      return;
    }
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += x[i];
    const float mean = static_cast<float>(sum / n);
    double var = 0;
    for (int64_t i = 0; i < n; ++i) var += static_cast<double>(x[i] - mean) * (x[i] - mean);
    const float inv = 1.0f / std::sqrt(static_cast<float>(var / n) + eps_);
    for (int64_t i = 0; i < n; ++i) {
      const float y = (x[i] - mean) * inv * w[i];
      out[i] = r(b ? y + b[i] : y);
    }
  }

  // y (B, N) = x (B, K) W^T (+ b); x holds values already representable in the model's dtype.
  // One row: a GEMV (the weights stream once, split across the team by output rows). Several
  // rows: gemm_rows reads each weight row once for all of them, and from g_blas_rows fp32 rows on
  // torch's BLAS does (blas.h); ggml blocks multiply them on the packed blocks (qgemm_ggml) from
  // 3 rows on (below, the GEMV row by row is as fast: qgemm unpacks each tile of 16 weight rows
  // first), a stack of ggml parts part by part; int4 and NF4 a prompt's rows from kWidenedRows on,
  // widened a tile at a time, when prompt_products_ says so; the other packed formats run their
  // GEMV row by row.
  void linear(const Linear& L, const float* x, int64_t B, float* y) {
    if (!L.parts.empty() && B >= 3 && emergence::kHasAvx512Vnni &&
        std::all_of(L.parts.begin(), L.parts.end(), [](const Linear& p) { return emergence::ggml_block_gemm(p.q.kind); })) {
      // a stack of ggml parts: each part's product on its blocks, its columns copied into y's rows
      for (const Linear& part : L.parts) {
        serially([&] { part_y_.resize(B * part.N); });
        emergence::qgemm_ggml(part.q, x, B, part_y_.data(), qrows_);
        parallel_rows(0, B, 1, [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) {
            std::copy_n(part_y_.data() + b * part.N, part.N, y + b * L.N + part.row0);
            finish(part, y + b * L.N + part.row0, 1, 0, part.N);  // (rounded as the part's own output)
          }
        });
      }
      if (present(L.bias)) parallel_rows(0, L.N, gemv_grain(L.N), [&](int64_t r0, int64_t r1) { finish(L, y, B, r0, r1); });
      return;
    }
    const bool ggml = L.parts.empty() && emergence::ggml_block_gemm(L.q.kind);
    const bool four_bit = L.q.kind == emergence::WeightKind::INT4 || L.q.kind == emergence::WeightKind::NF4;
    const bool on_blocks = ggml && B >= 3 && L.act_bits == 0 && emergence::kHasAvx512Vnni;
    const bool widened = four_bit && prompt_products_ != 0 && B >= kWidenedRows;
    if (L.packed && (on_blocks || widened)) {
      if (on_blocks) {
        emergence::qgemm_ggml(L.q, x, B, y, qrows_);
      } else if (prompt_products_ == 2) {  // x rounded to bf16 (exact for a bf16 model's values)
        emergence::qgemm_widened(L.q, x, B, y, rows_bf16(x, B, L.K));
      } else {
        emergence::qgemm_widened(L.q, x, B, y);
      }
      if (present(L.bias) || bf16_) parallel_rows(0, L.N, gemv_grain(L.N), [&](int64_t r0, int64_t r1) {
        finish(L, y, B, r0, r1);
      });
      return;
    }
    if (B == 1 || L.packed) {
      for (int64_t b = 0; b < B; ++b) linear_row(L, x + b * L.K, y + b * L.N);
      return;
    }
    const int64_t N = L.N, K = L.K;
    if (bf16_ && prompt_products_ != 0 && B >= kWidenedRows && emergence::onednn_products() &&
        emergence::kHasAvx512Bf16 && emergence::kGemmBf16 != nullptr) {
      // A bf16 model's prompt where the products run on oneDNN (AMD CPUs with AVX512-BF16):
      // oneDNN's bf16 product, the one its eager forward's F.linear calls (fp32 sums of the
      // exact products, the result rounded to bf16), on each thread's rows (MKL's where oneDNN
      // fails). x is bf16-valued, so rounding it is exact. A decoding step keeps gemm_rows: its
      // rows' results never depend on the batch.
      const uint16_t* xb = rows_bf16(x, B, K);
      const uint16_t* w = reinterpret_cast<const uint16_t*>(L.weight.data_ptr<at::BFloat16>());
      parallel_rows(0, N, gemv_grain(N), [&](int64_t r0, int64_t r1) {
        emergence::bf16gemm_block(w + r0 * K, r1 - r0, xb, B, y + r0, N, K);
        finish(L, y, B, r0, r1);
      });
      return;
    }
    // (bf16 weights are widened to fp32 in registers: gemm_rows_dpbf16's VDPBF16PS measured
    // 0.8-0.9x as fast on the Xeon of bench/results/batched.json, one port against FMA's two)
    parallel_rows(0, N, gemv_grain(N), [&](int64_t r0, int64_t r1) {
      if (bf16_) emergence::gemm_rows(L.weight.data_ptr<at::BFloat16>(), x, B, y, N, r0, r1, K);
      else if (B >= g_blas_rows.load(std::memory_order_relaxed) && emergence::kSgemm)
        emergence::sgemm_rows(L.weight.data_ptr<float>(), x, B, y, N, r0, r1, K);
      else emergence::gemm_rows(L.weight.data_ptr<float>(), x, B, y, N, r0, r1, K);
      finish(L, y, B, r0, r1);
    });
  }

  // x (B, K) rounded to bf16 into xb_ (shared by the team), for a bf16 product; returns it.
  const uint16_t* rows_bf16(const float* x, int64_t B, int64_t K) {
    serially([&] { xb_.resize(B * K); });
    parallel_rows(0, B, 16, [&](int64_t b0, int64_t b1) { emergence::to_bf16(x + b0 * K, (b1 - b0) * K, xb_.data() + b0 * K); });
    return xb_.data();
  }

  // y (B, N)[:, r0:r1] += bias, rounded to the model's dtype: nothing to do for fp32 without a
  // bias (the LLaMA families), one vectorizable pass otherwise.
  void finish(const Linear& L, float* y, int64_t B, int64_t r0, int64_t r1) const {
    const Vec bias(L.bias);
    const int64_t N = L.N;
    for (int64_t b = 0; b < B; ++b) {
      float* yb = y + b * N;
      if (bias) {
        for (int64_t i = r0; i < r1; ++i) yb[i] += bias[i];
      }
      if (bf16_) {
        for (int64_t i = r0; i < r1; ++i) yb[i] = static_cast<float>(c10::BFloat16(yb[i]));
      }
    }
  }

  // y (N,) = W x (+ b) for one row.
  void linear_row(const Linear& L, const float* x, float* y) {
    const int64_t N = L.N, K = L.K;
    const int64_t grain = gemv_grain(N);
    if (!L.parts.empty()) {  // a stack: each part its rows (rounded as the part's own output), then the bias
      for (const Linear& part : L.parts) linear_row(part, x, y + part.row0);
      if (present(L.bias)) parallel_rows(0, N, grain, [&](int64_t r0, int64_t r1) { finish(L, y, 1, r0, r1); });
      return;
    }
    if (L.packed) {
      // each thread of a team quantizes its own copy of x (as quant_gemv's own preparation does):
      // K values, cheaper than a barrier
      thread_local Buffer<float> act_q;
      if (L.act_bits == 8) {  // per-token absmax to int8 and back: x_q = RoundClip(x * 127 / max|x|, -128, 127)
        float top = 0;
        for (int64_t i = 0; i < K; ++i) top = std::max(top, std::fabs(x[i]));
        const float scale = 127.0f / std::max(top, 1e-5f);
        act_q.resize(K);
        for (int64_t i = 0; i < K; ++i) act_q[i] = std::clamp(std::nearbyint(x[i] * scale), -128.0f, 127.0f) / scale;
        x = act_q.data();
      }
      emergence::quant_gemv(L.q, x, y, grain);
      if (present(L.bias) || bf16_) parallel_rows(0, N, grain, [&](int64_t r0, int64_t r1) { finish(L, y, 1, r0, r1); });
    } else if (bf16_) {
      const at::BFloat16* w = L.weight.data_ptr<at::BFloat16>();
      if (kHasAvx512Bf16) {
        thread_local Buffer<at::BFloat16> x_bf16;  // each thread of a team its own copy: no barrier
        x_bf16.resize(K);
        for (int64_t i = 0; i < K; ++i) x_bf16[i] = c10::BFloat16(x[i]);  // exact: x is already bf16-valued
        const at::BFloat16* xb = x_bf16.data();
        parallel_rows(0, N, grain, [&](int64_t r0, int64_t r1) {
          gemv_rows_dpbf16(w, xb, y, r0, r1, K);
          finish(L, y, 1, r0, r1);
        });
      } else {
        parallel_rows(0, N, grain, [&](int64_t r0, int64_t r1) {
          gemv_rows(w, x, y, r0, r1, K);
          finish(L, y, 1, r0, r1);
        });
      }
    } else {
      const float* w = L.weight.data_ptr<float>();
      parallel_rows(0, N, grain, [&](int64_t r0, int64_t r1) {
        gemv_rows(w, x, y, r0, r1, K);
        finish(L, y, 1, r0, r1);
      });
    }
  }

  // cos and sin (rd/2,) of position `pos` for each frequency of a table, rounded like the eager bf16 path.
  void rope_angles(const at::Tensor& table, int64_t pos, float* cos_out, float* sin_out) const {
    const float* inv_freq = table.data_ptr<float>();
    for (int64_t i = 0; i < rd_ / 2; ++i) {
      const float angle = static_cast<float>(pos) * inv_freq[i];  // fp32, as rope_cos_sin computes it
      cos_out[i] = r(std::cos(angle)), sin_out[i] = r(std::sin(angle));
    }
  }

  // RoPE, "rotate half" layout: pairs (i, i + rd/2) of each of the first `heads` heads of v
  // (rd = hd, or the partial rotary dimension: the head's other dimensions pass through).
  void rotate(float* v, int64_t heads, const float* cos, const float* sin) const {
    const int64_t half = rd_ / 2;
    for (int64_t h = 0; h < heads; ++h) {
      float* x = v + h * hd_;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = r(r(x1 * cos[i]) + r(-x2 * sin[i]));
        x[i + half] = r(r(x2 * cos[i]) + r(x1 * sin[i]));
      }
    }
  }

  // Offset (in elements) of the key/value head g of `row`'s slot `slot` in layer l's pool.
  int64_t slot_offset(int64_t l, const Row& row, int64_t g, int64_t slot) const {
    const int64_t block = (*tables_)[row.seq][slot / block_size_];
    return (((l * num_blocks_ + block) * KV_ + g) * block_size_ + slot % block_size_) * hd_;
  }

  // A row's new keys k (KV * hd) and values (the next KV * hd) into its slot of layer l's pools.
  void store_kv(const at::Tensor& kc, const at::Tensor& vc, int64_t l, const Row& row, const float* k) const {
    const float* v = k + KV_ * hd_;
    for (int64_t g = 0; g < KV_; ++g) {
      const int64_t base = slot_offset(l, row, g, row.pos);
      if (bf16_) {
        at::BFloat16* kd = kc.data_ptr<at::BFloat16>() + base;
        at::BFloat16* vd = vc.data_ptr<at::BFloat16>() + base;
        for (int64_t d = 0; d < hd_; ++d) kd[d] = c10::BFloat16(k[g * hd_ + d]), vd[d] = c10::BFloat16(v[g * hd_ + d]);
      } else {
        std::copy_n(k + g * hd_, hd_, kc.data_ptr<float>() + base);
        std::copy_n(v + g * hd_, hd_, vc.data_ptr<float>() + base);
      }
    }
  }

  void attention(const at::Tensor& kc, const at::Tensor& vc, int64_t l) {
    if (bf16_) {
      attention_typed(kc.data_ptr<at::BFloat16>(), vc.data_ptr<at::BFloat16>(), l);
    } else {
      attention_typed(kc.data_ptr<float>(), vc.data_ptr<float>(), l);
    }
  }

  // Each row's query heads attend over their key/value head's slots [first, pos] of the row's
  // sequence (first = 0, or the oldest slot inside a sliding window), block by block: within a
  // block the slots are contiguous (block_size x hd). Softmax in fp32. (row, head) pairs are
  // split across threads.
  template <typename T>
  void attention_typed(const T* kc, const T* vc, int64_t l) {
    const float scale = scale_;
    const float* rel = present(rel_bias_) ? rel_bias_.data_ptr<float>() : nullptr;
    const int64_t window = layers_[l].window;
    const int64_t B = static_cast<int64_t>(rows_.size());
    const int64_t group = H_ / KV_, qkv_rows = (H_ + 2 * KV_) * hd_;
    auto first_slot = [&](const Row& row) { return window > 0 ? std::max<int64_t>(0, row.pos - window + 1) : 0; };
    // The (row, head) pairs i = b * H + h in one run per thread of about equal work: a query's
    // work grows with the keys it attends over, so in a prompt equal counts of pairs would leave
    // the thread of the early rows waiting for the thread of the late ones. Run t ends where the
    // pairs' cumulative cost (keys + 16 each) reaches t + 1 parts of the total.
    const int64_t parts = emergence::team_threads();
    thread_local std::vector<int64_t> cut_buffer;  // each thread's own copy (no allocation per call)
    std::vector<int64_t>& cut = cut_buffer;
    cut.assign(parts + 1, B * H_);
    {
      int64_t total = 0, done = 0, t = 0;
      for (const Row& row : rows_) total += (row.pos + 1 - first_slot(row) + 16) * H_;
      cut[0] = 0;
      for (int64_t i = 0; i < B * H_ && t + 1 < parts; ++i) {
        done += rows_[i / H_].pos + 1 - first_slot(rows_[i / H_]) + 16;
        while (t + 1 < parts && done * parts >= total * (t + 1)) cut[++t] = i + 1;
      }
    }
    parallel_rows(0, parts, 1, [&](int64_t t0, int64_t t1) {
      Buffer<float> p, acc(hd_);
      for (int64_t i = cut[t0]; i < cut[t1]; ++i) {
        const int64_t b = i / H_, h = i % H_, g = h / group;
        const Row& row = rows_[b];
        const int64_t first = first_slot(row);
        const int64_t S = row.pos + 1 - first;
        p.resize(S);
        const float* q = qkv_.data() + b * qkv_rows + h * hd_;
        // The slots [first, pos] block by block: block j of the row's table holds the slots
        // j * bs .. j * bs + bs - 1, contiguous (bs, hd) for this head.
        const int64_t* table = (*tables_)[row.seq].data();
        const int64_t j0 = first / block_size_, j1 = row.pos / block_size_;
        const int64_t layer_base = l * num_blocks_ * KV_;
        auto segments = [&](auto&& fn) {  // fn(offset of the segment's first slot, its index in p, its length)
          for (int64_t j = j0; j <= j1; ++j) {
            const int64_t s0 = j == j0 ? first - j * block_size_ : 0;
            const int64_t s1 = j == j1 ? row.pos - j * block_size_ + 1 : block_size_;
            fn(((layer_base + table[j] * KV_ + g) * block_size_ + s0) * hd_, j * block_size_ + s0 - first, s1 - s0);
          }
        };
        segments([&](int64_t at, int64_t index, int64_t n) {  // scores: the segment's keys times q
          emergence::gemv_rows(kc + at, q, p.data() + index, 0, n, hd_);
        });
        if (score_cap_ > 0) {  // cap * tanh(s / cap) (Gemma 2)
          for (int64_t j = 0; j < S; ++j) p[j] = std::tanh(p[j] * scale / score_cap_) * score_cap_;
        } else {
          for (int64_t j = 0; j < S; ++j) p[j] *= scale;
        }
        if (rel) {  // T5: the bias of the key's distance before the query (slot first + j)
          for (int64_t j = 0; j < S; ++j) p[j] += rel[(row.pos - first - j) * H_ + h];
        }
        const float total = exp_minus_max(p.data(), S);
        std::fill(acc.begin(), acc.end(), 0.0f);
        const float norm = 1.0f / total;
        segments([&](int64_t at, int64_t index, int64_t n) {
          weighted_values(vc + at, p.data() + index, norm, n, acc.data());
        });
        float* out = attn_.data() + (b * H_ + h) * hd_;
        for (int64_t d = 0; d < hd_; ++d) out[d] = r(acc[d]);
      }
    });
  }

  // Each row's query heads (cq_) attend over all the encoder states of the row's sequence
  // (layer l of its cross keys and values, contiguous (S, hd) per head), into attn_: T5's
  // cross-attention, unscaled as its self-attention (scale_), the softmax in fp32.
  void cross_attention(int64_t l) {
    const int64_t B = static_cast<int64_t>(rows_.size());
    parallel_rows(0, B * H_, 1, [&](int64_t i0, int64_t i1) {
      Buffer<float> p, acc(hd_);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / H_, h = i % H_;
        const CrossSeq& seq = cross_seqs_[rows_[b].seq];
        const int64_t S = seq.S, at = (l * H_ + h) * S * hd_;
        p.resize(S);
        emergence::gemv_rows(seq.k + at, cq_.data() + (b * H_ + h) * hd_, p.data(), 0, S, hd_);
        for (int64_t j = 0; j < S; ++j) p[j] *= scale_;
        const float total = exp_minus_max(p.data(), S);
        std::fill(acc.begin(), acc.end(), 0.0f);
        weighted_values(seq.v + at, p.data(), 1.0f / total, S, acc.data());
        std::copy_n(acc.data(), hd_, attn_.data() + (b * H_ + h) * hd_);
      }
    });
  }

  // acc (hd,) += sum_j p[j] * norm * values[j] over S contiguous cached values (S, hd); sixteen
  // lanes at a time where hd allows, each lane summing over j in order as the scalar loop would.
  template <typename T>
  void weighted_values(const T* values, const float* p, float norm, int64_t S, float* acc) const {
    if (hd_ % 16 == 0 && hd_ <= 256) {
      __m512 a[16];
      const int64_t n = hd_ / 16;
      for (int64_t u = 0; u < n; ++u) a[u] = _mm512_loadu_ps(acc + 16 * u);
      for (int64_t j = 0; j < S; ++j) {
        const __m512 pj = _mm512_set1_ps(p[j] * norm);
        const T* vj = values + j * hd_;
        for (int64_t u = 0; u < n; ++u) a[u] = _mm512_fmadd_ps(pj, emergence::load_w(vj + 16 * u), a[u]);
      }
      for (int64_t u = 0; u < n; ++u) _mm512_storeu_ps(acc + 16 * u, a[u]);
      return;
    }
    for (int64_t j = 0; j < S; ++j) {
      const T* vj = values + j * hd_;
      const float pj = p[j] * norm;
      for (int64_t d = 0; d < hd_; ++d) acc[d] += pj * to_float(vj[d]);
    }
  }

  int64_t n_layer_, H_, KV_, hd_, D_, F_, V_, rd_;
  bool rms_norm_, gated_, bf16_;
  int mlp_, placement_, parallel_, qk_norm_;
  int64_t n_experts_ = 0, top_k_ = 0, moe_width_ = 1;  // moe_width_: the wider of an expert and the shared one
  bool weights_ready_ = false;  // every linear layer has been seen to have its weight
  bool norm_topk_ = true;
  float eps_, scale_, score_cap_, logit_cap_, embed_scale_, head_scale_;
  bool cross_ = false;  // some layer cross-attends (T5's decoder)
  std::vector<CrossSeq> cross_seqs_;  // the call's sequences' encoder keys and values
  at::ScalarType dtype_;
  at::Tensor tok_, pos_, inv_freq_, local_inv_freq_, norm_w_, norm_b_, rel_bias_;
  Linear lm_head_, embed_;
  std::vector<Layer> layers_;
  // Scratch, fp32, row after row (B rows): residual stream, normed input, a D-sized result,
  // a parallel block's attention result, q|k|v, attention output, the MLP's hidden and
  // activated vectors, logits, each row's RoPE cos and sin (global, then local).
  Buffer<float> x_, xn_, tmp_, par_, qkv_, attn_, hidden_, act_, logits_, cos_, sin_, cq_;  // cq_: cross queries
  Buffer<float> moe_logits_, moe_x_, moe_h_, moe_a_, moe_out_, moe_gate_;  // the rows through the experts
  Buffer<float> part_y_;  // a stacked part's product over a prompt's rows (linear)
  emergence::QuantizedRows qrows_;  // the rows quantized for a product on ggml blocks (qgemm_ggml)
  // A prompt's products for int4 and NF4 weights (forward's prompt_products): 0 their GEMV row
  // by row (a decoding step: a row's result never depends on its batch), 1 the weight widened a
  // tile of rows at a time to fp32, 2 to bf16 with x rounded to bf16 (qgemm_widened, the eager
  // forward's products: kernels.native_qgemm), from kWidenedRows rows on.
  int prompt_products_ = 0;
  static constexpr int64_t kWidenedRows = 16;
  std::vector<uint16_t> xb_;  // x rounded to bf16 (rows_bf16): prompt_products_ 2, a bf16 model's prompt
  std::vector<Row> rows_;  // the rows of the call being run
  const std::vector<std::vector<int64_t>>* tables_ = nullptr;  // their sequences' block tables
  int64_t num_blocks_ = 0, block_size_ = 1;  // the KV pools' shape
};

}  // namespace

void register_decode_plan(pybind11::module& m) {
  // The packed weight formats the kernels read, by the name of emergence's quantized format
  // (quant/linear.py): the one table of these ids, read by fused_decode.py.
  using emergence::WeightKind;
  pybind11::dict kinds;
  kinds["q8_0"] = static_cast<int>(WeightKind::Q8_0), kinds["q4_0"] = static_cast<int>(WeightKind::Q4_0);
  kinds["int8"] = static_cast<int>(WeightKind::INT8), kinds["int4"] = static_cast<int>(WeightKind::INT4);
  kinds["ternary"] = static_cast<int>(WeightKind::TERNARY), kinds["nf4"] = static_cast<int>(WeightKind::NF4);
  // ggml_rows.h's, on CPUs with AVX512-VNNI (their only kernels)
  if (emergence::kHasAvx512Vnni) {
    kinds["q4_1"] = static_cast<int>(WeightKind::Q4_1), kinds["q5_0"] = static_cast<int>(WeightKind::Q5_0);
    kinds["q5_1"] = static_cast<int>(WeightKind::Q5_1), kinds["q4_k"] = static_cast<int>(WeightKind::Q4_K);
    kinds["q5_k"] = static_cast<int>(WeightKind::Q5_K), kinds["q6_k"] = static_cast<int>(WeightKind::Q6_K);
  }
  m.attr("weight_kinds") = kinds;
  m.def(
      "set_blas_rows",
      [](int64_t rows) { return g_blas_rows.exchange(rows); },
      "fp32 rows from which a decode plan's products go to torch's BLAS (default 64; a huge value: never); "
      "returns the previous value");
  m.attr("has_blas") = emergence::kSgemm != nullptr;
  pybind11::class_<DecodePlan>(m, "DecodePlan")
      .def(pybind11::init<std::vector<int64_t>, std::vector<int64_t>, std::vector<double>, std::vector<int64_t>,
                          std::vector<int64_t>, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                          at::Tensor, at::Tensor, std::vector<std::vector<at::Tensor>>, at::Tensor>())
      .def("set_quantized", &DecodePlan::set_quantized,
           "layer (-1: output head), slot (0 qkv, 1 o, 2 up, 3 down, 4 shared expert up, 5 its down, 6 expert "
           "up, 7 expert down), expert, kind, data, scales, offsets, group, tensor scale, act_bits, part (-1: the "
           "whole matrix; else a stacked part's index), its first output row and its rows")
      .def("forward", &DecodePlan::forward,
           "tokens, rows (their sequences), positions, output rows, block tables, key pool, value pool, each "
           "sequence's cross keys, and values (T5; else empty), a prompt's int4 / NF4 products (0: GEMV row by "
           "row, 1: widened fp32 tiles, 2: bf16) -> logits (len(output rows), V) fp32",
           pybind11::arg("tokens"), pybind11::arg("rows"), pybind11::arg("positions"), pybind11::arg("out_rows"),
           pybind11::arg("tables"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("cross_k"),
           pybind11::arg("cross_v"), pybind11::arg("prompt_products") = 0,
           pybind11::call_guard<pybind11::gil_scoped_release>());
}
