// Batch-invariant linear y = x W^T (+ bias) for x [M, K], W [N, K] (nn.Linear's layout, read in place),
// built by rl_engine/kernels/cpu/__init__.py (load_source) for rl_engine/kernels/invariant.py.
//
// Every output element reduces over K in one order that depends only on K: 16 fp32 lanes, lane j
// accumulating k = j, j + 16, j + 32, ... in increasing k with a fused multiply-add (the last partial
// group of 16 read as zeros past K), then the fixed pairwise tree over the lanes
//   s8[i] = a[i] + a[i + 8], s4[i] = s8[i] + s8[i + 4], s2[i] = s4[i] + s4[i + 2], s = s2[0] + s2[1],
// then the bias added in fp32 and the result rounded once to the output dtype. bf16 / fp16 inputs are
// widened to fp32 exactly. Nothing else enters an element's arithmetic: the register tiles (rows x
// output features, one 16-lane accumulator per element), the thread split (at::parallel_for over row
// chunks and feature blocks) and the instruction set only change which elements are computed together.
// The three back ends (AVX-512, AVX2 with two 8-lane halves, scalar std::fma) run the same operations
// on the same lanes, so they give the same bits (the tests compare them), and so does every x86-64
// machine with IEEE fp32 (no -ffast-math; denormals as the FPU's default, no flush-to-zero).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int kLanes = 16;

template <typename T>
inline float widen(T v) { return static_cast<float>(v); }  // exact for bf16 / fp16

// The lane tree on 16 stored lanes (every back end's tiles at the edges use it; see the header).
inline float tree16(const float* a) {
  float s8[8], s4[4], s2[2];
  for (int i = 0; i < 8; ++i) s8[i] = a[i] + a[i + 8];
  for (int i = 0; i < 4; ++i) s4[i] = s8[i] + s8[i + 4];
  for (int i = 0; i < 2; ++i) s2[i] = s4[i] + s4[i + 2];
  return s2[0] + s2[1];
}

// ---- back ends: a 16-lane fp32 vector V with load / fma / reduce -------------------------------

struct Scalar {
  static constexpr const char* name = "scalar";
  struct V { float v[kLanes]; };
  static constexpr int kRows = 4;  // register tile: kRows rows x cols(r) features
  static constexpr int cols(int rows) { return rows >= 4 ? 4 : rows == 3 ? 5 : rows == 2 ? 8 : 16; }
  static inline V zero() { V r; for (int i = 0; i < kLanes; ++i) r.v[i] = 0.f; return r; }
  template <typename T>
  static inline V load(const T* p) { V r; for (int i = 0; i < kLanes; ++i) r.v[i] = widen(p[i]); return r; }
  static inline void fma(const V& a, const V& b, V& acc) {
    for (int i = 0; i < kLanes; ++i) acc.v[i] = std::fma(a.v[i], b.v[i], acc.v[i]);
  }
  static inline void keep_in_register(V&) {}
  // sums of N accumulators, each by the lane tree
  template <int N>
  static inline void reduce(const V (&acc)[N], float* out) {
    for (int i = 0; i < N; ++i) out[i] = tree16(acc[i].v);
  }
};

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
struct Avx2 {
  static constexpr const char* name = "avx2";
  struct V { __m256 lo, hi; };  // lanes 0-7, 8-15
  static constexpr int kRows = 2;  // 16 ymm registers: 2 x 2 accumulators (8 ymm) + loads
  static constexpr int cols(int rows) { return rows >= 2 ? 2 : 4; }
  static inline V zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static inline V load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static inline __m256 bf16x8(const void* p) {
    const __m256i i = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(i, 16));
  }
  static inline V load(const c10::BFloat16* p) { return {bf16x8(p), bf16x8(p + 8)}; }
  static inline V load(const c10::Half* p) {
    return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
  }
  static inline void fma(const V& a, const V& b, V& acc) {
    acc.lo = _mm256_fmadd_ps(a.lo, b.lo, acc.lo);
    acc.hi = _mm256_fmadd_ps(a.hi, b.hi, acc.hi);
  }
  static inline void keep_in_register(V& v) { asm("" : "+x"(v.lo), "+x"(v.hi)); }
  static inline float tree(const V& a) {
    const __m256 s8 = _mm256_add_ps(a.lo, a.hi);                                          // a[i] + a[i+8]
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));  // + 4
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));                              // + 2
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));                            // s2[0] + s2[1]
  }
  template <int N>
  static inline void reduce(const V (&acc)[N], float* out) {
    for (int i = 0; i < N; ++i) out[i] = tree(acc[i]);
  }
};
#endif

