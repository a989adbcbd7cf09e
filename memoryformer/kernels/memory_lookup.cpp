// Fused CPU kernels for the Memory Layer lookup (paper Eq. 11-12), built lazily by
// memoryformer/nn/memory_ops.py with torch.utils.cpp_extension.load, and a fused hash (codes and weights)
// for inference, where the dozen small torch ops of the hash would cost more than the lookup itself.
//
//   forward:  y[n]        = sum_k w[n,k] * T[rows[n,k]]            (fp32 accumulation)
//   backward: dT[r]       = sum_{(n,k): rows[n,k] = r} w[n,k] * dy[n]
//             dw[n,k]     = <dy[n], T[rows[n,k]]>
//
// Tables may be float32, bfloat16 or float16; weights and every accumulator are float32.
// The backward has no zero-fill + scatter pass over the table gradient: (n, k) pairs are bucketed by row
// chunk (a counting sort), each chunk of rows is owned by one thread and accumulated in an L2-sized fp32
// scratch, then each gradient row is written once. No atomics, and a fixed order, so the result is
// deterministic (the authors' CUDA scatter with atomics is not).
//
// Built with -march=native (the cached build's name includes a hash of the CPU's flags); the AVX2 paths
// fall back to plain loops on CPUs without AVX2/FMA/F16C.

// Only light headers (not torch/extension.h): the build takes seconds instead of over a minute.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline float to_float(at::Half v) { return static_cast<float>(v); }

template <typename scalar_t>
inline scalar_t from_float(float v) { return static_cast<scalar_t>(v); }

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// Eight consecutive values of any storage type, widened to fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <typename scalar_t>
inline void store8(scalar_t* p, __m256 v) {
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  for (int u = 0; u < 8; ++u) p[u] = from_float<scalar_t>(tmp[u]);
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// Rows are scattered across the table, so the hardware prefetcher cannot see the next one coming.
inline void prefetch_bytes(const void* ptr, int64_t bytes) {
  const char* c = static_cast<const char*>(ptr);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

void check_inputs(const at::Tensor& rows, const at::Tensor& weights, const at::Tensor& tables) {
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == at::kLong, "rows must be int64 [N, K]");
  TORCH_CHECK(weights.sizes() == rows.sizes() && weights.scalar_type() == at::kFloat,
              "weights must be float32 with the shape of rows");
  TORCH_CHECK(tables.dim() == 2, "tables must be [R, D]");
  TORCH_CHECK(rows.is_contiguous() && weights.is_contiguous() && tables.is_contiguous(),
              "rows, weights and tables must be contiguous");
}

constexpr int64_t kTile = 64;  // output columns kept in eight AVX registers while the K rows stream past

// out[0:d] = init[0:d] + sum_k w[k] * tables[rr[k], 0:d] for one token (init = bias, or null for 0);
// `next` (or null) are the next token's rows, whose current tile is prefetched while this one is summed.
template <typename scalar_t>
void lookup_token(const int64_t* rr, const int64_t* next, const float* w, const scalar_t* tables, scalar_t* out,
                  int64_t k_tab, int64_t d, const float* init = nullptr) {
  int64_t j0 = 0;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  for (; j0 + kTile <= d; j0 += kTile) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    if (init != nullptr) {
      const float* b = init + j0;
      a0 = load8(b), a1 = load8(b + 8), a2 = load8(b + 16), a3 = load8(b + 24);
      a4 = load8(b + 32), a5 = load8(b + 40), a6 = load8(b + 48), a7 = load8(b + 56);
    }
    for (int64_t k = 0; k < k_tab; ++k) {
      if (next != nullptr) prefetch_bytes(tables + next[k] * d + j0, kTile * sizeof(scalar_t));
      const scalar_t* t = tables + rr[k] * d + j0;
      const __m256 wk = _mm256_set1_ps(w[k]);
      a0 = _mm256_fmadd_ps(wk, load8(t), a0);
      a1 = _mm256_fmadd_ps(wk, load8(t + 8), a1);
      a2 = _mm256_fmadd_ps(wk, load8(t + 16), a2);
      a3 = _mm256_fmadd_ps(wk, load8(t + 24), a3);
      a4 = _mm256_fmadd_ps(wk, load8(t + 32), a4);
      a5 = _mm256_fmadd_ps(wk, load8(t + 40), a5);
      a6 = _mm256_fmadd_ps(wk, load8(t + 48), a6);
      a7 = _mm256_fmadd_ps(wk, load8(t + 56), a7);
    }
    scalar_t* o = out + j0;
    store8(o, a0), store8(o + 8, a1), store8(o + 16, a2), store8(o + 24, a3);
    store8(o + 32, a4), store8(o + 40, a5), store8(o + 48, a6), store8(o + 56, a7);
  }
  for (; j0 + 8 <= d; j0 += 8) {
    __m256 a = init != nullptr ? load8(init + j0) : _mm256_setzero_ps();
    for (int64_t k = 0; k < k_tab; ++k) a = _mm256_fmadd_ps(_mm256_set1_ps(w[k]), load8(tables + rr[k] * d + j0), a);
    store8(out + j0, a);
  }
#endif
  for (; j0 < d; ++j0) {  // odd widths, and every column when built without AVX2
    float a = init != nullptr ? init[j0] : 0.0f;
    for (int64_t k = 0; k < k_tab; ++k) a += w[k] * to_float(tables[rr[k] * d + j0]);
    out[j0] = from_float<scalar_t>(a);
  }
}

