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
// scratch, then each touched gradient row is written once into a lazily zeroed buffer (fresh mmap pages),
// so untouched rows cost nothing. No atomics, and a fixed order, so the result is deterministic (the
// authors' CUDA scatter with atomics is not).
// The forward has two loops: per token (few tokens: decoding) and, once each table row is read by several
// tokens, a cache-blocked one that packs table slabs into L2 and reads each from memory once per block.
//
// Built with -march=native (the cached build's name includes a hash of the CPU's flags); the AVX2 paths
// fall back to plain loops on CPUs without AVX2/FMA/F16C.

// Only light headers (not torch/extension.h): the build takes seconds instead of over a minute.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
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

#include <sys/mman.h>

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
constexpr int64_t kAhead = 8;  // rows prefetched ahead: about 2 KiB in flight, enough to hide an L3 miss

// out[0:d] = init[0:d] + sum_k w[k] * tables[rr[k], 0:d] for one token (init = bias, or null for 0);
// `next` (or null) are the next token's rows, whose first tile is prefetched while this token ends.
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
      // Prefetch kAhead rows ahead in the order they are read: this tile's later rows, then the next tile's
      // first rows, then the next token's.
      const int64_t q = k + kAhead;
      const scalar_t* ahead = q < k_tab              ? tables + rr[q] * d + j0
                              : j0 + 2 * kTile <= d  ? tables + rr[q - k_tab] * d + j0 + kTile
                              : next != nullptr      ? tables + next[q - k_tab] * d
                                                     : nullptr;
      if (ahead != nullptr) prefetch_bytes(ahead, kTile * sizeof(scalar_t));
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

// Runs fn(begin, end) over [0, n) in parallel chunks of at least `grain`, or inline when there is only one
// chunk: an OpenMP region costs microseconds, as much as a whole decoding step's lookup.
template <typename Fn>
void parallel_over(int64_t n, int64_t grain, const Fn& fn) {
  if (n <= grain || at::get_num_threads() == 1) {
    if (n > 0) fn(int64_t{0}, n);
    return;
  }
  at::parallel_for(0, n, grain, fn);
}

// Tokens per parallel task for per-token work of `bytes_per_token`: about 256 KiB of reads per task, so one
// or two decoding tokens stay on the calling thread.
inline int64_t token_grain(int64_t bytes_per_token) {
  return std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, bytes_per_token));
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
constexpr bool kBlocked = true;
#else
constexpr bool kBlocked = false;
#endif
constexpr int64_t kBlockTokens = 2048;  // tokens per block: the 64-column output slab is 512 KiB of fp32
constexpr int64_t kGroup = 2;           // tables packed at a time: 2 x 256 rows x 256 B = 128 KiB, in L2