#if defined(__AVX512F__)
struct Avx512 {
  static constexpr const char* name = "avx512";
  using V = __m512;
  static constexpr int kRows = 4;  // 32 zmm registers: 16 accumulators + loads
  static constexpr int cols(int rows) { return rows >= 4 ? 4 : rows == 3 ? 5 : rows == 2 ? 8 : 16; }
  static inline V zero() { return _mm512_setzero_ps(); }
  static inline V load(const float* p) { return _mm512_loadu_ps(p); }
  static inline V load(const c10::BFloat16* p) {
    const __m512i i = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(i, 16));
  }
  static inline V load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline void fma(const V& a, const V& b, V& acc) { acc = _mm512_fmadd_ps(a, b, acc); }
  static inline void keep_in_register(V& v) { asm("" : "+v"(v)); }
  // Sixteen accumulators at once by the lane tree, level by level across accumulators with
  // shuffles (45 instructions for 16 sums instead of ~8 each); fewer than 16 are padded with zero
  // vectors. always_inline with the array by reference: the accumulators never leave registers
  // (a reduction out of line made GCC store every accumulator after each fma of the loop: ~1.5x).
  template <int N>
  __attribute__((always_inline)) static inline void reduce(const V (&acc)[N], float* out) {
    static_assert(N <= 16);
    V a[16];
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) a[i] = i < N ? acc[i] : _mm512_setzero_ps();
    V p[8], s[4], u[2];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i)  // [A s8 | B s8]: quarters A0-3, A4-7, B0-3, B4-7
      p[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i)  // quarter q: s4 of accumulator 4 i + q
      s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
#pragma GCC unroll 2
    for (int i = 0; i < 2; ++i)  // quarter q: s2 of accumulators 8 i + q, 8 i + 4 + q
      u[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    // position 4 j + t holds the sum of accumulator 4 t + j: permuted back to accumulator order
    const V r = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(order, r));
  }
};
#endif

// ---- one register tile: R rows x C features, full K -------------------------------------------

// noinline: inlined into the driver, GCC kept the accumulators in memory (a store per fma)
template <class I, typename T, int R>
__attribute__((noinline)) void tile(const T* const* xr, const T* const* wr, int64_t K, float* sums) {
  constexpr int C = I::cols(R);
  typename I::V acc[R * C];
#pragma GCC unroll 16
  for (int i = 0; i < R * C; ++i) acc[i] = I::zero();
  // one group of 16 k: xs[r] + k, ws[c] + k
  auto step = [&](const T* const* xs, const T* const* ws, int64_t k) __attribute__((always_inline)) {
    typename I::V xv[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      xv[r] = I::load(xs[r] + k);
      I::keep_in_register(xv[r]);
    }
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      typename I::V wv = I::load(ws[c] + k);
      I::keep_in_register(wv);  // else GCC folds loads into the fmas: R + R * C loads, not R + C
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) I::fma(xv[r], wv, acc[r * C + c]);
    }
  };
  const int64_t full = K / kLanes * kLanes;
  for (int64_t k = 0; k < full; k += kLanes) step(xr, wr, k);
  if (full < K) {  // the last partial group: zeros past K (fma(0, 0, a) on those lanes)
    T xt[R][kLanes], wt[C][kLanes];
    const T* xp[R];
    const T* wp[C];
    for (int r = 0; r < R; ++r) {
      for (int i = 0; i < kLanes; ++i) xt[r][i] = full + i < K ? xr[r][full + i] : T(0.f);
      xp[r] = xt[r];
    }
    for (int c = 0; c < C; ++c) {
      for (int i = 0; i < kLanes; ++i) wt[c][i] = full + i < K ? wr[c][full + i] : T(0.f);
      wp[c] = wt[c];
    }
    step(xp, wp, 0);
  }
  I::template reduce<R * C>(acc, sums);  // sums[r * C + c]
}

// rows [m0, m0 + R) x features [n0, min(n0 + C, n_end)): y = sums + bias, rounded once to T
template <class I, typename T, int R>
inline void tile_store(const T* x, const T* w, const T* bias, T* y, int64_t m0, int64_t n0, int64_t n_end,
                       int64_t N, int64_t K) {
  constexpr int C = I::cols(R);
  const int64_t valid = std::min<int64_t>(C, n_end - n0);
  const T* xr[R];
  const T* wr[C];
  for (int r = 0; r < R; ++r) xr[r] = x + (m0 + r) * K;
  for (int c = 0; c < C; ++c) wr[c] = w + (n0 + std::min<int64_t>(c, valid - 1)) * K;  // past n_end: discarded
  alignas(64) float sums[16];
  tile<I, T, R>(xr, wr, K, sums);
  for (int r = 0; r < R; ++r) {
    T* yr = y + (m0 + r) * N + n0;
    for (int64_t c = 0; c < valid; ++c) {
      const float s = sums[r * C + c];
      yr[c] = static_cast<T>(bias != nullptr ? s + widen(bias[n0 + c]) : s);
    }
  }
}