template <typename scalar_t>
void forward_kernel(const int64_t* rows, const float* w, const scalar_t* tables, scalar_t* out, int64_t n_tok,
                    int64_t k_tab, int64_t d, int64_t n_rows) {
  for (int64_t p = 0; p < n_tok * k_tab; ++p) {
    TORCH_CHECK(rows[p] >= 0 && rows[p] < n_rows, "row index ", rows[p], " is outside the table of ", n_rows,
                " rows");
  }
  // About 64 KiB of rows read per task, so decode (one token) stays on the calling thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, k_tab * d * 4));
  at::parallel_for(0, n_tok, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t* next = n + 1 < end ? rows + (n + 1) * k_tab : nullptr;
      lookup_token(rows + n * k_tab, next, w + n * k_tab, tables, out + n * d, k_tab, d);
    }
  });
}

// acc[0:d] += wp * g[0:d] and return <g, t> over 0:d, in one pass.
template <typename scalar_t>
inline float axpy_dot(float* __restrict acc, const float* __restrict g, const scalar_t* __restrict t, float wp,
                      int64_t d, bool want_acc, bool want_dot) {
  int64_t j = 0;
  float s = 0.0f;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  const __m256 wv = _mm256_set1_ps(wp);
  for (; j + 16 <= d; j += 16) {
    const __m256 g0 = _mm256_loadu_ps(g + j), g1 = _mm256_loadu_ps(g + j + 8);
    if (want_dot) {
      s0 = _mm256_fmadd_ps(g0, load8(t + j), s0);
      s1 = _mm256_fmadd_ps(g1, load8(t + j + 8), s1);
    }
    if (want_acc) {
      _mm256_storeu_ps(acc + j, _mm256_fmadd_ps(wv, g0, _mm256_loadu_ps(acc + j)));
      _mm256_storeu_ps(acc + j + 8, _mm256_fmadd_ps(wv, g1, _mm256_loadu_ps(acc + j + 8)));
    }
  }
  s = hsum(_mm256_add_ps(s0, s1));
#endif
  for (; j < d; ++j) {
    if (want_dot) s += g[j] * to_float(t[j]);
    if (want_acc) acc[j] += wp * g[j];
  }
  return s;
}

