// Batch-invariant linear y = x W^T (+ bias) for x [M, K], W [N, K] (nn.Linear's layout, read in place),
// built by rl_engine/kernels/cpu/__init__.py (load_source) for rl_engine/kernels/invariant.py.
//
// Every output element reduces over K in one order that depends only on K and the dtype: 16 fp32
// lanes, then the fixed pairwise tree over the lanes
//   s8[i] = a[i] + a[i + 8], s4[i] = s8[i] + s8[i + 4], s2[i] = s4[i] + s4[i + 2], s = s2[0] + s2[1],
// then the bias added in fp32 and the result rounded once to the output dtype.
// - fp32 / fp16 (widened exactly): lane j accumulates k = j, j + 16, j + 32, ... in increasing k with
//   a fused multiply-add; the last partial group of 16 reads zeros past K.
// - bf16: the order of AVX512_BF16's vdpbf16ps, which runs at twice the fp32 fma rate: lane j takes
//   k = 32 g + 2 j + 1 then 32 g + 2 j for g = 0, 1, ... (zeros past K), each step an fp32 fma with
//   bf16/fp32 denormal inputs read as zero and a denormal result flushed to zero (the instruction's
//   fixed DAZ/FTZ, whatever MXCSR says). Machines without AVX512_BF16 emulate exactly that (tested
//   against the instruction on 3.2M lanes with denormal cases).
// Nothing else enters an element's arithmetic: the register tiles (rows x output features, one
// 16-lane accumulator per element), the thread split (at::parallel_for over row chunks and feature
// blocks) and the instruction set only change which elements are computed together. The back ends
// (AVX-512, AVX2 with two 8-lane halves, scalar std::fma) run the same operations on the same lanes,
// so they give the same bits (the tests compare them), and so does every x86-64 machine (IEEE fp32,
// no -ffast-math, no flush-to-zero in MXCSR: torch's default).
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

// vdpbf16ps's denormal rule on one fp32 value: a denormal becomes a zero of its sign
inline float flush_denormal(float v) {
  uint32_t u = __builtin_bit_cast(uint32_t, v);
  if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
  return __builtin_bit_cast(float, u);
}

// ---- back ends: a 16-lane fp32 vector V with load / fma / reduce -------------------------------
// and, for bf16, P: 32 bf16 as 16 lanes of (odd, even) pairs with dot2 (vdpbf16ps's step)

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
  static constexpr bool kHasPairs = true;
  struct P { V odd, even; };  // bf16 pairs widened, denormals read as zero
  static inline P load_pairs(const c10::BFloat16* p) {
    P r;
    for (int i = 0; i < kLanes; ++i) {
      r.odd.v[i] = flush_denormal(widen(p[2 * i + 1]));
      r.even.v[i] = flush_denormal(widen(p[2 * i]));
    }
    return r;
  }
  static inline void keep_in_register(P&) {}
  static inline void dot2(const P& a, const P& b, V& acc) {
    for (int i = 0; i < kLanes; ++i) {
      const float t = flush_denormal(std::fma(a.odd.v[i], b.odd.v[i], acc.v[i]));
      acc.v[i] = flush_denormal(std::fma(a.even.v[i], b.even.v[i], t));
    }
  }
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
  static inline __m256 flush(__m256 v) {  // denormal lanes -> zeros of their sign
    const __m256i u = _mm256_castps_si256(v);
    const __m256i tiny = _mm256_cmpeq_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7f800000)), _mm256_setzero_si256());
    return _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_andnot_si256(_mm256_set1_epi32(0x80000000), tiny), u));
  }
  static constexpr bool kHasPairs = true;
  struct P { V odd, even; };
  static inline void pairs8(const c10::BFloat16* p, __m256& odd, __m256& even) {
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));  // 8 x (even | odd << 16)
    odd = flush(_mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(0xffff0000))));
    even = flush(_mm256_castsi256_ps(_mm256_slli_epi32(u, 16)));
  }
  static inline P load_pairs(const c10::BFloat16* p) {
    P r;
    pairs8(p, r.odd.lo, r.even.lo);
    pairs8(p + 16, r.odd.hi, r.even.hi);
    return r;
  }
  static inline void keep_in_register(P& p) { keep_in_register(p.odd); keep_in_register(p.even); }
  static inline void dot2(const P& a, const P& b, V& acc) {
    acc.lo = flush(_mm256_fmadd_ps(a.even.lo, b.even.lo, flush(_mm256_fmadd_ps(a.odd.lo, b.odd.lo, acc.lo))));
    acc.hi = flush(_mm256_fmadd_ps(a.even.hi, b.even.hi, flush(_mm256_fmadd_ps(a.odd.hi, b.odd.hi, acc.hi))));
  }
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
#if defined(__AVX512BF16__)
  static constexpr bool kHasPairs = true;
  using P = __m512bh;  // 32 bf16 as they lie in memory
  static inline P load_pairs(const c10::BFloat16* p) {
    return (__m512bh)_mm512_loadu_si512(p);
  }
  static inline void keep_in_register(P& p) { asm("" : "+v"(p)); }
  static inline void dot2(const P& a, const P& b, V& acc) { acc = _mm512_dpbf16_ps(acc, a, b); }