// The blocked forward, for many tokens per table row (with 2^tau = 256 rows per table, 4096 tokens read each
// row 16 times). Reading K random 2 KiB rows per token makes the per-token loop memory bound: 4096 tokens
// move 512 MiB through a 32 MiB table. Here each (block of tokens, 64-column slab, pair of tables) packs the
// tables' slab (2 x 64 KiB) into contiguous fp32 scratch once, then every token of the block reads it from
// L2, so a block of 2048 tokens reads the whole table once (32 MiB) instead of 256 MiB. Token offsets and
// weights are transposed to [K, N] first so that the inner loop reads them sequentially. Per output element
// the sum still runs over k in order, so the result matches the per-token path's order of additions.
// Requires every rows[n, k] to lie in table k (rows [k * rpt, (k + 1) * rpt)), as the hash produces; returns
// false (and computes nothing) otherwise.
template <typename scalar_t>
bool forward_blocked(const int64_t* rows, const float* w, const scalar_t* tables, scalar_t* out, int64_t n_tok,
                     int64_t k_tab, int64_t d, int64_t n_rows, const float* init) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  const int64_t rpt = n_rows / k_tab;
  if (d % kTile != 0 || rpt * k_tab != n_rows || rpt * kGroup * kTile > (int64_t{1} << 30)) return false;
  std::vector<int32_t> off(n_tok * k_tab);  // [K, N]: fp32 offset of the row's slab inside the packed scratch
  std::vector<float> wt(n_tok * k_tab);     // [K, N]
  for (int64_t n = 0; n < n_tok; ++n) {
    for (int64_t k = 0; k < k_tab; ++k) {
      const int64_t local = rows[n * k_tab + k] - k * rpt;
      if (local < 0 || local >= rpt) return false;
      off[k * n_tok + n] = static_cast<int32_t>(((k % kGroup) * rpt + local) * kTile);
      wt[k * n_tok + n] = w[n * k_tab + k];
    }
  }
  const int64_t n_slabs = d / kTile, n_blocks = (n_tok + kBlockTokens - 1) / kBlockTokens;
  at::parallel_for(0, n_blocks * n_slabs, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<float> acc_slab(std::min(kBlockTokens, n_tok) * kTile), pack(kGroup * rpt * kTile);
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t n0 = (task / n_slabs) * kBlockTokens, j0 = (task % n_slabs) * kTile;
      const int64_t nb = std::min(kBlockTokens, n_tok - n0);
      for (int64_t k0 = 0; k0 < k_tab; k0 += kGroup) {
        const int64_t g = std::min(kGroup, k_tab - k0);
        for (int64_t q = 0; q < g; ++q) {
          const scalar_t* src = tables + (k0 + q) * rpt * d + j0;
          float* dst = pack.data() + q * rpt * kTile;
          for (int64_t r = 0; r < rpt; ++r) {
            if (r + 8 < rpt) prefetch_bytes(src + (r + 8) * d, kTile * sizeof(scalar_t));
            for (int64_t u = 0; u < kTile; u += 8) _mm256_storeu_ps(dst + r * kTile + u, load8(src + r * d + u));
          }
        }
        const bool first = k0 == 0, last = k0 + g >= k_tab;
        for (int64_t i = 0; i < nb; ++i) {
          float* a_ptr = acc_slab.data() + i * kTile;
          const float* b = first ? (init != nullptr ? init + j0 : nullptr) : a_ptr;
          __m256 a0, a1, a2, a3, a4, a5, a6, a7;
          if (b != nullptr) {
            a0 = _mm256_loadu_ps(b), a1 = _mm256_loadu_ps(b + 8), a2 = _mm256_loadu_ps(b + 16);
            a3 = _mm256_loadu_ps(b + 24), a4 = _mm256_loadu_ps(b + 32), a5 = _mm256_loadu_ps(b + 40);
            a6 = _mm256_loadu_ps(b + 48), a7 = _mm256_loadu_ps(b + 56);
          } else {
            a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
          }
          for (int64_t q = 0; q < g; ++q) {
            const int64_t idx = (k0 + q) * n_tok + n0 + i;
            const float* t = pack.data() + off[idx];
            const __m256 wk = _mm256_set1_ps(wt[idx]);
            a0 = _mm256_fmadd_ps(wk, _mm256_loadu_ps(t), a0);
            a1 = _mm256_fmadd_ps(wk, _mm256_loadu_ps(t + 8), a1);
            a2 = _mm256_fmadd_ps(wk, _mm256_loadu_ps(t + 16), a2);
            a3 = _mm256_fmadd_ps(wk, _mm256_loadu_ps(t + 24), a3);
            a4 = _mm256_fmadd_ps(wk, _mm256_loadu_ps(t + 32), a4);
            a5 = _mm256_fmadd_ps(wk, _mm256_loadu_ps(t + 40), a5);
            a6 = _mm256_fmadd_ps(wk, _mm256_loadu_ps(t + 48), a6);
            a7 = _mm256_fmadd_ps(wk, _mm256_loadu_ps(t + 56), a7);
          }
          if (last) {
            scalar_t* o = out + (n0 + i) * d + j0;
            store8(o, a0), store8(o + 8, a1), store8(o + 16, a2), store8(o + 24, a3);
            store8(o + 32, a4), store8(o + 40, a5), store8(o + 48, a6), store8(o + 56, a7);
          } else {
            float* o = a_ptr;
            _mm256_storeu_ps(o, a0), _mm256_storeu_ps(o + 8, a1), _mm256_storeu_ps(o + 16, a2);
            _mm256_storeu_ps(o + 24, a3), _mm256_storeu_ps(o + 32, a4), _mm256_storeu_ps(o + 40, a5);
            _mm256_storeu_ps(o + 48, a6), _mm256_storeu_ps(o + 56, a7);
          }
        }
      }
    }
  });
  return true;