template <typename scalar_t>
void backward_kernel(const float* dy, const int64_t* rows, const float* w, const scalar_t* tables,
                     scalar_t* dtables, float* dw, int64_t n_tok, int64_t k_tab, int64_t d, int64_t n_rows) {
  const int64_t n_pairs = n_tok * k_tab;
  // Row chunks of about 128 KiB of fp32 gradient, so a chunk's table and gradient rows stay in L2.
  const int64_t chunk_rows = std::max<int64_t>(1, (int64_t{128} << 10) / (d * 4));
  const int64_t n_chunks = (n_rows + chunk_rows - 1) / chunk_rows;

  // Counting sort of the (n, k) pairs by chunk; pairs keep their token order inside a chunk.
  std::vector<int64_t> start(n_chunks + 1, 0);
  for (int64_t p = 0; p < n_pairs; ++p) {
    const int64_t r = rows[p];
    TORCH_CHECK(r >= 0 && r < n_rows, "row index ", r, " is outside the table of ", n_rows, " rows");
    ++start[r / chunk_rows + 1];
  }
  for (int64_t c = 0; c < n_chunks; ++c) start[c + 1] += start[c];
  std::vector<int64_t> order(n_pairs);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < n_pairs; ++p) order[fill[rows[p] / chunk_rows]++] = p;
  }

  constexpr int64_t ahead = 4;
  at::parallel_for(0, n_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    std::vector<float> scratch(dtables != nullptr ? chunk_rows * d : 0);
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t r0 = c * chunk_rows;
      const int64_t nr = std::min(chunk_rows, n_rows - r0);
      if (dtables != nullptr) std::fill(scratch.begin(), scratch.begin() + nr * d, 0.0f);
      for (int64_t i = start[c]; i < start[c + 1]; ++i) {
        if (i + ahead < start[c + 1]) {  // the token rows of dy are scattered too
          const int64_t q = order[i + ahead];
          prefetch_bytes(dy + (q / k_tab) * d, d * 4);
          if (dw != nullptr) prefetch_bytes(tables + rows[q] * d, d * sizeof(scalar_t));
        }
        const int64_t p = order[i];
        const int64_t r = rows[p];
        float* acc = dtables != nullptr ? scratch.data() + (r - r0) * d : nullptr;
        const float s = axpy_dot(acc, dy + (p / k_tab) * d, tables + r * d, w[p], d, acc != nullptr, dw != nullptr);
        if (dw != nullptr) dw[p] = s;
      }
      if (dtables != nullptr) {
        scalar_t* out = dtables + r0 * d;
        for (int64_t j = 0; j < nr * d; ++j) out[j] = from_float<scalar_t>(scratch[j]);
      }
    }
  });
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// e^x for x <= 0, eight at a time (Cephes expf: Cody-Waite reduction and a degree-6 polynomial, ~1 ulp).
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}
#endif

// The hash of paper section 2.2-2.3 for one token, released-code conventions (see memory_layer.py):
// code_k = sum_j [z_kj >= 0] 2^(tau-1-j); p = prod_j sigmoid(2|z_kj| / t) = 1 / prod_j (1 + e^(-2|z_kj|/t));
// weight = p ("prob") or ||z_k||_1 * p with t = 1 ("l1_prob"). Each factor lies in [1, 2], so the product of
// at most 16 of them cannot overflow. `denom` is scratch of the token's width.
template <typename scalar_t>
void hash_token(const scalar_t* x, int64_t* rows, float* weights, float* denom, int64_t k_tab, int64_t tau,
                bool l1, float two_over_t) {
  const int64_t width = k_tab * tau;
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  const __m256 sign_mask = _mm256_set1_ps(-0.0f), scale = _mm256_set1_ps(-two_over_t), one = _mm256_set1_ps(1.0f);
  for (; j + 8 <= width; j += 8) {
    const __m256 a = _mm256_andnot_ps(sign_mask, load8(x + j));
    _mm256_storeu_ps(denom + j, _mm256_add_ps(one, exp_nonpositive(_mm256_mul_ps(scale, a))));
  }
#endif
  for (; j < width; ++j) denom[j] = 1.0f + std::exp(-two_over_t * std::fabs(to_float(x[j])));
  for (int64_t k = 0; k < k_tab; ++k) {
    int64_t code = 0;
    float l1_norm = 0.0f, prod = 1.0f;
    for (int64_t i = k * tau; i < (k + 1) * tau; ++i) {
      const float z = to_float(x[i]);
      code = (code << 1) | (z >= 0.0f ? 1 : 0);
      l1_norm += std::fabs(z);
      prod *= denom[i];
    }
    rows[k] = code + (k << tau);
    weights[k] = l1 ? l1_norm / prod : 1.0f / prod;
  }
}