#else
  static constexpr bool kHasPairs = false;  // bf16 runs on Avx2 (see linear())
#endif
  static inline V load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline void fma(const V& a, const V& b, V& acc) { acc = _mm512_fmadd_ps(a, b, acc); }
  static inline void keep_in_register(V& v) { asm("" : "+v"(v)); }
  // 16 sums of 16 / C rows x C features (row-major) + bias[0..C), rounded to T (round to nearest
  // even, NaN to 0x7fc0 in bf16: c10::BFloat16's rounding), stored to y rows ldy apart
  template <typename T, int C>
  static inline void store_rows(const float* sums, const T* bias, T* y, int64_t ldy) {
    V s = _mm512_load_ps(sums);
    if (bias != nullptr) {
      alignas(64) float b[C];
      for (int c = 0; c < C; ++c) b[c] = widen(bias[c]);
      if constexpr (C == 4) s = _mm512_add_ps(s, _mm512_broadcast_f32x4(_mm_load_ps(b)));
      if constexpr (C == 8) s = _mm512_add_ps(s, _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_load_pd(reinterpret_cast<const double*>(b)))));
      if constexpr (C == 16) s = _mm512_add_ps(s, _mm512_load_ps(b));
    }
    if constexpr (std::is_same_v<T, float>) {
      alignas(64) float out[16];
      _mm512_store_ps(out, s);
      for (int r = 0; r < 16 / C; ++r) std::memcpy(y + r * ldy, out + r * C, C * sizeof(float));
    } else {
      const __m512i u = _mm512_castps_si512(s);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      __m512i h = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
      h = _mm512_mask_mov_epi32(h, _mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
      alignas(32) uint16_t out[16];
      _mm256_store_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(h));
      for (int r = 0; r < 16 / C; ++r) std::memcpy(y + r * ldy, out + r * C, C * sizeof(uint16_t));
    }
  }
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

template <typename T>
constexpr bool kPairs = std::is_same_v<T, c10::BFloat16>;  // bf16: vdpbf16ps's order (see the header)

// one step's operands: 16 k as V (fma), or for bf16 32 k as P (pairs, dot2)
template <class I, typename T>
inline auto load_step(const T* p) {
  if constexpr (kPairs<T>) return I::load_pairs(p);
  else return I::load(p);
}
template <class I, class Operand>
inline void multiply_add(const Operand& a, const Operand& b, typename I::V& acc) {
  if constexpr (std::is_same_v<Operand, typename I::V>) I::fma(a, b, acc);
  else I::dot2(a, b, acc);
}

// noinline: inlined into the driver, GCC kept the accumulators in memory (a store per fma)
template <class I, typename T, int R>
__attribute__((noinline)) void tile(const T* const* xr, const T* const* wr, int64_t K, float* sums) {
  constexpr int C = I::cols(R);
  constexpr int G = kPairs<T> ? 2 * kLanes : kLanes;  // k per step
  typename I::V acc[R * C];
#pragma GCC unroll 16
  for (int i = 0; i < R * C; ++i) acc[i] = I::zero();
  // one group of G k: xs[r] + k, ws[c] + k. keep_in_register: else GCC folds the loads into the
  // fmas (R + R * C loads per step instead of R + C)
  auto step = [&](const T* const* xs, const T* const* ws, int64_t k) __attribute__((always_inline)) {
    using Operand = decltype(load_step<I>(xs[0]));
    Operand xv[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      xv[r] = load_step<I>(xs[r] + k);
      I::keep_in_register(xv[r]);
    }
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      Operand wv = load_step<I>(ws[c] + k);
      I::keep_in_register(wv);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) multiply_add<I>(xv[r], wv, acc[r * C + c]);
    }
  };
  const int64_t full = K / G * G;
  for (int64_t k = 0; k < full; k += G) step(xr, wr, k);
  if (full < K) {  // the last partial group: zeros past K (fma(0, 0, a) on those lanes)
    T xt[R][G], wt[C][G];
    const T* xp[R];
    const T* wp[C];
    for (int r = 0; r < R; ++r) {
      for (int i = 0; i < G; ++i) xt[r][i] = full + i < K ? xr[r][full + i] : T(0.f);
      xp[r] = xt[r];
    }
    for (int c = 0; c < C; ++c) {
      for (int i = 0; i < G; ++i) wt[c][i] = full + i < K ? wr[c][full + i] : T(0.f);
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
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<I, Avx512> && R * C == 16 && !std::is_same_v<T, c10::Half>) {
    if (valid == C) {  // a whole tile: the epilogue in vector registers
      Avx512::store_rows<T, C>(sums, bias == nullptr ? nullptr : bias + n0, y + m0 * N + n0, N);
      return;
    }
  }
#endif
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
    } else if constexpr (kPairs<scalar_t> && !I::kHasPairs) {
      TORCH_CHECK(false, "invariant_linear: bf16 needs AVX512_BF16 or the avx2 back end here");
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
#if !defined(__AVX512BF16__)  // no vdpbf16ps: bf16 takes the AVX2 emulation of its order
  if (chosen == Avx512::name && x.scalar_type() == at::kBFloat16) return run<Avx2>(x, w, bias);
#endif
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