#else
  (void)rows, (void)w, (void)tables, (void)out, (void)n_tok, (void)k_tab, (void)d, (void)n_rows, (void)init;
  return false;
#endif
}

// y[n] = init + sum_k w[n,k] * T[rows[n,k]] for all tokens; init = bias [d] or null.
template <typename scalar_t>
void forward_kernel(const int64_t* rows, const float* w, const scalar_t* tables, scalar_t* out, int64_t n_tok,
                    int64_t k_tab, int64_t d, int64_t n_rows, const float* init = nullptr) {
  for (int64_t p = 0; p < n_tok * k_tab; ++p) {
    TORCH_CHECK(rows[p] >= 0 && rows[p] < n_rows, "row index ", rows[p], " is outside the table of ", n_rows,
                " rows");
  }
  // Blocking pays once each table row is read by about three tokens or more (measured crossover: 2-3).
  if (kBlocked && n_tok * k_tab >= 3 * n_rows &&
      forward_blocked(rows, w, tables, out, n_tok, k_tab, d, n_rows, init)) {
    return;
  }
  parallel_over(n_tok, token_grain(k_tab * d * static_cast<int64_t>(sizeof(scalar_t))),
                [&](int64_t begin, int64_t end) {
                  for (int64_t n = begin; n < end; ++n) {
                    const int64_t* next = n + 1 < end ? rows + (n + 1) * k_tab : nullptr;
                    lookup_token(rows + n * k_tab, next, w + n * k_tab, tables, out + n * d, k_tab, d, init);
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

// A zero-filled [rows, d] tensor for the table gradient. Large ones come straight from mmap, whose pages
// the kernel zero-fills lazily on first write: the backward then writes only the rows tokens touched and
// never pays for zeroing (or even faulting in) the rest, which at a few tokens is almost all of a 33 MB
// gradient (before: ~17 ms of page faults, zero-fill and row writes per step at 1 token). When most rows
// will be written anyway, huge pages cut the page faults 512-fold.
at::Tensor zero_table_grad(int64_t n_rows, int64_t d, const at::TensorOptions& options, bool dense) {
  const int64_t bytes = n_rows * d * static_cast<int64_t>(c10::elementSize(options.dtype().toScalarType()));
  if (bytes < (int64_t{1} << 22)) return at::zeros({n_rows, d}, options);
  void* ptr = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (ptr == MAP_FAILED) return at::zeros({n_rows, d}, options);
#if defined(MADV_HUGEPAGE)
  if (dense) madvise(ptr, bytes, MADV_HUGEPAGE);
#endif
  const size_t len = static_cast<size_t>(bytes);
  return at::from_blob(ptr, {n_rows, d}, [len](void* p) { munmap(p, len); }, options);
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
  // A few tokens touch a few chunks: no parallel region, whose start-up would cost more than the work.
  const int64_t chunk_grain = n_pairs * d < (int64_t{1} << 18) ? n_chunks : 1;
  parallel_over(n_chunks, chunk_grain, [&](int64_t c_begin, int64_t c_end) {
    std::vector<float> scratch(dtables != nullptr ? chunk_rows * d : 0);
    std::vector<char> touched(chunk_rows);
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t r0 = c * chunk_rows;
      const int64_t nr = std::min(chunk_rows, n_rows - r0);
      if (start[c] == start[c + 1]) continue;  // no token touched these rows: they stay zero
      if (dtables != nullptr) {
        std::fill(scratch.begin(), scratch.begin() + nr * d, 0.0f);
        std::fill(touched.begin(), touched.end(), char{0});
      }
      for (int64_t i = start[c]; i < start[c + 1]; ++i) {
        if (i + ahead < start[c + 1]) {  // the token rows of dy are scattered too
          const int64_t q = order[i + ahead];
          prefetch_bytes(dy + (q / k_tab) * d, d * 4);
          if (dw != nullptr) prefetch_bytes(tables + rows[q] * d, d * sizeof(scalar_t));
        }
        const int64_t p = order[i];
        const int64_t r = rows[p];
        float* acc = nullptr;
        if (dtables != nullptr) {
          acc = scratch.data() + (r - r0) * d;
          touched[r - r0] = 1;
        }
        const float s = axpy_dot(acc, dy + (p / k_tab) * d, tables + r * d, w[p], d, acc != nullptr, dw != nullptr);
        if (dw != nullptr) dw[p] = s;
      }
      if (dtables != nullptr) {  // only touched rows: the others are already zero, and stay unwritten
        for (int64_t r = 0; r < nr; ++r) {
          if (!touched[r]) continue;
          scalar_t* out = dtables + (r0 + r) * d;
          const float* src = scratch.data() + r * d;
          for (int64_t j = 0; j < d; ++j) out[j] = from_float<scalar_t>(src[j]);
        }
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

// `t` as a contiguous tensor of `dtype` (or of its own dtype when `dtype` is nullopt), without calling any
// op when it already is one: at decode time each dispatched op (even a no-op .to() or .contiguous() on a
// parameter that requires grad) costs about a microsecond, a tenth of the whole lookup.
at::Tensor dense(const at::Tensor& t, std::optional<at::ScalarType> dtype = std::nullopt) {
  const bool same_type = !dtype.has_value() || t.scalar_type() == *dtype;
  if (same_type && t.is_contiguous()) return t;
  return (same_type ? t : t.to(*dtype)).contiguous();
}
std::vector<int64_t> lead_shape(const at::Tensor& t, int64_t last) {
  TORCH_CHECK(t.dim() >= 1, "expected a tensor of shape [..., width]");
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end() - 1);
  shape.push_back(last);
  return shape;
}
// Tokens of a contiguous [..., w] tensor.
inline int64_t n_tokens(const at::Tensor& t) { return t.size(-1) == 0 ? 0 : t.numel() / t.size(-1); }

}  // namespace

// rows int64 [..., K], weights [..., K] (any float dtype, read as fp32), tables [R, D] -> [..., D] in the
// tables' dtype. Conversions happen here rather than in Python, where each would cost a dispatch.
at::Tensor lookup_forward(const at::Tensor& rows_in, const at::Tensor& weights_in, const at::Tensor& tables_in) {
  TORCH_CHECK(rows_in.sizes() == weights_in.sizes() && rows_in.dim() >= 1, "rows and weights must have one shape");
  TORCH_CHECK(rows_in.scalar_type() == at::kLong, "rows must be int64");
  TORCH_CHECK(tables_in.dim() == 2, "tables must be [R, D]");
  const auto rows = dense(rows_in), weights = dense(weights_in, at::kFloat), tables = dense(tables_in);
  const int64_t n_tok = n_tokens(rows), k_tab = rows.size(-1), n_rows = tables.size(0), d = tables.size(1);
  auto out = at::empty(lead_shape(rows, d), tables.options());
  dispatch_storage(tables.scalar_type(), [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    forward_kernel<scalar_t>(rows.data_ptr<int64_t>(), weights.data_ptr<float>(), tables.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), n_tok, k_tab, d, n_rows);
  });
  return out;
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
  // The kernel writes only touched rows, so the gradient starts zeroed. "dense" (huge pages) once about 1 in 16
  // rows is touched: then most 4 KiB pages would be faulted in one by one (~3 us each on this VM).
  auto dtables = zero_table_grad(need_tables ? n_rows : 0, d, tables.options(), 16 * n_tok * k_tab >= n_rows);
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
  TORCH_CHECK(x_in.dim() >= 1, "expected x of shape [..., K * tau]");
  const auto x = dense(x_in);
  const int64_t width = x.size(-1);
  TORCH_CHECK(tau >= 1 && tau <= 16 && width % tau == 0, "x width must be a multiple of tau <= 16");
  const int64_t n_tok = n_tokens(x), k_tab = width / tau;
  auto rows = at::empty(lead_shape(x, k_tab), x.options().dtype(at::kLong));
  auto weights = at::empty(lead_shape(x, k_tab), x.options().dtype(at::kFloat));
  const float two_over_t = static_cast<float>(2.0 / (l1_prob ? 1.0 : temperature));
  dispatch_storage(x.scalar_type(), [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* px = x.data_ptr<scalar_t>();
    int64_t* pr = rows.data_ptr<int64_t>();
    float* pw = weights.data_ptr<float>();
    parallel_over(n_tok, token_grain(width * 64), [&](int64_t begin, int64_t end) {
      std::vector<float> denom(width);
      for (int64_t n = begin; n < end; ++n) {
        hash_token(px + n * width, pr + n * k_tab, pw + n * k_tab, denom.data(), k_tab, tau, l1_prob, two_over_t);
      }
    });
  });
  return {rows, weights};
}

// The whole Memory Layer for inference, hash + lookup + bias in one call, so that a decoding step pays one
// dispatch instead of a dozen: x [..., K * tau] (any float dtype, read as fp32), tables [K * 2^tau, D],
// bias [D] or None -> [..., D] in the tables' dtype. No autograd.
at::Tensor layer_forward(const at::Tensor& x_in, const at::Tensor& tables, const std::optional<at::Tensor>& bias,
                         int64_t tau, bool l1_prob, double temperature) {
  TORCH_CHECK(tables.dim() == 2 && tau >= 1 && tau <= 16, "tables must be [K * 2^tau, D], tau <= 16");
  TORCH_CHECK(x_in.dim() >= 1, "expected x of shape [..., K * tau]");
  const auto x = dense(x_in, at::kFloat);
  const int64_t n_tok = n_tokens(x), width = x.size(-1), k_tab = width / tau, d = tables.size(1);
  TORCH_CHECK(width % tau == 0 && tables.size(0) == (k_tab << tau),
              "x width and tables do not match: expected tables of [K * 2^tau, D] with K = width / tau");
  const auto t = dense(tables);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = dense(*bias, at::kFloat);
    TORCH_CHECK(b.dim() == 1 && b.size(0) == d, "bias must be [D]");
  }
  auto out = at::empty(lead_shape(x, d), tables.options());
  const float two_over_t = static_cast<float>(2.0 / (l1_prob ? 1.0 : temperature));
  const float* px = x.data_ptr<float>();
  const float* pb = b.defined() ? b.data_ptr<float>() : nullptr;
  dispatch_storage(tables.scalar_type(), [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    const scalar_t* pt = t.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    if (n_tok * k_tab >= 3 * t.size(0)) {  // many tokens: hash them all, then the blocked lookup
      auto rows = at::empty({n_tok, k_tab}, x.options().dtype(at::kLong));
      auto weights = at::empty({n_tok, k_tab}, x.options());
      int64_t* pr = rows.data_ptr<int64_t>();
      float* pw = weights.data_ptr<float>();
      parallel_over(n_tok, token_grain(width * 64), [&](int64_t begin, int64_t end) {
        std::vector<float> denom(width);
        for (int64_t n = begin; n < end; ++n) {
          hash_token(px + n * width, pr + n * k_tab, pw + n * k_tab, denom.data(), k_tab, tau, l1_prob, two_over_t);
        }
      });
      forward_kernel<scalar_t>(pr, pw, pt, po, n_tok, k_tab, d, t.size(0), pb);
      return;
    }
    parallel_over(n_tok, token_grain(k_tab * d * static_cast<int64_t>(sizeof(scalar_t))),
                  [&](int64_t begin, int64_t end) {
      std::vector<int64_t> rows(k_tab);
      std::vector<float> weights(k_tab), denom(width);
      for (int64_t n = begin; n < end; ++n) {
        hash_token(px + n * width, rows.data(), weights.data(), denom.data(), k_tab, tau, l1_prob, two_over_t);
        lookup_token(rows.data(), static_cast<const int64_t*>(nullptr), weights.data(), pt, po + n * d, k_tab, d,
                     pb);
      }
    });
  });
  return out;
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