// Calls fn with a null pointer of the tables' storage type (float32, bfloat16 or float16).
template <typename Fn>
void dispatch_storage(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: fn(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: fn(static_cast<at::BFloat16*>(nullptr)); break;
    case at::kHalf: fn(static_cast<at::Half*>(nullptr)); break;
    default: TORCH_CHECK(false, "tables must be float32, bfloat16 or float16, got ", t);
  }
}

// [..., w] -> [N, w] (contiguous) and the output shape [..., last]; reshaping here rather than in Python
// saves a dispatch per call at decode time.
at::Tensor flatten_tokens(const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 1, "expected a tensor of shape [..., width]");
  return t.reshape({-1, t.size(-1)}).contiguous();
}
std::vector<int64_t> lead_shape(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end() - 1);
  shape.push_back(last);
  return shape;
}

}  // namespace

// rows int64 [..., K], weights [..., K] (any float dtype, read as fp32), tables [R, D] -> [..., D] in the
// tables' dtype. Conversions happen here rather than in Python, where each would cost a dispatch.
at::Tensor lookup_forward(const at::Tensor& rows_in, const at::Tensor& weights_in, const at::Tensor& tables_in) {
  TORCH_CHECK(rows_in.sizes() == weights_in.sizes(), "rows and weights must have one shape");
  const auto rows = flatten_tokens(rows_in), weights = flatten_tokens(weights_in.to(at::kFloat));
  const auto tables = tables_in.contiguous();
  check_inputs(rows, weights, tables);
  const int64_t n_tok = rows.size(0), k_tab = rows.size(1), n_rows = tables.size(0), d = tables.size(1);
  auto out = at::empty({n_tok, d}, tables.options());
  dispatch_storage(tables.scalar_type(), [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    forward_kernel<scalar_t>(rows.data_ptr<int64_t>(), weights.data_ptr<float>(), tables.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), n_tok, k_tab, d, n_rows);
  });
  return rows_in.dim() == 2 ? out : out.view(lead_shape(rows_in, d));
}

// grad_out: float32 [N, D]. Returns (grad_tables [R, D] in the tables' dtype, grad_weights float32 [N, K]);
// a gradient that is not needed comes back as an empty tensor.
std::tuple<at::Tensor, at::Tensor> lookup_backward(const at::Tensor& grad_out, const at::Tensor& rows,
                                                   const at::Tensor& weights, const at::Tensor& tables,
                                                   bool need_tables, bool need_weights) {
  check_inputs(rows, weights, tables);
  const int64_t n_tok = rows.size(0), k_tab = rows.size(1), n_rows = tables.size(0), d = tables.size(1);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == n_tok && grad_out.size(1) == d &&
                  grad_out.scalar_type() == at::kFloat && grad_out.is_contiguous(),
              "grad_out must be contiguous float32 [N, D]");
  auto dtables = at::empty({need_tables ? n_rows : 0, d}, tables.options());
  auto dw = at::empty({need_weights ? n_tok : 0, k_tab}, weights.options());
  dispatch_storage(tables.scalar_type(), [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    backward_kernel<scalar_t>(grad_out.data_ptr<float>(), rows.data_ptr<int64_t>(), weights.data_ptr<float>(),
                              tables.data_ptr<scalar_t>(), need_tables ? dtables.data_ptr<scalar_t>() : nullptr,
                              need_weights ? dw.data_ptr<float>() : nullptr, n_tok, k_tab, d, n_rows);
  });
  return {dtables, dw};
}