// a tile of `rows` < I::kRows rows (the last rows of a chunk, or all of a small M)
template <class I, typename T>
inline void edge_tile(int rows, const T* x, const T* w, const T* bias, T* y, int64_t m0, int64_t n0,
                      int64_t n_end, int64_t N, int64_t K) {
  switch (rows) {
    case 1: tile_store<I, T, 1>(x, w, bias, y, m0, n0, n_end, N, K); break;
    case 2: if constexpr (I::kRows > 2) tile_store<I, T, 2>(x, w, bias, y, m0, n0, n_end, N, K); break;
    case 3: if constexpr (I::kRows > 3) tile_store<I, T, 3>(x, w, bias, y, m0, n0, n_end, N, K); break;
    default: TORCH_CHECK(false, "invariant_linear: edge tile of ", rows, " rows");
  }
}

constexpr int64_t kRowChunk = 64;  // rows per task: a feature block's weights stay in L1 over them

template <class I, typename T>
void linear_kernel(const T* x, const T* w, const T* bias, T* y, int64_t M, int64_t N, int64_t K) {
  constexpr int R = I::kRows;
  // feature block per task: the widest tile's (a small M's own tile, so decode rows waste no lanes)
  const int64_t block = M < R ? I::cols(static_cast<int>(M)) : I::cols(R);
  const int64_t row_chunks = (M + kRowChunk - 1) / kRowChunk;
  const int64_t feature_blocks = (N + block - 1) / block;
  const int64_t chunk_rows = std::min<int64_t>(M, kRowChunk);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, chunk_rows * block * K));
  at::parallel_for(0, row_chunks * feature_blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t m_begin = (task / feature_blocks) * kRowChunk;
      const int64_t m_end = std::min(M, m_begin + kRowChunk);
      const int64_t n0 = (task % feature_blocks) * block;
      const int64_t n_end = std::min(N, n0 + block);
      int64_t m = m_begin;
      for (; m + R <= m_end; m += R) tile_store<I, T, R>(x, w, bias, y, m, n0, n_end, N, K);
      // the chunk's last rows: a tile of fewer rows over the same features (an element's order does
      // not depend on the tile it is computed in)
      if (m < m_end) edge_tile<I, T>(static_cast<int>(m_end - m), x, w, bias, y, m, n0, n_end, N, K);
    }
  });
}

template <class I>
torch::Tensor run(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return bias.has_value() ? y.copy_(bias->expand({M, N})) : y.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "invariant_linear", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "invariant_linear: float64 is not supported (fp32, bf16, fp16)");
    } else {
      linear_kernel<I, scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                                 bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr,
                                 y.data_ptr<scalar_t>(), M, N, K);
    }
  });
  return y;
}

std::vector<std::string> isas() {
  std::vector<std::string> out;
#if defined(__AVX512F__)
  out.emplace_back(Avx512::name);
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  out.emplace_back(Avx2::name);
#endif
  out.emplace_back(Scalar::name);
  return out;
}

// x [M, K], w [N, K] contiguous, one dtype (fp32, bf16, fp16), bias [N] or None. isa: "" for the
// widest this build has (the first of isas()), else one of isas() (the tests compare them).
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias,
                     const std::string& isa) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "invariant_linear: x [M, K] and w [N, K], got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "invariant_linear: x and w must be contiguous");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "invariant_linear: CPU tensors only");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "invariant_linear: w must have x's dtype");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0) && bias->is_contiguous() &&
                bias->scalar_type() == x.scalar_type(), "invariant_linear: bias must be [N], contiguous, x's dtype");
  const std::string chosen = isa.empty() ? isas().front() : isa;
#if defined(__AVX512F__)
  if (chosen == Avx512::name) return run<Avx512>(x, w, bias);
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  if (chosen == Avx2::name) return run<Avx2>(x, w, bias);
#endif
  TORCH_CHECK(chosen == Scalar::name, "invariant_linear: isa ", chosen, " is not in this build");
  return run<Scalar>(x, w, bias);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "batch-invariant x @ w.T + bias", py::arg("x"), py::arg("w"), py::arg("bias"),
        py::arg("isa") = "");
  m.def("isas", &isas, "the instruction-set back ends of this build, widest first");
}