// x [..., K * tau] (float32, bfloat16 or float16) -> (rows int64 [..., K], weights float32 [..., K]); no
// autograd.
std::tuple<at::Tensor, at::Tensor> hash_forward(const at::Tensor& x_in, int64_t tau, bool l1_prob,
                                                double temperature) {
  const auto x = flatten_tokens(x_in);
  TORCH_CHECK(tau >= 1 && tau <= 16 && x.size(1) % tau == 0, "x width must be a multiple of tau <= 16");
  const int64_t n_tok = x.size(0), k_tab = x.size(1) / tau;
  auto rows = at::empty({n_tok, k_tab}, x.options().dtype(at::kLong));
  auto weights = at::empty({n_tok, k_tab}, x.options().dtype(at::kFloat));
  const float two_over_t = static_cast<float>(2.0 / (l1_prob ? 1.0 : temperature));
  dispatch_storage(x.scalar_type(), [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* px = x.data_ptr<scalar_t>();
    int64_t* pr = rows.data_ptr<int64_t>();
    float* pw = weights.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, x.size(1)));
    at::parallel_for(0, n_tok, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> denom(x.size(1));
      for (int64_t n = begin; n < end; ++n) {
        hash_token(px + n * x.size(1), pr + n * k_tab, pw + n * k_tab, denom.data(), k_tab, tau, l1_prob,
                   two_over_t);
      }
    });
  });
  if (x_in.dim() == 2) return {rows, weights};
  return {rows.view(lead_shape(x_in, k_tab)), weights.view(lead_shape(x_in, k_tab))};
}

// The whole Memory Layer for inference, hash + lookup + bias in one call, so that a decoding step pays one
// dispatch instead of a dozen: x [..., K * tau] (any float dtype, read as fp32), tables [K * 2^tau, D],
// bias [D] or None -> [..., D] in the tables' dtype. No autograd.
at::Tensor layer_forward(const at::Tensor& x_in, const at::Tensor& tables, const std::optional<at::Tensor>& bias,
                         int64_t tau, bool l1_prob, double temperature) {
  TORCH_CHECK(tables.dim() == 2 && tau >= 1 && tau <= 16, "tables must be [K * 2^tau, D], tau <= 16");
  const auto x = flatten_tokens(x_in.to(at::kFloat));
  const int64_t n_tok = x.size(0), width = x.size(1), k_tab = width / tau, d = tables.size(1);
  TORCH_CHECK(width % tau == 0 && tables.size(0) == (k_tab << tau),
              "x width and tables do not match: expected tables of [K * 2^tau, D] with K = width / tau");
  const auto t = tables.contiguous();
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == d, "bias must be [D]");
  }
  auto out = at::empty({n_tok, d}, tables.options());
  const float two_over_t = static_cast<float>(2.0 / (l1_prob ? 1.0 : temperature));
  const float* px = x.data_ptr<float>();
  const float* pb = b.defined() ? b.data_ptr<float>() : nullptr;
  dispatch_storage(tables.scalar_type(), [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* pt = t.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, k_tab * d * 4));
    at::parallel_for(0, n_tok, grain, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> rows(k_tab);
      std::vector<float> weights(k_tab), denom(width);
      for (int64_t n = begin; n < end; ++n) {
        hash_token(px + n * width, rows.data(), weights.data(), denom.data(), k_tab, tau, l1_prob, two_over_t);
        lookup_token(rows.data(), static_cast<const int64_t*>(nullptr), weights.data(), pt, po + n * d, k_tab, d,
                     pb);
      }
    });
  });
  return x_in.dim() == 2 ? out : out.view(lead_shape(x_in, d));
}

TORCH_LIBRARY(memoryformer, m) {
  m.def("lookup_forward(Tensor rows, Tensor weights, Tensor tables) -> Tensor");
  m.def("lookup_backward(Tensor grad_out, Tensor rows, Tensor weights, Tensor tables, bool need_tables, "
        "bool need_weights) -> (Tensor, Tensor)");
  m.def("hash_forward(Tensor x, int tau, bool l1_prob, float temperature) -> (Tensor, Tensor)");
  m.def("layer_forward(Tensor x, Tensor tables, Tensor? bias, int tau, bool l1_prob, float temperature) -> Tensor");
}

TORCH_LIBRARY_IMPL(memoryformer, CPU, m) {
  m.impl("lookup_forward", &lookup_forward);
  m.impl("lookup_backward", &lookup_backward);
  m.impl("hash_forward", &hash_forward);
  m.impl("layer_forward", &layer_forward);
}
