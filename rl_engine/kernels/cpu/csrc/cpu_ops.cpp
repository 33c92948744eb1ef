// CPU kernels of rl_engine's hot decode ops (built by rl_engine/kernels/cpu/__init__.py through
// torch.utils.cpp_extension). Each op mirrors its torch reference in rl_engine/kernels/reference.py:
// same arguments, fp32 math, and the same intermediate roundings to the storage dtype, so results
// differ from the reference only by fp32 summation order. Threads come from ATen's intra-op pool
// (at::parallel_for: torch's own OpenMP runtime and thread count, no second runtime); inner loops
// are plain C++ over contiguous rows that the compiler vectorises (-O3 -march=native, omp simd), except
// the paged decode attention's, the one-row linear's and the greedy pick's (AVX-512 or AVX2 intrinsics, written
// once over per-ISA vector traits).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <pybind11/numpy.h>

#include "fast_exp.h"

// The vector paths' instruction set, chosen at compile time from the flags (-march=native): RL_AVX512 where the
// CPU has AVX-512 F with the BW and VL extensions (masked 16-bit loads), else RL_AVX2 where it has AVX2, FMA and
// F16C. A CPU with AVX-512 F alone (Knights Landing) takes the AVX2 path. -DRL_ENGINE_PORTABLE builds the
// portable C++ loops only (the benchmark's baseline: what a CPU with neither gets); isa() says which one a build has.
#if !defined(RL_ENGINE_PORTABLE) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define RL_AVX512 1
#elif !defined(RL_ENGINE_PORTABLE) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define RL_AVX2 1
#endif
#if defined(RL_AVX512) || defined(RL_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace {

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

// Round an fp32 value to the storage type (identity for float).
template <typename T>
inline T from_f(float x) { return static_cast<T>(x); }

using rl_engine_cpu::fast_exp;  // fast_exp.h: Cephes' expf, vectorisable (clamps to [-87.3, 88])
#if defined(RL_AVX512)
using rl_engine_cpu::fast_exp16;  // fast_exp.h: the same expression on 16 lanes
#endif

inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float* __restrict y, float a, const float* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

template <typename T>
inline const float* as_float_row(const T* src, float* buf, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) buf[i] = to_f(src[i]);
  return buf;
}

template <>
inline const float* as_float_row<float>(const float* src, float*, int64_t) { return src; }

// ---- vector traits ---------------------------------------------------------------------------
// Each vector path's instruction set as a small struct of static functions over W fp32 lanes (loads that widen
// bf16 and fp16 rows, FMA, reductions, masks); the kernels below are written once over them (template <class ISA>)
// and each build instantiates its own. AVX-512: 16 lanes in 32 registers, masks in k-registers; AVX2 (+FMA, F16C):
// 8 lanes in 16 registers, masks as all-ones lanes. kAccRegs: the accumulator vectors a loop may keep (half the
// registers, the rest for loads and broadcasts); kWholeRows: tile_dots' loop order.
#if defined(RL_AVX512)
struct Avx512 {
  using V = __m512;
  using I = __m512i;  // int32 lanes (the greedy pick's indices)
  using M = __mmask16;  // a compare's lanes
  static constexpr int W = 16;
  static constexpr int kAccRegs = 16;
  static constexpr bool kWholeRows = true;  // tile_dots' loop order
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const at::BFloat16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static V load(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  // the first n (< W) elements, zeros after them (masked loads: nothing past p + n is read)
  static V load_part(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(part_mask(n), p); }
  static V load_part(const at::BFloat16* p, int64_t n) {
    const __m256i h = _mm256_maskz_loadu_epi16(part_mask(n), reinterpret_cast<const void*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c, rounded once
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static float reduce_add(V v) { return _mm512_reduce_add_ps(v); }
  static float reduce_max(V v) { return _mm512_reduce_max_ps(v); }
  // r[i] = the sum of v[i]'s 16 lanes: a transpose-and-add tree (15 shuffle pairs for 16 sums, where 16 horizontal
  // reductions take ~4 each)
  static V sum_lanes(const V* v) {
    V u[8], w[4];
    for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of a = v[2i], b = v[2i+1]
      u[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i)  // per lane: the lane sums of v[4i .. 4i+3]
      w[i] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const V s01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const V s23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  // v's lanes as GC runs of W / GC, run g stored at s + g * s_stride
  template <int GC>
  static void store_runs(float* s, int64_t s_stride, V v) {
    if constexpr (GC == 1) {
      _mm512_storeu_ps(s, v);
    } else if constexpr (GC == 2) {
      _mm256_storeu_ps(s, _mm512_castps512_ps256(v));
      _mm256_storeu_ps(s + s_stride, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    } else {
      static_assert(GC == 4, "runs of 16, 8 or 4 lanes");
      _mm_storeu_ps(s, _mm512_extractf32x4_ps(v, 0));
      _mm_storeu_ps(s + s_stride, _mm512_extractf32x4_ps(v, 1));
      _mm_storeu_ps(s + 2 * s_stride, _mm512_extractf32x4_ps(v, 2));
      _mm_storeu_ps(s + 3 * s_stride, _mm512_extractf32x4_ps(v, 3));
    }
  }
  // masks and int32 lanes (the greedy pick)
  static M none() { return 0; }
  static M gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M is_nan(V a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
  static M either(M a, M b) { return a | b; }
  static bool any(M m) { return m != 0; }
  static V select(M m, V a, V b) { return _mm512_mask_mov_ps(b, m, a); }  // a where m, else b
  static I select(M m, I a, I b) { return _mm512_mask_mov_epi32(b, m, a); }
  static I iota(int32_t first) {
    return _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                            _mm512_set1_epi32(first));
  }
  static I add(I a, int32_t b) { return _mm512_add_epi32(a, _mm512_set1_epi32(b)); }
  // the smallest of ix's lanes where v == x; INT32_MAX where none is
  static int32_t first_equal(V v, I ix, float x) {
    const M eq = _mm512_cmp_ps_mask(v, _mm512_set1_ps(x), _CMP_EQ_OQ);
    return eq ? _mm512_mask_reduce_min_epi32(eq, ix) : std::numeric_limits<int32_t>::max();
  }

  // the first n (< 16: a row's tail) of 16 lanes
  static __mmask16 part_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
};
using Isa = Avx512;

#elif defined(RL_AVX2)
struct Avx2 {
  using V = __m256;
  using I = __m256i;
  using M = __m256;  // all-ones lanes where a compare holds
  static constexpr int W = 8;
  static constexpr int kAccRegs = 8;
  static constexpr bool kWholeRows = false;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const at::BFloat16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static V load(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  // the first n (< W) elements, zeros after them (through a copy: AVX2 has no masked 16-bit loads)
  template <typename T>
  static V load_part(const T* p, int64_t n) {
    T buf[8] = {};
    std::copy(p, p + std::min<int64_t>(n, 8), buf);
    return load(buf);
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static float reduce_add(V v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
  }
  static float reduce_max(V v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return std::max(_mm_cvtss_f32(h), _mm_cvtss_f32(_mm_shuffle_ps(h, h, 1)));
  }
  // r[i] = the sum of v[i]'s 8 lanes (Avx512::sum_lanes' tree at half the width)
  static V sum_lanes(const V* v) {
    V u[4], w[2];
    for (int i = 0; i < 4; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of a = v[2i], b = v[2i+1]
      u[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 2; ++i)  // per 128-bit lane: the lane sums of v[4i .. 4i+3]
      w[i] = _mm256_add_ps(_mm256_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm256_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm256_add_ps(_mm256_permute2f128_ps(w[0], w[1], 0x20), _mm256_permute2f128_ps(w[0], w[1], 0x31));
  }
  template <int GC>
  static void store_runs(float* s, int64_t s_stride, V v) {
    if constexpr (GC == 1) {
      _mm256_storeu_ps(s, v);
    } else if constexpr (GC == 2) {
      _mm_storeu_ps(s, _mm256_castps256_ps128(v));
      _mm_storeu_ps(s + s_stride, _mm256_extractf128_ps(v, 1));
    } else {
      static_assert(GC == 4, "runs of 8, 4 or 2 lanes");
      const __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
      _mm_storel_pi(reinterpret_cast<__m64*>(s), lo);
      _mm_storeh_pi(reinterpret_cast<__m64*>(s + s_stride), lo);
      _mm_storel_pi(reinterpret_cast<__m64*>(s + 2 * s_stride), hi);
      _mm_storeh_pi(reinterpret_cast<__m64*>(s + 3 * s_stride), hi);
    }
  }
  static M none() { return _mm256_setzero_ps(); }
  static M gt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static M is_nan(V a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
  static M either(M a, M b) { return _mm256_or_ps(a, b); }
  static bool any(M m) { return _mm256_movemask_ps(m) != 0; }
  static V select(M m, V a, V b) { return _mm256_blendv_ps(b, a, m); }
  static I select(M m, I a, I b) {
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(b), _mm256_castsi256_ps(a), m));
  }
  static I iota(int32_t first) {
    return _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(first));
  }
  static I add(I a, int32_t b) { return _mm256_add_epi32(a, _mm256_set1_epi32(b)); }
  static int32_t first_equal(V v, I ix, float x) {
    const M eq = _mm256_cmp_ps(v, _mm256_set1_ps(x), _CMP_EQ_OQ);
    const __m256i c = select(eq, ix, _mm256_set1_epi32(std::numeric_limits<int32_t>::max()));
    __m128i h = _mm_min_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    h = _mm_min_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(1, 0, 3, 2)));
    h = _mm_min_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(h);
  }
};
using Isa = Avx2;
#endif

#if defined(RL_AVX512) || defined(RL_AVX2)
// How a kernel forms dot products: FmaDot, fp32 FMAs of an fp32 operand (converted beforehand: the decode's scaled
// query, the gemv's x) with a row widened from its storage type, W elements a step; where the CPU has avx512_bf16,
// Bf16Dot: bf16 pairs' exact products summed in fp32 (vdpbf16ps) from both operands as stored, 2W elements a step.
// The same products and sums in the same order per lane as before they were shared (bit for bit).
template <class ISA, typename T>
struct FmaDot {
  using Q = float;  // the first operand's element type
  using QV = typename ISA::V;
  using KV = typename ISA::V;
  static constexpr int kStep = ISA::W;
  static constexpr bool kStoredQuery = false;  // operands as stored (and the decode's scale after the sum)
  static constexpr bool kWholeRows = ISA::kWholeRows;  // tile_dots' loop order
  static QV load_q(const float* p) { return ISA::load(p); }
  static KV load_k(const T* p) { return ISA::load(p); }
  static typename ISA::V madd(typename ISA::V acc, QV q, KV k) { return ISA::fma(q, k, acc); }
};
#if defined(RL_AVX512) && defined(__AVX512BF16__)
struct Bf16Dot {
  using Q = at::BFloat16;
  using QV = __m512bh;
  using KV = __m512bh;
  static constexpr int kStep = 32;
  static constexpr bool kStoredQuery = true;
  static constexpr bool kWholeRows = false;
  static QV load_q(const at::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(p)); }
  static KV load_k(const at::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(p)); }
  static __m512 madd(__m512 acc, QV q, KV k) { return _mm512_dpbf16_ps(acc, q, k); }
};
// bf16 by avx512_bf16's dot where the CPU has it (measured, AVX-512 decode at 40M shapes, 2 threads: bf16 452 us a
// call widening K rows, 396 us by the dot), in whole steps of 32 (the decode's head dim DC; the gemv runs its tail
// of K by FmaDot)
template <typename T, int DC>
using DotOf = std::conditional_t<std::is_same_v<T, at::BFloat16> && DC % 32 == 0, Bf16Dot, FmaDot<Isa, T>>;
#else
template <typename T, int DC>
using DotOf = FmaDot<Isa, T>;
#endif
#endif

// ---- paged decode attention -----------------------------------------------------------------
// One task per request (per (request, kv head) when there are fewer requests than threads): for
// each cache block, the scores of every query head against its kv head's rows (the G query heads of
// a GQA group share each K row read), then a running max / sum / accumulator per query head (online
// softmax), so K and V are read once, in place in their blocks, token row after token row.
// DC > 0: the head dim as a compile-time constant (the common ones), so that the per-row dot
// products and updates compile to straight vector code instead of loops with runtime trip counts
// (measured ~1.5x on head_dim 32); DC = 0 handles any other head dim.
// Shared by both decode kernels: a task's query heads h_first .. h_first + HG - 1 of request b, scaled, in fp32
// (false, with zeros written: a padding request, like the reference), its softmax state reset; and its output.
template <typename T>
inline bool begin_task(const T* q, int64_t q_s0, int64_t q_s1, int64_t b, int64_t h_first, int64_t HG, int64_t D,
                       float scale, int64_t L, T* o, float* qf, std::vector<float>& acc, std::vector<float>& m,
                       std::vector<float>& l) {
  if (L <= 0) {
    std::fill(o, o + HG * D, from_f<T>(0.f));
    return false;
  }
  for (int64_t j = 0; j < HG; ++j) {
    const T* qr = q + b * q_s0 + (h_first + j) * q_s1;
    for (int64_t d = 0; d < D; ++d) qf[j * D + d] = to_f(qr[d]) * scale;
  }
  std::fill(acc.begin(), acc.end(), 0.f);
  std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
  std::fill(l.begin(), l.end(), 0.f);
  return true;
}

template <typename T>
inline void end_task(const std::vector<float>& acc, const std::vector<float>& l, T* o, int64_t HG, int64_t D) {
  for (int64_t j = 0; j < HG; ++j) {
    const float inv = 1.f / l[j];
    for (int64_t d = 0; d < D; ++d) o[j * D + d] = from_f<T>(acc[j * D + d] * inv);
  }
}

// One block of the online softmax: scores sj[0 .. n) become exp(s - m_new) in place, the running max m and sum l
// move to the block's; returns the factor the accumulator is rescaled by (~0 on the first block, where m = -inf
// and acc and l are 0).
inline float softmax_block(float* sj, int64_t n, float block_max, float& m, float& l) {
  const float m_new = std::max(m, block_max);
  const float corr = fast_exp(m - m_new);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < n; ++t) {
    sj[t] = fast_exp(sj[t] - m_new);
    sum += sj[t];
  }
  l = l * corr + sum;
  m = m_new;
  return corr;
}

template <typename T, int DC>
void paged_decode_kernel(const T* q, int64_t q_s0, int64_t q_s1, const T* kc, const T* vc,
                         const int32_t* tables, int64_t table_stride, const int32_t* lens, T* out,
                         int64_t B, int64_t Hq, int64_t Hkv, int64_t D_runtime, int64_t bs, float scale,
                         int64_t max_len, int64_t num_blocks, std::atomic<bool>& bad_block) {
  const int64_t D = DC > 0 ? DC : D_runtime;
  const int64_t G = Hq / Hkv;
  const int64_t tok = Hkv * D;  // elements per cached token
  const int64_t split = B < at::get_num_threads() ? Hkv : 1;  // kv heads per request split over tasks
  const int64_t heads_per_task = Hkv / split;
  const int64_t work = std::max<int64_t>(1, max_len * D * G * heads_per_task);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / work);
  at::parallel_for(0, B * split, grain, [&](int64_t begin, int64_t end) {
    const int64_t HG = heads_per_task * G;
    std::vector<float> qf(HG * D), acc(HG * D), s(HG * bs), m(HG), l(HG), kbuf(tok), vbuf(tok);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / split, h0 = (task % split) * heads_per_task;
      T* o = out + (b * Hq + h0 * G) * D;
      const int64_t L = lens[b];
      if (!begin_task(q, q_s0, q_s1, b, h0 * G, HG, D, scale, L, o, qf.data(), acc, m, l)) continue;
      const int32_t* table = tables + b * table_stride;
      for (int64_t start = 0; start < L; start += bs) {
        const int64_t n = std::min(bs, L - start);
        const int64_t block = table[start / bs];
        if (block < 0 || block >= num_blocks) {  // reported after the loop; never read outside the cache
          bad_block = true;
          break;
        }
        const T* kb = kc + block * bs * tok + h0 * D;
        const T* vb = vc + block * bs * tok + h0 * D;
        for (int64_t t = 0; t < n; ++t) {
          const float* kr = as_float_row(kb + t * tok, kbuf.data(), heads_per_task * D);
          for (int64_t hh = 0; hh < heads_per_task; ++hh)
            for (int64_t g = 0; g < G; ++g) {
              const int64_t j = hh * G + g;
              s[j * bs + t] = dot(qf.data() + j * D, kr + hh * D, D);
            }
        }
        for (int64_t j = 0; j < HG; ++j) {
          float* sj = s.data() + j * bs;
          float block_max = sj[0];
          for (int64_t t = 1; t < n; ++t) block_max = std::max(block_max, sj[t]);
          const float corr = softmax_block(sj, n, block_max, m[j], l[j]);
          float* aj = acc.data() + j * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) aj[d] *= corr;
        }
        for (int64_t t = 0; t < n; ++t) {
          const float* vr = as_float_row(vb + t * tok, vbuf.data(), heads_per_task * D);
          for (int64_t hh = 0; hh < heads_per_task; ++hh)
            for (int64_t g = 0; g < G; ++g) {
              const int64_t j = hh * G + g;
              axpy(acc.data() + j * D, s[j * bs + t], vr + hh * D, D);
            }
        }
      }
      end_task(acc, l, o, HG, D);
    }
  });
}

// The vector decode kernel (paged_decode_vec, AVX-512 or AVX2): the same task split and online softmax as
// paged_decode_kernel (updated per chunk of blocks, below, not per block), with the head dim DC a multiple of the
// vector width W (16 floats, AVX2's 8) held in registers, and the query heads of a GQA group taken GC = 4, 2 or 1 at
// a time ("a pass"): each K row of a block is loaded once per pass and scored against all GC heads, and each V row
// (bf16 and fp16 widened to fp32) once per pass and accumulated into all GC heads' outputs. Scores: GC heads x
// W / GC tokens of partial dot products, summed by one transpose-and-add (sum_lanes) into a vector of W scores
// (head-major, the partial sums' order), stored per head. Written once over the ISA's traits (Isa: Avx512 or Avx2).
// AVX-512 at head dim 32, GQA 4, a task of two kv heads: both heads' passes through a chunk at once (fused_chunk).
// AVX-512, measured against one head at a time (the kernel before, K/V rows re-read from L1 per head; 2 threads,
// through the lock at load ~10, 40M shapes: 64 rows, 8 query / 2 kv heads of dim 64, 80-192 keys in 16-token
// blocks, 8 layers' 128 MB pools, tables filled like the block manager's): fp32 679 -> 640 us a call
// (memory-bound: ~14 GB/s), bf16 541 -> 452 us widening K, 396 us with avx512_bf16's dot; over randomly
// scattered blocks fp32 773 -> 770, bf16 664 -> 567.
// A task walks its sequence in chunks of up to kChunkTokens keys: consecutive cache blocks (each one contiguous run of
// K and of V) scored one after another, then one online-softmax update and one accumulator pass for the whole chunk.
// Against one update per 16-token block (AVX-512, 40m shapes: 64 rows, 8 / 2 heads of 64, contexts 80-191, 8 layers'
// pools of the engine's 1 GiB, tables filled like the block manager's, 2 threads, through the lock, two alternated
// rounds): bf16 389-458 -> 254-308 us a layer call, fp32 638-652 -> 544-566 (64-token blocks, one block a chunk
// either way: 281-340 and 465-551); timed inside the engine's 40m bf16 batch-64 run, median 529-606 -> 424-446 us.
constexpr int64_t kChunkTokens = 64;
template <typename T>
struct Chunk {
  const T* k[kChunkTokens];  // each block's first K row of the task's kv head
  const T* v[kChunkTokens];
  int64_t n[kChunkTokens];  // its keys
  int64_t count = 0;  // blocks
  int64_t tokens = 0;  // keys in all
};
#if defined(RL_AVX512) || defined(RL_AVX2)
// Prefetches (into L2) of the cache blocks a thread's tasks read next: blocks lie anywhere in a cache far larger than
// L3, and each is one contiguous bs * tok run of K and one of V that would otherwise be fetched line by line as the
// loops reach them. A cursor walks the thread's tasks' tables (across tasks) up to `target` blocks, counted from the
// thread's first task; pump(n) issues the next n lines of K and n of V. At head dims of 32 and more (kPumped) the
// score loop (a K tile) and the value loop (a V row) pump row_lines each, up to two chunks past the one being read
// (one in fused_chunk), so that the prefetches go out spread over the work (the value loop alone visits each token
// once per kv head of the task, so row_lines = a token's K lines / those heads, and one more, keeps the cursor ahead);
// at head dim 16 (the RL rollout's tiny model: a few instructions a row) one burst at each chunk's start fetches the
// next chunk.
// Against one burst a chunk of the next chunk's blocks (or the next task's first block), inside the engine's generate
// (64 prompts of 16-128 tokens, 128 new greedy, 1 thread, every call timed, the two builds alternated in one process,
// through the lock at load 5.7-7.5): benchmarks/generate.py's ~3.5M model (head dim 32, 8 runs each) the decode
// attention's time a run 360 -> 242 ms median (0.67x), the whole run 0.92-0.93x; --large's ~50M (head dim 64, 3 runs
// each) 1522 -> 1017 ms median (0.67x), best 1408 -> 1001, the whole run 0.94-0.98x. The tiny rollout (head dim 16,
// 1 and 2 threads, 12 runs, load ~5): 0.98x median, 1.03-1.05x best, within the noise. Tried: the same pumping at
// head dim 16 cost the rollout 1.12-1.15x (a pump check a V row of two FMAs a head); a fixed two lines a row left
// --large's cursor behind (1.14x: 8 K lines a token); one burst two or three chunks ahead as one ahead (0.85x on the
// ~3.5M model); into L1 (T0), 1.11x.
template <int DC>
constexpr bool kPumped = DC >= 32;
struct Prefetcher {
  const char* kc;
  const char* vc;
  const int32_t* tables;
  int64_t table_stride;
  const int32_t* lens;
  int64_t split, bs, block_bytes, num_blocks, end;
  int row_lines;  // lines a pump of a loop: a token's K lines over the task's kv heads, and one more
  int64_t task, block = 0, off = 0, issued = 0, target = 0;
  const char* kn = nullptr;
  const char* vn = nullptr;
  inline void pump(int n) {
    for (; n > 0 && issued < target; --n) {
      if (kn == nullptr && !next_block()) return;
      _mm_prefetch(kn + off, _MM_HINT_T1);
      _mm_prefetch(vn + off, _MM_HINT_T1);
      off += 64;
      if (off >= block_bytes) kn = vn = nullptr, off = 0, ++block, ++issued;
    }
  }
  void skip_to(int64_t blocks) {  // a cursor behind the blocks being read moves on without prefetching them
    for (; issued < blocks; kn = vn = nullptr, off = 0, ++block, ++issued)
      if (kn == nullptr && !next_block()) return;
  }
  bool next_block() {  // kn, vn: the cursor's block (skipping those outside the cache); false past the last task
    while (task < end) {
      const int64_t L = lens[task / split];
      if (block >= (L > 0 ? (L + bs - 1) / bs : 0)) {
        ++task, block = 0;
        continue;
      }
      const int64_t b = tables[task / split * table_stride + block];
      if (b < 0 || b >= num_blocks) {
        ++block, ++issued;
        continue;
      }
      kn = kc + b * block_bytes, vn = vc + b * block_bytes;
      return true;
    }
    issued = target;
    return false;
  }
};
// part[g * TT + tt] = W partial sums of the dot product of query head g (of GC) with K row tt of a tile of
// TT = W / GC rows from kr (tok apart), nt of them present (Full: all; the others' sums stay 0); head-major, so that
// sum_lanes' scores come out in the order they are stored. The query heads
// are Dot's operand: the scaled fp32 heads (qf [GC][DC], q_stride DC) or those stored (q_stride q_s1). The loop
// order is Dot's (kWholeRows): AVX-512's FMA dots hold a whole K row in registers (32 of them) while it is scored
// against the GC heads (query chunks from L1, or held in registers: kHeldQuery below), rows read in order; AVX2
// and the bf16 dot go chunk by chunk over the head dim, each query chunk loaded once for the tile's rows and each K
// chunk once for the GC heads, GC + TT loads per W FMAs (AVX2 at GC = 4 and head dim 64: the query alone would fill
// 32 registers, it has 16). The same sums in the same order either way. On AVX-512 (decode_isa.py's cells, 1
// thread, A/B in one run through the lock at load ~9): fp32 40m rows 64 1328 us a layer call chunked, 1203-1227 by
// whole rows; bf16 3m rows 64 242 chunked, 256-263 by whole rows.
// By whole rows where the GC heads' query vectors, the tile's W sums and a K row fit the 32 registers together
// (kHeldQuery, AVX-512 FmaDot: head dim 32 at passes of 1, 2 or 4 heads, 16 at 1 or 4 (2: pair_scores), 64 at 1
// or 2, 128 at 1; the ~3.5M model's head dim 32 at GQA 4 among them), the query vectors come loaded once a block
// (qv [GC][CN], from group_scores) and the K row is pinned in registers (an empty asm): GCC otherwise folded each
// query chunk into its FMA as a load from L1 (16 zmm loads a token) and copied the K row into the sums, spilling it
// to the stack and reloading it per head. The same FMAs in the same order (bit for bit). decode_isa.py's 3m fp32
// cell (64 rows, 1 thread, builds alternated in one process through the lock at load ~3.5): 286 -> 244 us a layer
// call (pair ratio 0.86); with the value loop's V rows pinned too (fused_chunk) and softmax_heads, 258 -> 216 us
// (0.84, load ~1.3). Inside the engine's generate (~3.5M model, batch 64, 128 new greedy tokens, 1 thread, the two
// builds alternated in one engine, 10 runs each, load ~1.5) the decode attention's time a run 130.3 -> 114.5 ms
// median (pair ratio 0.89), the whole run 0.984 (9 of 10 pairs faster; an earlier round: 0.87 and 0.983, 10 of
// 10). The other shapes it takes (this build against the one before it, softmax_heads included; 64 rows, contexts
// 80-192, fp32 unless said, 1 thread, alternated in one process through the lock at load 0.8-2.4, pair ratios):
// 8 / 4 heads of 64 0.94-0.95, 8 / 8 of 128 0.95-0.96, 8 / 2 of 16 0.94, fp16 8 / 2 of 32 0.94-0.95; but head dim
// 32 in passes of 2 or 1 heads (the `small` preset's 4 / 2, and 4 / 4, 8 / 8) 1.00-1.05, mostly ~1.02.
template <class Dot, int DC, int GC>
constexpr bool kHeldQuery = Dot::kWholeRows && GC * (DC / Dot::kStep) + Isa::W + DC / Dot::kStep <= 2 * Isa::kAccRegs;
template <class Dot, typename T, int DC, int GC, bool Full>
inline void tile_dots(const typename Dot::Q* qh, int64_t q_stride, const typename Dot::QV* qv, const T* kr,
                      int64_t tok, int64_t nt, typename Isa::V* part) {
  constexpr int TT = Isa::W / GC, CN = DC / Dot::kStep;
  constexpr bool held = kHeldQuery<Dot, DC, GC>;
  for (int i = 0; i < Isa::W; ++i) part[i] = Isa::zero();
  if constexpr (Dot::kWholeRows) {
#pragma GCC unroll 16
    for (int tt = 0; tt < TT; ++tt) {
      if (Full || tt < nt) {
        typename Dot::KV kv[CN];
        for (int c = 0; c < CN; ++c) kv[c] = Dot::load_k(kr + tt * tok + Dot::kStep * c);
        if constexpr (held)
          for (int c = 0; c < CN; ++c) asm("" : "+v"(kv[c]));
        for (int g = 0; g < GC; ++g) {
          typename Isa::V a = part[g * TT + tt];
          for (int c = 0; c < CN; ++c)
            a = Dot::madd(a, held ? qv[g * CN + c] : Dot::load_q(qh + g * q_stride + Dot::kStep * c), kv[c]);
          part[g * TT + tt] = a;
        }
      }
    }
  } else {
    for (int c = 0; c < CN; ++c) {
      typename Dot::QV qv[GC];
      for (int g = 0; g < GC; ++g) qv[g] = Dot::load_q(qh + g * q_stride + Dot::kStep * c);
      for (int tt = 0; tt < TT; ++tt) {
        if (Full || tt < nt) {
          const typename Dot::KV kv = Dot::load_k(kr + tt * tok + Dot::kStep * c);
          for (int g = 0; g < GC; ++g) part[g * TT + tt] = Dot::madd(part[g * TT + tt], qv[g], kv);
        }
      }
    }
  }
}

// s[g * s_stride + t] = the scores of the pass's GC heads against the block's n K rows (kb, tok apart), a tile of
// W / GC rows at a time: GC heads x W / GC tokens of partial sums, summed by one transpose-and-add (sum_lanes) into
// W scores, head-major, stored per head (up to a tile past n: see group_chunk). Against the sums kept token-major
// and permuted head-major after sum_lanes (a vpermps a tile; decode_isa.py's cells, 64 rows, contexts 80-192,
// fp32, 1 thread, alternated with the build before in one process through the lock, thread time, pair ratios,
// group_values' V pin below included): 3m 0.98-1.00 of a layer call, 40m (head dim 64, group_chunk) 0.91-0.95;
// inside the engine's generate (~3.5M model, batch 64, 128 new greedy tokens, 12 runs each, load ~1.8) the decode
// attention's time a run 107.8 -> 106.2 ms (pair ratio 0.98); the ~50M model's (head dim 64, its KV from DRAM) 1.00.
template <typename T, int DC, int GC>
inline void group_scores(const float* qf, const T* qb, int64_t q_s1, float scale, const T* kb, int64_t tok, int64_t n,
                         float* s, int64_t s_stride, Prefetcher& pf) {
  using Dot = DotOf<T, DC>;
  constexpr int W = Isa::W, TT = W / GC;
  const typename Dot::Q* qh;
  int64_t q_stride;
  if constexpr (Dot::kStoredQuery) qh = qb, q_stride = q_s1;
  else qh = qf, q_stride = DC;
  constexpr int CN = DC / Dot::kStep;
  typename Dot::QV qv[GC * CN];  // the query vectors, where tile_dots holds them (kHeldQuery)
  if constexpr (kHeldQuery<Dot, DC, GC>)
    for (int g = 0; g < GC; ++g)
      for (int c = 0; c < CN; ++c) qv[g * CN + c] = Dot::load_q(qh + g * q_stride + Dot::kStep * c);
  for (int64_t t0 = 0; t0 < n; t0 += TT) {
    if constexpr (kPumped<DC>) pf.pump(pf.row_lines);
    typename Isa::V part[W];
    if (n - t0 >= TT) {
      tile_dots<Dot, T, DC, GC, true>(qh, q_stride, qv, kb + t0 * tok, tok, TT, part);
    } else {
      tile_dots<Dot, T, DC, GC, false>(qh, q_stride, qv, kb + t0 * tok, tok, n - t0, part);
    }
    typename Isa::V r = Isa::sum_lanes(part);
    if constexpr (Dot::kStoredQuery) r = Isa::mul(r, Isa::set1(scale));  // the reference's order: scale the sum
    Isa::template store_runs<GC>(s + t0, s_stride, r);
  }
}

// acc[g] = acc[g] * corr[g] + sum_t p[g][t] V[t] for the pass's GC heads (p = s[g * s_stride + t]): each V row
// loaded once for all of them, the accumulators in registers (kAccRegs: the head dim in chunks of CC vectors).
template <typename T, int DC, int GC>
inline void group_values(const float* s, int64_t s_stride, const Chunk<T>& ch, int64_t tok, const float* corr,
                         float* acc, Prefetcher& pf) {
  constexpr int W = Isa::W, V = DC / W;
  constexpr int CC = V < Isa::kAccRegs / GC ? V : Isa::kAccRegs / GC;
  static_assert(V % CC == 0, "the head dim in whole chunks of CC vectors");
  for (int c0 = 0; c0 < V; c0 += CC) {
    typename Isa::V av[GC][CC];
    for (int g = 0; g < GC; ++g) {
      const typename Isa::V cv = Isa::set1(corr[g]);
      for (int c = 0; c < CC; ++c) av[g][c] = Isa::mul(Isa::load(acc + g * DC + W * (c0 + c)), cv);
    }
    for (int64_t t = 0, i = 0; i < ch.count; ++i)
    for (int64_t u = 0; u < ch.n[i]; ++u, ++t) {
      const T* vr = ch.v[i] + u * tok + W * c0;
      if constexpr (kPumped<DC>) pf.pump(pf.row_lines);
      typename Isa::V p[GC];
      for (int g = 0; g < GC; ++g) p[g] = Isa::set1(s[g * s_stride + t]);
      for (int c = 0; c < CC; ++c) {
        typename Isa::V vv = Isa::load(vr + W * c);
        // AVX-512 fp32: one load a V chunk, as in fused_chunk (GCC folds it into each of the GC FMAs otherwise;
        // decode_isa.py's 40m cell, fp32, 1 thread: 0.98 of a layer call against the build without it)
        if constexpr (std::is_same_v<T, float> && GC > 1 && Isa::W == 16) asm("" : "+v"(vv));
        for (int g = 0; g < GC; ++g) av[g][c] = Isa::fma(p[g], vv, av[g][c]);
      }
    }
    for (int g = 0; g < GC; ++g)
      for (int c = 0; c < CC; ++c) Isa::store(acc + g * DC + W * (c0 + c), av[g][c]);
  }
}

#if defined(RL_AVX512)
// Pair scores (AVX-512, head dim 16, query heads two at a time: the RL rollout's tiny model, 4 query / 2 kv heads of
// 16), without sum_lanes' transpose-and-add trees: lane 4m + j of one vector holds dims 4m .. 4m + 3 of slot j (token
// j / 2 of two, query head j % 2), from 4 FMAs on the two K rows blended (two blends) and permuted within 128-bit
// lanes (three vpermilps) so that each lane meets its own token's four dims once, against four query coefficient
// vectors made once a chunk. Eight such vectors (16 tokens) then take two shuffle-and-add levels over their 128-bit
// lanes and two two-source permutes to head-major rows: 38 shuffles and 6 adds a 16 tokens x 2 heads where
// sum_lanes' trees took 62 and 30. One call at grpo_step's captured rollout shapes (128 rows, contexts 29 / 45 / 61,
// 1 thread, A/B in one process through the lock at load ~5): 48.6 / 63.9 / 79.3 -> 45.1 / 59.3 / 74.0 us; inside
// the engine's rollout (the tiny model, 128 sequences, 64 new tokens, 1 thread, every call timed, two runs of 12
// alternated), where K and V come from L3, 0.96-0.98 of the decode attention's time a run (medians). The same
// layout for GQA 4 (one token's vector: 4 heads x 4 dim groups, 4 FMAs a 16-dim chunk) took the ~3.4M model's
// calls to 0.94-0.98 in one process but to 1.12-1.15x inside the engine's generate: not used.
struct PairQuery {
  __m512 a[4];  // a[e][4m + j] = q[j % 2][4m + (j ^ e)]
};
inline PairQuery pair_query(const float* q0, const float* q1) {
  const __m512 x = _mm512_loadu_ps(q0), y = _mm512_loadu_ps(q1);
  PairQuery p;
  p.a[0] = _mm512_mask_blend_ps(0xAAAA, x, y);
  p.a[1] = _mm512_mask_blend_ps(0xAAAA, _mm512_permute_ps(x, 0xB1), _mm512_permute_ps(y, 0xB1));
  p.a[2] = _mm512_mask_blend_ps(0xAAAA, _mm512_permute_ps(x, 0x4E), _mm512_permute_ps(y, 0x4E));
  p.a[3] = _mm512_mask_blend_ps(0xAAAA, _mm512_permute_ps(x, 0x1B), _mm512_permute_ps(y, 0x1B));
  return p;
}
// lane 4m + j: the dot product over dims 4m .. 4m + 3 of query head j % 2 with row k0 (j < 2) or k1 (j >= 2)
inline __m512 pair_dots(const PairQuery& p, __m512 k0, __m512 k1) {
  const __m512 x = _mm512_mask_blend_ps(0xCCCC, k0, k1), y = _mm512_mask_blend_ps(0xCCCC, k1, k0);
  __m512 r = _mm512_mul_ps(p.a[0], x);
  r = _mm512_fmadd_ps(p.a[1], _mm512_permute_ps(x, 0xB1), r);
  r = _mm512_fmadd_ps(p.a[2], _mm512_permute_ps(y, 0x4E), r);
  return _mm512_fmadd_ps(p.a[3], _mm512_permute_ps(y, 0x1B), r);
}
// the 128-bit lane sums of a and b: [a0 + a2, a1 + a3, b0 + b2, b1 + b3], then of those [a, b, c, d] whole
inline __m512 lane_pairs(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                       _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
}
inline __m512 lane_sums(__m512 ab, __m512 cd) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
}
// s[g * s_stride + t] for g < 2, t < n: the scores of the pair against the block's n K rows (kb, tok apart), 16 at a
// time (rows past n as zeros; up to 15 scores past n written, as group_scores')
template <typename T>
inline void pair_scores(const PairQuery& p, const T* kb, int64_t tok, int64_t n, float* s, int64_t s_stride) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t t0 = 0; t0 < n; t0 += 16) {
    const int64_t nt = n - t0;
    const T* kr = kb + t0 * tok;
    __m512 r[8];
    if (nt >= 16) {
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) r[i] = pair_dots(p, Isa::load(kr + 2 * i * tok), Isa::load(kr + (2 * i + 1) * tok));
    } else {
      for (int i = 0; i < 8; ++i) {
        const __m512 k0 = 2 * i < nt ? Isa::load(kr + 2 * i * tok) : _mm512_setzero_ps();
        const __m512 k1 = 2 * i + 1 < nt ? Isa::load(kr + (2 * i + 1) * tok) : _mm512_setzero_ps();
        r[i] = pair_dots(p, k0, k1);
      }
    }
    const __m512 f0 = lane_sums(lane_pairs(r[0], r[1]), lane_pairs(r[2], r[3]));  // lane 2t + g, tokens 0 .. 7
    const __m512 f1 = lane_sums(lane_pairs(r[4], r[5]), lane_pairs(r[6], r[7]));  // tokens 8 .. 15
    _mm512_storeu_ps(s + t0, _mm512_permutex2var_ps(f0, even, f1));
    _mm512_storeu_ps(s + s_stride + t0, _mm512_permutex2var_ps(f0, odd, f1));
  }
}
// Scores by pair_scores: head dim 16, a pair of heads, K widened to fp32 (FmaDot)
template <typename T, int DC, int GC>
constexpr bool kPairScores = DC == 16 && GC == 2 && !DotOf<T, DC>::kStoredQuery;
#endif

// The largest of one head's n scores sj[0 .. n).
inline float block_max(const float* sj, int64_t n) {
  typename Isa::V mv = Isa::set1(-std::numeric_limits<float>::infinity());
  int64_t t = 0;
  for (; t + Isa::W <= n; t += Isa::W) mv = Isa::max(mv, Isa::load(sj + t));
  if (t < n && n >= Isa::W) {  // the last W scores, overlapping the ones already seen
    mv = Isa::max(mv, Isa::load(sj + n - Isa::W));
    t = n;
  }
  float mx = Isa::reduce_max(mv);
  for (; t < n; ++t) mx = std::max(mx, sj[t]);
  return mx;
}

// softmax_block of the vector kernel, for NH heads of a pass at once (scores s + g * s_stride, n of each; m, l, corr
// per head): each head's maximum and correction, then the same exp of each score in whole vectors of W scores (the
// last one's lanes past n computed on what the buffer holds there, written back and left out of the sum: s has room
// for them), the heads' vectors interleaved a vector at a time (NH independent chains where one head at a time waited
// on its own; decode_isa.py's 3m fp32 cell: 0.98 of a call), then each head's sum. Where the scalar form ran n % W
// scores one at a time (the compiler's loop tail, ~25 instructions each): at the RL rollout's ~45 keys a chunk that
// was most of a decode call's softmax.
template <int NH>
inline void softmax_heads(float* s, int64_t s_stride, int64_t n, float* m, float* l, float* corr) {
  constexpr int W = Isa::W;
  float m_new[NH];
  for (int g = 0; g < NH; ++g) {
    m_new[g] = std::max(m[g], block_max(s + g * s_stride, n));
    corr[g] = fast_exp(m[g] - m_new[g]);
  }
  float sums[NH][W] = {};
  for (int64_t t0 = 0; t0 < n; t0 += W) {
#pragma GCC unroll 8
    for (int g = 0; g < NH; ++g) {
      float* sj = s + g * s_stride;
      const float mg = m_new[g];
#pragma omp simd
      for (int u = 0; u < W; ++u) {
        const float e = fast_exp(sj[t0 + u] - mg);
        sj[t0 + u] = e;
        sums[g][u] += t0 + u < n ? e : 0.f;
      }
    }
  }
  for (int g = 0; g < NH; ++g) {
    // l * corr rounded, then the sum added: the empty asm keeps -ffp-contract=fast from fusing the two into one FMA,
    // which it does or not depending on where this inlines (fused_chunk's bits must equal group_chunk's, and both
    // those of the GCC builds before it; clang's -ffp-contract=on fused the one expression there, so its bits moved)
    float lc = l[g] * corr[g];
    asm("" : "+x"(lc));
    l[g] = lc + Isa::reduce_add(Isa::load(sums[g]));
    m[g] = m_new[g];
  }
}

// The dtypes of the vector kernel (others take paged_decode_kernel): fp16 rows widened by vcvtph2ps (F16C, or
// AVX-512 F's form).
template <typename T>
constexpr bool kVecDtype = std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>;
// One pass over a chunk for GC query heads j0 .. j0 + GC - 1 of the task (of one kv head). Each block's scores land
// after the previous block's (group_scores may write up to a vector past a block's end: the next block's overwrites
// them, and s_stride leaves room after the chunk).
template <typename T, int DC, int GC>
inline void group_chunk(const float* qf, const T* qb, int64_t q_s1, float scale, const Chunk<T>& ch, int64_t tok,
                        int64_t j0, float* s, int64_t s_stride, float* m, float* l, float* acc, Prefetcher& pf) {
#if defined(RL_AVX512)
  if constexpr (kPairScores<T, DC, GC>) {
    const PairQuery p = pair_query(qf + j0 * DC, qf + (j0 + 1) * DC);
    for (int64_t i = 0, t = 0; i < ch.count; t += ch.n[i], ++i) pair_scores(p, ch.k[i], tok, ch.n[i], s + t, s_stride);
  } else
#endif
  {
    for (int64_t i = 0, t = 0; i < ch.count; t += ch.n[i], ++i)
      group_scores<T, DC, GC>(qf + j0 * DC, qb + j0 * q_s1, q_s1, scale, ch.k[i], tok, ch.n[i], s + t, s_stride, pf);
  }
  float corr[GC];
  softmax_heads<GC>(s, s_stride, ch.tokens, m + j0, l + j0, corr);  // online softmax over this chunk's scores
  group_values<T, DC, GC>(s, s_stride, ch, tok, corr, acc + j0 * DC, pf);
}

// Both kv heads of a task (heads_per_task 2, GQA 4: generate.py's ~3.5M model, one request a task) through one chunk
// together: each head's scores as group_chunk's (block by block, head by head), both heads' online-softmax updates,
// then one value loop over the chunk's tokens accumulating all 8 query heads (16 accumulators at head dim 32), each
// token's V row (both heads' halves, 4 lines at fp32) visited once where group_chunk's two passes read each half in
// its own walk over the chunk. Every output's sums are group_chunk's, in the same order (bit for bit). Its prefetch
// cursor runs one chunk ahead, not two. Against the two passes (1 thread, through the lock, builds alternated in one
// process): at the engine's layout (64 rows, prompt blocks contiguous, decode blocks round-robin, 4 layers' pools)
// 0.86-0.89 of a call hot, 0.91-0.95 with 16 MB written between calls (two chunks ahead: 0.92-0.96); inside the
// engine's generate (~3.5M model, batch 64, 128 new tokens, 7 runs each, load 1.0) the decode attention's time a run
// 258 -> 218 ms greedy (0.85), 253 -> 217 sampled (0.86), the whole run 0.97 / 0.95 (medians).
template <int DC>
constexpr bool kFusedHeads = DC >= 32 && DC / Isa::W * 8 <= Isa::kAccRegs;  // AVX-512 at head dim 32
template <typename T, int DC>
inline void fused_chunk(const float* qf, const T* qb, int64_t q_s1, float scale, const Chunk<T>& ch, int64_t tok,
                        float* s, int64_t s_stride, float* m, float* l, float* acc, Prefetcher& pf) {
  constexpr int GC = 4, W = Isa::W, V = DC / W;
  for (int64_t i = 0, t = 0; i < ch.count; t += ch.n[i], ++i)
    for (int hh = 0; hh < 2; ++hh)
      group_scores<T, DC, GC>(qf + hh * GC * DC, qb + hh * GC * q_s1, q_s1, scale, ch.k[i] + hh * DC, tok, ch.n[i],
                              s + hh * GC * s_stride + t, s_stride, pf);
  float corr[2 * GC];
  softmax_heads<2 * GC>(s, s_stride, ch.tokens, m, l, corr);
  typename Isa::V av[2 * GC][V];
  for (int g = 0; g < 2 * GC; ++g) {
    const typename Isa::V cv = Isa::set1(corr[g]);
    for (int c = 0; c < V; ++c) av[g][c] = Isa::mul(Isa::load(acc + g * DC + W * c), cv);
  }
  for (int64_t t = 0, i = 0; i < ch.count; ++i)
    for (int64_t u = 0; u < ch.n[i]; ++u, ++t) {
      const T* vr = ch.v[i] + u * tok;
      pf.pump(2 * pf.row_lines);  // group_values' pumps of both heads' passes
#pragma GCC unroll 2
      for (int hh = 0; hh < 2; ++hh) {
        typename Isa::V p[GC];
        for (int g = 0; g < GC; ++g) p[g] = Isa::set1(s[(hh * GC + g) * s_stride + t]);
        for (int c = 0; c < V; ++c) {
          typename Isa::V vv = Isa::load(vr + hh * DC + W * c);
          // fp32: one load a V chunk (GCC folded it into each of the GC FMAs: 16 zmm loads a token)
          if constexpr (std::is_same_v<T, float>) asm("" : "+v"(vv));
          for (int g = 0; g < GC; ++g) av[hh * GC + g][c] = Isa::fma(p[g], vv, av[hh * GC + g][c]);
        }
      }
    }
  for (int g = 0; g < 2 * GC; ++g)
    for (int c = 0; c < V; ++c) Isa::store(acc + g * DC + W * c, av[g][c]);
}

// Over a KV pool far larger than L3 (the engine's: 8 layers of 64 rows of 80-200 keys in blocks scattered
// in ~256 MB), prefetching each next block took a call (2 threads, through the lock, two alternating
// rounds) from 628-671 to 428-593 us at head dim 32 fp32, 484-540 to 404-452 bf16, and at head dim 64 from
// 885-932 to 722-789 fp32, 865-975 to 683-736 bf16 (before the GQA passes). Into L2 (T1), not L1 (T0):
// benchmarks/decode_isa.py's 64-row cells, copies A/B in one run through the lock at load ~5, AVX-512 at 2
// threads: 40m fp32 706 -> 602 us a layer call, bf16 445 -> 348, 3m fp32 273 -> 234, bf16 155 -> 144; at 1
// thread 40m 1458 -> 1231 and 889 -> 631, 3m 863 -> 699 and 352 -> 302; AVX2 at 1 thread 40m fp32 1659 -> 1419,
// bf16 1108 -> 762, 3m fp32 762 -> 581.
template <typename T, int DC>
void paged_decode_vec(const T* q, int64_t q_s0, int64_t q_s1, const T* kc, const T* vc,
                      const int32_t* tables, int64_t table_stride, const int32_t* lens, T* out,
                      int64_t B, int64_t Hq, int64_t Hkv, int64_t bs, float scale, int64_t max_len,
                      int64_t num_blocks, std::atomic<bool>& bad_block) {
  static_assert(DC % Isa::W == 0, "head dim in whole vectors");
  const int64_t G = Hq / Hkv;
  const int64_t tok = Hkv * DC;
  const int64_t split = B < at::get_num_threads() ? Hkv : 1;
  const int64_t heads_per_task = Hkv / split;
  const int64_t work = std::max<int64_t>(1, max_len * DC * G * heads_per_task);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / work);
  const int64_t per_chunk = std::max<int64_t>(1, kChunkTokens / bs);  // blocks a chunk
  const int64_t s_stride = (per_chunk * bs + 31) / 16 * 16;  // scores per query head: the chunk and a vector more
  const bool fused = kFusedHeads<DC> && heads_per_task == 2 && G == 4;  // both kv heads a chunk (fused_chunk)
  // chunks prefetched past the one being read: pumped, two (one where fused: measured below), else the next at once
  const int64_t ahead = kPumped<DC> && !fused ? 2 : 1;
  at::parallel_for(0, B * split, grain, [&](int64_t begin, int64_t end) {
    const int64_t HG = heads_per_task * G;
    std::vector<float> qf(HG * DC), acc(HG * DC), s((fused ? 8 : 4) * s_stride), m(HG), l(HG);
    Chunk<T> ch;
    int64_t done = 0;  // blocks read (counted from the thread's first task's), the chunk being read included
    Prefetcher pf{reinterpret_cast<const char*>(kc), reinterpret_cast<const char*>(vc), tables, table_stride, lens,
                  split, bs, bs * tok * int64_t(sizeof(T)), num_blocks, end,
                  int((tok * int64_t(sizeof(T)) / 64 + heads_per_task - 1) / heads_per_task + 1), begin};
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / split, h0 = (task % split) * heads_per_task;
      T* o = out + (b * Hq + h0 * G) * DC;
      const int64_t L = lens[b];
      if (!begin_task(q, q_s0, q_s1, b, h0 * G, HG, int64_t(DC), scale, L, o, qf.data(), acc, m, l)) continue;
      const T* qb = q + b * q_s0 + h0 * G * q_s1;  // the task's query heads as stored
      const int32_t* table = tables + b * table_stride;
      const int64_t num_table_blocks = (L + bs - 1) / bs;
      for (int64_t first = 0; first < num_table_blocks; first += per_chunk) {
        const int64_t last = std::min(num_table_blocks, first + per_chunk);
        bool bad = false;
        for (int64_t i = first; i < last; ++i) {
          const int64_t block = table[i];
          if (block < 0 || block >= num_blocks) bad = true;
        }
        if (bad) {
          bad_block = true;
          break;
        }
        pf.skip_to(done);
        done += last - first;
        pf.target = done + ahead * per_chunk;
        pf.pump(kPumped<DC> ? 4 * pf.row_lines : std::numeric_limits<int>::max());
        ch.count = last - first;
        ch.tokens = 0;
        for (int64_t i = 0; i < ch.count; ++i) {  // the chunk's blocks at the task's first kv head
          const int64_t block = table[first + i];
          ch.k[i] = kc + block * bs * tok + h0 * DC;
          ch.v[i] = vc + block * bs * tok + h0 * DC;
          ch.n[i] = std::min(bs, L - (first + i) * bs);
          ch.tokens += ch.n[i];
        }
        if constexpr (kFusedHeads<DC>) {
          if (fused) {
            fused_chunk<T, DC>(qf.data(), qb, q_s1, scale, ch, tok, s.data(), s_stride, m.data(), l.data(), acc.data(),
                               pf);
            continue;
          }
        }
        for (int64_t hh = 0; hh < heads_per_task; ++hh) {
          if (hh > 0) {
            for (int64_t i = 0; i < ch.count; ++i) ch.k[i] += DC, ch.v[i] += DC;  // the next kv head's rows
          }
          int64_t j = hh * G;
          const int64_t j_end = j + G;
          for (; j + 4 <= j_end; j += 4)
            group_chunk<T, DC, 4>(qf.data(), qb, q_s1, scale, ch, tok, j, s.data(), s_stride, m.data(), l.data(),
                                  acc.data(), pf);
          if (j + 2 <= j_end) {
            group_chunk<T, DC, 2>(qf.data(), qb, q_s1, scale, ch, tok, j, s.data(), s_stride, m.data(), l.data(),
                                  acc.data(), pf);
            j += 2;
          }
          if (j < j_end)
            group_chunk<T, DC, 1>(qf.data(), qb, q_s1, scale, ch, tok, j, s.data(), s_stride, m.data(), l.data(),
                                  acc.data(), pf);
        }
      }
      end_task(acc, l, o, HG, int64_t(DC));
    }
  });
}
#endif

torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                                     const torch::Tensor& context_lens, double scale, int64_t max_len) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [batch, heads, head_dim] with a contiguous last dim");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "k_cache/v_cache must be contiguous");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.stride(1) == 1, "block_tables: int32 rows");
  TORCH_CHECK(context_lens.scalar_type() == at::kInt && context_lens.is_contiguous(), "context_lens: int32");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2);
  auto out = torch::empty({B, Hq, D}, q.options());
  std::atomic<bool> bad_block{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    auto run = [&](auto dc) {
#if defined(RL_AVX512) || defined(RL_AVX2)
      if constexpr (decltype(dc)::value > 0 && kVecDtype<scalar_t>) {
        paged_decode_vec<scalar_t, decltype(dc)::value>(
            q.data_ptr<scalar_t>(), q.stride(0), q.stride(1), k_cache.data_ptr<scalar_t>(),
            v_cache.data_ptr<scalar_t>(), block_tables.data_ptr<int32_t>(), block_tables.stride(0),
            context_lens.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), B, Hq, Hkv, bs,
            static_cast<float>(scale), max_len, k_cache.size(0), bad_block);
        return;
      }
#endif
      paged_decode_kernel<scalar_t, decltype(dc)::value>(
          q.data_ptr<scalar_t>(), q.stride(0), q.stride(1), k_cache.data_ptr<scalar_t>(),
          v_cache.data_ptr<scalar_t>(), block_tables.data_ptr<int32_t>(), block_tables.stride(0),
          context_lens.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), B, Hq, Hkv, D, bs,
          static_cast<float>(scale), max_len, k_cache.size(0), bad_block);
    };
    switch (D) {
      case 16: run(std::integral_constant<int, 16>{}); break;
      case 32: run(std::integral_constant<int, 32>{}); break;
      case 64: run(std::integral_constant<int, 64>{}); break;
      case 128: run(std::integral_constant<int, 128>{}); break;
      default: run(std::integral_constant<int, 0>{});
    }
  });
  TORCH_CHECK(!bad_block, "paged_decode_attention: a block table entry within a context is outside the cache's ",
              k_cache.size(0), " blocks");
  return out;
}

// The instruction set of this build's vector paths (decode attention, one-row linear, greedy pick): "avx512", "avx2"
// or "portable" (the tests check that a build made with AVX-512 switched off runs the AVX2 path).
std::string isa() {
#if defined(RL_AVX512)
  return "avx512";
#elif defined(RL_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

// ---- greedy pick -----------------------------------------------------------------------------
// Per row of logits [n, V]: the index of its first maximum, what torch.max(dim=-1) returns (a NaN counts as
// the maximum: the first NaN's index). torch's CPU max over [64, 32k] took ~0.85 ms at 2 threads, fp32 and
// bf16 alike (its bf16 argmax ~3.7 ms): a greedy decode step of the ~40M model paid it every token.
// Vector paths (AVX-512, AVX2): one pass in which each of 4 x W lanes keeps its own first maximum (only a strictly
// greater value replaces it), then the largest value over the lanes at the smallest index holding it, then the
// last < W logits one by one; a row with a NaN (an unordered compare, kept as a mask) is scanned again for its
// first NaN. Portable: the maximum by an `omp simd` reduction, then the first index holding it.
template <typename T>
int64_t first_nan(const T* x, int64_t V) {
  for (int64_t i = 0; i < V; ++i)
    if (std::isnan(to_f(x[i]))) return i;
  return -1;
}

template <typename T>
int64_t row_argmax(const T* x, int64_t V) {
#if defined(RL_AVX512) || defined(RL_AVX2)
  constexpr int W = Isa::W, A = 4;  // independent lane sets: the compare -> select chain of one would bound the loop
  if (V >= W * A) {
    typename Isa::V best[A];
    typename Isa::I best_i[A], idx[A];
    typename Isa::M nan = Isa::none();
    for (int a = 0; a < A; ++a) {
      best[a] = Isa::load(x + W * a);
      idx[a] = best_i[a] = Isa::iota(W * a);
      nan = Isa::either(nan, Isa::is_nan(best[a]));
    }
    int64_t i = W * A;  // every lane index stays below V (<= INT32_MAX, argmax_rows' check)
    for (; i + W * A <= V; i += W * A) {
      for (int a = 0; a < A; ++a) {
        idx[a] = Isa::add(idx[a], W * A);
        const typename Isa::V v = Isa::load(x + i + W * a);
        const typename Isa::M gt = Isa::gt(v, best[a]);
        best[a] = Isa::select(gt, v, best[a]);
        best_i[a] = Isa::select(gt, idx[a], best_i[a]);
        nan = Isa::either(nan, Isa::is_nan(v));
      }
    }
    for (; i + W <= V; i += W) {  // whole vectors of the tail into lane set 0
      const typename Isa::V v = Isa::load(x + i);
      const typename Isa::M gt = Isa::gt(v, best[0]);
      best[0] = Isa::select(gt, v, best[0]);
      best_i[0] = Isa::select(gt, Isa::iota(int32_t(i)), best_i[0]);
      nan = Isa::either(nan, Isa::is_nan(v));
    }
    if (Isa::any(nan)) return first_nan(x, V);
    typename Isa::V top = best[0];
    for (int a = 1; a < A; ++a) top = Isa::max(top, best[a]);
    float m = Isa::reduce_max(top);
    int64_t first = std::numeric_limits<int32_t>::max();
    for (int a = 0; a < A; ++a) first = std::min<int64_t>(first, Isa::first_equal(best[a], best_i[a], m));
    for (; i < V; ++i) {  // the last W - 1 at most, after every lane's index: a strictly greater value wins
      const float v = to_f(x[i]);
      if (v != v) return i;  // the first NaN (the lanes held none)
      if (v > m) m = v, first = i;
    }
    return first;
  }
#endif
  float m = -std::numeric_limits<float>::infinity();
  bool nan = false;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t i = 0; i < V; ++i) {
    const float v = to_f(x[i]);
    m = v > m ? v : m;
    nan = nan | (v != v);
  }
  if (nan) return first_nan(x, V);
  for (int64_t i = 0; i < V; ++i)
    if (to_f(x[i]) == m) return i;
  return 0;  // unreachable for V > 0: every row holds its maximum
}

torch::Tensor argmax_rows(const torch::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "argmax_rows: logits must be [rows, vocab], got shape ", logits.sizes());
  // before any other check or read: the vector paths' lane indices are int32 (ops.greedy_argmax sends wider rows to
  // torch.max)
  TORCH_CHECK(logits.size(1) > 0 && logits.size(1) <= std::numeric_limits<int32_t>::max(), "argmax_rows: logits of ",
              "shape ", logits.sizes(), " need 1 .. 2^31 - 1 columns (int32 lane indices); take torch.max for wider rows");
  TORCH_CHECK(logits.stride(1) == 1, "argmax_rows: logits need a contiguous last dim, got strides ", logits.strides());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "logits must be float32 or bfloat16, got ", logits.scalar_type());
  const int64_t n = logits.size(0), V = logits.size(1), row_stride = logits.stride(0);
  auto out = torch::empty({n}, logits.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / V);  // ~64k logits a task
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* x = logits.data_ptr<T>();
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) o[r] = row_argmax<T>(x + r * row_stride, V);
    });
  };
  if (logits.scalar_type() == at::kFloat) run(static_cast<float*>(nullptr));
  else run(static_cast<at::BFloat16*>(nullptr));
  return out;
}


// ---- inverse-CDF sampling of a batch of rows, with the sampled tokens' log-probs -----------------------
// The sampler's common case (inference/sampler.py: every row sampling at one temperature, no truncation),
// the torch reference `inverse_cdf_sample`: z [n, V] fp32 (the logits already divided by the temperature),
// m = max z, e = exp(z - m), the cumulative sum of e accumulated in double and rounded to fp32 per entry (as
// torch.cumsum on CPU), the token = the number of entries <= u * total (u rounded to fp32, the product in fp32;
// searchsorted(right=True), clamped to V - 1), and its log-prob z[token] - (m + log total).
// exp is fast_exp (a few ulp from torch's; -inf logits get exactly 0), so a token differs from the reference's only
// where the draw falls within that rounding of a boundary between two tokens, and a log-prob by ~1e-7.
// `sample_row`: one row, its sums one after the other (a chain of V dependent double adds: ~3 cycles an entry).
// The AVX-512 path runs 16 rows at once (`sample_group`): lane l of a double vector pair is row l's running sum,
// so each row's sums are the same adds in the same order (the same bits as `sample_row`), 16 chains abreast.
float row_max(const float* row, int64_t V) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < V; ++i) m = row[i] > m ? row[i] : m;
  return m;
}

void sample_row(const float* row, int64_t V, double u, float* c, int64_t* tok, float* lp) {
  const float m = row_max(row, V);
#pragma omp simd
  for (int64_t i = 0; i < V; ++i) {  // a -inf logit (a padded vocabulary row) keeps zero mass
    const float e = fast_exp(row[i] - m);
    c[i] = row[i] == -std::numeric_limits<float>::infinity() ? 0.f : e;
  }
  double total = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    total += c[i];
    c[i] = static_cast<float>(total);
  }
  const float target = static_cast<float>(u) * c[V - 1];
  const int64_t t = std::upper_bound(c, c + V, target) - c;
  *tok = std::min<int64_t>(t, V - 1);
  if (lp != nullptr) *lp = row[*tok] - (m + std::log(c[V - 1]));
}

#if defined(RL_AVX512)
constexpr int kSampleRows = 16;

// e = exp(z - m) of 16 logits, 0 where z is -inf
inline __m512 mass16(__m512 z, __m512 m) {
  const __mmask16 inf = _mm512_cmp_ps_mask(z, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_EQ_OQ);
  return _mm512_mask_mov_ps(fast_exp16(_mm512_sub_ps(z, m)), inf, _mm512_setzero_ps());
}

// 16 rows of 16 -> their 16 columns, in place
inline void transpose16(__m512 (&r)[kSampleRows]) {
  __m512 t[kSampleRows], u[kSampleRows];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + k]: rows 4i..4i+3 at columns k, k + 4, k + 8, k + 12 (its 128-bit lanes)
    u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 a = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x88), b = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xDD);
    const __m512 c = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x88);
    const __m512 d = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xDD);
    r[k] = _mm512_shuffle_f32x4(a, c, 0x88);
    r[k + 4] = _mm512_shuffle_f32x4(b, d, 0x88);
    r[k + 8] = _mm512_shuffle_f32x4(a, c, 0xDD);
    r[k + 12] = _mm512_shuffle_f32x4(b, d, 0xDD);
  }
}

// `sample_row` of rows 0 .. rows - 1 (4..16) of x at once. Per block of 16 columns: each row's 16 masses (rows past
// `rows`: zeros), transposed into columns, then 16 steps of the 16 running sums (two vectors of 8 doubles), the
// sums after the block kept in `ends` ([blocks][16]). A row's token lies in the first block whose end sum, rounded
// to fp32, exceeds its target (the rounded sums never decrease); that block's masses are computed again for the row
// alone (the same operations on the same logits: the same bits) and summed from the previous block's end.
void sample_group(const float* x, int64_t row_stride, int64_t V, int64_t rows, const double* u, int64_t* tok,
                  float* lp, std::vector<double>& ends) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  alignas(64) float m[kSampleRows];
  for (int l = 0; l < kSampleRows; ++l) m[l] = l < rows ? row_max(x + l * row_stride, V) : 0.f;
  const int64_t blocks = (V + kSampleRows - 1) / kSampleRows;
  ends.resize(blocks * kSampleRows);
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t j0 = b * kSampleRows, cols = std::min<int64_t>(kSampleRows, V - j0);
    const __mmask16 part = Avx512::part_mask(cols);
    __m512 e[kSampleRows];
    for (int l = 0; l < kSampleRows; ++l)  // columns past V read as -inf: zero mass, and x + 0.0 == x
      e[l] = l < rows ? mass16(_mm512_mask_loadu_ps(ninf, part, x + l * row_stride + j0), _mm512_set1_ps(m[l]))
                      : _mm512_setzero_ps();
    transpose16(e);
    for (int64_t c = 0; c < cols; ++c) {
      lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm512_castps512_ps256(e[c])));
      hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e[c]), 1))));
    }
    _mm512_storeu_pd(ends.data() + b * kSampleRows, lo);
    _mm512_storeu_pd(ends.data() + b * kSampleRows + 8, hi);
  }
  for (int64_t l = 0; l < rows; ++l) {
    const float* row = x + l * row_stride;
    const float total = static_cast<float>(ends[(blocks - 1) * kSampleRows + l]);
    const float target = static_cast<float>(u[l]) * total;
    int64_t first = 0, last = blocks;  // the first block whose rounded end sum exceeds the target
    while (first < last) {
      const int64_t mid = (first + last) / 2;
      if (static_cast<float>(ends[mid * kSampleRows + l]) > target) last = mid;
      else first = mid + 1;
    }
    int64_t t = V;
    if (first < blocks) {
      const int64_t j0 = first * kSampleRows, cols = std::min<int64_t>(kSampleRows, V - j0);
      const __mmask16 part = Avx512::part_mask(cols);
      alignas(64) float e[kSampleRows];
      _mm512_store_ps(e, mass16(_mm512_mask_loadu_ps(ninf, part, row + j0), _mm512_set1_ps(m[l])));
      double sum = first > 0 ? ends[(first - 1) * kSampleRows + l] : 0.0;
      for (int64_t c = 0; c < cols; ++c) {  // (a crossing block holds the crossing)
        sum += e[c];
        if (static_cast<float>(sum) > target) {
          t = j0 + c;
          break;
        }
      }
    }
    tok[l] = std::min<int64_t>(t, V - 1);
    if (lp != nullptr) lp[l] = row[tok[l]] - (m[l] + std::log(total));
  }
}
#endif

std::vector<torch::Tensor> sample_rows(const torch::Tensor& z, const torch::Tensor& uniforms, bool with_logprobs) {
  TORCH_CHECK(z.dim() == 2 && z.stride(1) == 1 && z.scalar_type() == at::kFloat,
              "z must be float32 [rows, vocab] with a contiguous last dim");
  TORCH_CHECK(z.size(1) > 0, "z needs at least one column");
  TORCH_CHECK(uniforms.dim() == 1 && uniforms.size(0) == z.size(0) && uniforms.scalar_type() == at::kDouble &&
                  uniforms.is_contiguous(),
              "uniforms must be float64 [rows], one per row of z");
  const int64_t n = z.size(0), V = z.size(1), row_stride = z.stride(0);
  auto tokens = torch::empty({n}, z.options().dtype(at::kLong));
  auto logprobs = torch::empty({with_logprobs ? n : 0}, z.options());
  const float* x = z.data_ptr<float>();
  const double* u = uniforms.data_ptr<double>();
  int64_t* tok = tokens.data_ptr<int64_t>();
  float* lp = with_logprobs ? logprobs.data_ptr<float>() : nullptr;
#if defined(RL_AVX512)
  const int64_t groups = (n + kSampleRows - 1) / kSampleRows;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (V * kSampleRows));  // ~64k logits a task
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    std::vector<double> ends;
    std::vector<float> cdf;
    for (int64_t g = begin; g < end; ++g) {
      const int64_t r0 = g * kSampleRows, rows = std::min<int64_t>(kSampleRows, n - r0);
      if (rows >= 4) {
        sample_group(x + r0 * row_stride, row_stride, V, rows, u + r0, tok + r0, lp == nullptr ? nullptr : lp + r0,
                     ends);
      } else {  // 1-3 rows: each chain alone (measured: 2 rows 6.7 us alone, 8.9 us as a group; 4 rows 12.1, 10.2)
        cdf.resize(V);
        for (int64_t r = r0; r < r0 + rows; ++r)
          sample_row(x + r * row_stride, V, u[r], cdf.data(), tok + r, lp == nullptr ? nullptr : lp + r);
      }
    }
  });
#else
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / V);  // ~64k logits a task
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> cdf(V);
    for (int64_t r = begin; r < end; ++r)
      sample_row(x + r * row_stride, V, u[r], cdf.data(), tok + r, lp == nullptr ? nullptr : lp + r);
  });
#endif
  return {tokens, logprobs};
}

// ---- the seeded uniforms of a batch of rows ----------------------------------------------------------------
// inference/sampler.py's `token_uniforms_at` (its numpy form is the reference): per row, x = position * C3 + base
// (mod 2^64; base = seed * C1 + index * C2, `token_uniform_base`), splitmix64's finaliser, x >> 1 (63 bits) and
// x * 2^-63 as a double: the same uint64 operations in the same order, the same rounding of the 63-bit integer to
// a double (round to nearest), so the uniforms are numpy's bit for bit. `base` holds the uint64 bases' bits
// (int64), `positions` the token positions (int64, >= 0).
torch::Tensor token_uniforms(const torch::Tensor& base, const torch::Tensor& positions) {
  TORCH_CHECK(base.dim() == 1 && base.scalar_type() == at::kLong && base.is_contiguous(),
              "base must be a contiguous int64 [rows] (the uint64 bases' bits)");
  TORCH_CHECK(positions.dim() == 1 && positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  positions.size(0) == base.size(0),
              "positions must be a contiguous int64 [rows], one per base");
  const int64_t n = base.size(0);
  auto out = torch::empty({n}, base.options().dtype(at::kDouble));
  const uint64_t* b = reinterpret_cast<const uint64_t*>(base.data_ptr<int64_t>());
  const int64_t* p = positions.data_ptr<int64_t>();
  double* u = out.data_ptr<double>();
  constexpr uint64_t c3 = 0xBF58476D1CE4E5B9ull, c4 = 0x94D049BB133111EBull;
  for (int64_t r = 0; r < n; ++r) {
    uint64_t x = static_cast<uint64_t>(p[r]) * c3 + b[r];
    x ^= x >> 30;
    x *= c3;
    x ^= x >> 27;
    x *= c4;
    x ^= x >> 31;
    x >>= 1;
    u[r] = static_cast<double>(x) * 0x1p-63;
  }
  return out;
}

// sample_rows with the uniforms of token_uniforms(base, positions), in one call (the seeded decode step's draw and
// pick: the same uniforms and tokens as the two calls, without the uniforms' round trip through Python)
std::vector<torch::Tensor> sample_rows_seeded(const torch::Tensor& z, const torch::Tensor& base,
                                              const torch::Tensor& positions, bool with_logprobs) {
  TORCH_CHECK(z.dim() == 2 && base.dim() == 1 && base.size(0) == z.size(0), "base must hold one entry per row of z");
  return sample_rows(z, token_uniforms(base, positions), with_logprobs);
}

// ---- the persistent decode batch's next inputs ------------------------------------------------------------------
// inference/model_runner.py's `continue_decode_inputs` (its numpy form is the reference): the m rows of the last
// decode step less the `stopped` ones (ascending), in order, become the n rows of this one: each row's token is
// the one it sampled (`tokens`, one per last row), its position last step's + 1, its context length that + 1, its
// block table last step's (`prev_tables` [m, w] int32) widened to the longest row's blocks where a row's position
// starts a block, that block read from its sequence's `block_table` list (`seqs`: the n rows' sequences), and its
// slot that position's block * block_size + the offset in it. Writes rows 0..n-1 of the runner's arrays (the
// `input_ids`, `positions`, `context_lens`, `slot_mapping`, `block_tables` numpy views, written in place) and
// returns this step's (positions [n] int64, block tables [n, width] int32), new arrays: the next step's `prev_*`.
namespace py = pybind11;
using I64Array = py::array_t<int64_t, py::array::c_style>;
using I32Array = py::array_t<int32_t, py::array::c_style>;

py::tuple continue_decode_inputs(const py::list& tokens, const py::list& stopped, const I64Array& prev_positions,
                                 const I32Array& prev_tables, const py::list& seqs, int64_t block_size,
                                 I64Array input_ids, I64Array positions, I32Array context_lens,
                                 I64Array slot_mapping, I32Array block_tables) {
  TORCH_CHECK(prev_positions.ndim() == 1 && prev_tables.ndim() == 2 && block_tables.ndim() == 2 &&
                  prev_tables.shape(0) == prev_positions.shape(0),
              "continue_decode_inputs: prev_positions [m], prev_tables [m, w], block_tables [rows, blocks]");
  const int64_t m = prev_positions.shape(0), w = prev_tables.shape(1);
  const int64_t num_stopped = static_cast<int64_t>(stopped.size()), n = m - num_stopped;
  TORCH_CHECK(static_cast<int64_t>(tokens.size()) == m && static_cast<int64_t>(seqs.size()) == n && block_size > 0,
              "continue_decode_inputs: one token per last row, one sequence per kept row");
  TORCH_CHECK(input_ids.shape(0) >= n && positions.shape(0) >= n && context_lens.shape(0) >= n &&
                  slot_mapping.shape(0) >= n && block_tables.shape(0) >= n,
              "continue_decode_inputs: the runner's arrays hold fewer rows than the batch");
  auto as_int = [](PyObject* item, const char* what) {
    const int64_t value = PyLong_AsLongLong(item);
    if (value == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      TORCH_CHECK(false, "continue_decode_inputs: ", what, " must hold ints");
    }
    return value;
  };
  std::vector<int64_t> kept;  // last step's row of each of this step's rows
  kept.reserve(n);
  for (int64_t i = 0, k = 0; i < m; ++i) {
    if (k < num_stopped && as_int(PyList_GET_ITEM(stopped.ptr(), k), "stopped") == i) ++k;
    else kept.push_back(i);
  }
  TORCH_CHECK(static_cast<int64_t>(kept.size()) == n,
              "continue_decode_inputs: stopped must hold distinct last-step rows in ascending order");
  const int64_t* prev_pos = prev_positions.data();
  const int32_t* prev_tab = prev_tables.data();
  I64Array out_positions(n);
  int64_t* pos = out_positions.mutable_data();
  int64_t* ids = input_ids.mutable_data();
  int64_t width = w;
  bool any_start = false;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = kept[j], p = prev_pos[i] + 1;
    ids[j] = as_int(PyList_GET_ITEM(tokens.ptr(), i), "tokens");
    pos[j] = p;
    if (p % block_size == 0) {
      any_start = true;
      width = std::max(width, p / block_size + 1);
    }
  }
  TORCH_CHECK(width <= block_tables.shape(1), "continue_decode_inputs: a row's blocks exceed the block tables");
  I32Array out_tables({n, width});
  int32_t* tab = out_tables.mutable_data();
  int64_t* in_pos = positions.mutable_data();
  int32_t* ctx = context_lens.mutable_data();
  int64_t* slots = slot_mapping.mutable_data();
  int32_t* bt = block_tables.mutable_data();
  const int64_t bt_stride = block_tables.shape(1);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = kept[j], p = pos[j], block = p / block_size, offset = p % block_size;
    int32_t* row = tab + j * width;
    std::copy(prev_tab + i * w, prev_tab + (i + 1) * w, row);
    std::fill(row + w, row + width, 0);
    if (any_start && offset == 0) {  // the block appended to this row's sequence for its new position
      py::object table = seqs[j].attr("block_table");
      TORCH_CHECK(PyList_Check(table.ptr()) && PyList_GET_SIZE(table.ptr()) > block,
                  "continue_decode_inputs: row ", j, "'s block_table holds no block ", block);
      row[block] = static_cast<int32_t>(as_int(PyList_GET_ITEM(table.ptr(), block), "a block_table"));
    }
    std::copy(row, row + width, bt + j * bt_stride);
    in_pos[j] = p;
    ctx[j] = static_cast<int32_t>(p + 1);
    slots[j] = static_cast<int64_t>(row[block]) * block_size + offset;
  }
  return py::make_tuple(out_positions, out_tables);
}

// ---- rotary embedding fused with the paged KV cache write -----------------------------------
// The new tokens of a step (decodes, prefill chunks): q and k rotated neox-style (rotate-half over the first
// 2 * R2 dims of each head by per-token cos / sin [T, R2]; dims past 2 * R2 pass through: partial rotary), q's
// into a new [T, Hq, D] tensor, k's straight into its cache slot (and into a new [T, Hkv, D] tensor when asked:
// a prefill's fresh sequences attend over their own k), v copied into its slot; slot -1 skips the cache write.
// One pass over q, k and v read in place (strided views of the fused qkv projection), where the torch path
// rotates into a [T, Hq + Hkv, D] tensor and index_copy_s k and v from it. Models whose checkpoints store
// interleaved rotary pairs (DeepSeek, GGUF) are de-interleaved at load, so neox is every rotation the engine
// applies; scaled variants (llama3, linear, YaRN) differ only in the cos / sin tables.
// Rounding: fp32 products x1 * cos and x2 * sin, each rounded, then their difference (sum), then the storage
// dtype: the torch path's operations. This section is compiled without fused multiply-adds (the file's
// -ffp-contract=fast would contract them), so the results equal the torch path's bit for bit in every dtype
// (tests/kernels/test_rotary_kv_write.py checks the bits): under g++ by GCC's optimize pragma; under clang, which
// ignores it, by `#pragma clang fp contract(off)` in rotate_row, which clang honours because kernels/cpu/__init__.py
// builds with -ffp-contract=on there (under fast it fuses across statements regardless).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <typename T>
inline void rotate_row(const T* __restrict x, T* __restrict out, const float* __restrict c, const float* __restrict s,
                       int64_t r2, int64_t D) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
#pragma omp simd
  for (int64_t i = 0; i < r2; ++i) {
    const float x1 = to_f(x[i]), x2 = to_f(x[i + r2]);
    out[i] = from_f<T>(x1 * c[i] - x2 * s[i]);
    out[i + r2] = from_f<T>(x2 * c[i] + x1 * s[i]);
  }
  for (int64_t i = 2 * r2; i < D; ++i) out[i] = x[i];
}

template <typename T>
void rotary_kv_write_kernel(const T* q, int64_t q_s0, int64_t q_s1, const T* k, int64_t k_s0, int64_t k_s1,
                            const T* v, int64_t v_s0, int64_t v_s1, const float* cos, int64_t cos_s0,
                            const float* sin, int64_t sin_s0, const int64_t* rows, const int64_t* slots, T* kc,
                            T* vc, T* q_out, T* k_out, int64_t n_tokens, int64_t Hq, int64_t Hkv, int64_t D,
                            int64_t r2, int64_t num_slots, std::atomic<bool>& bad_slot) {
  const int64_t tok = Hkv * D;  // elements per cached token
  // one thread below ~64K elements (a decode step's few hundred rows): a parallel region costs more there
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, (Hq + 2 * Hkv) * D));
  at::parallel_for(0, n_tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t row = rows != nullptr ? rows[t] : t;  // token t's cos / sin row
      const float* c = cos + row * cos_s0;
      const float* s = sin + row * sin_s0;
      for (int64_t h = 0; h < Hq; ++h) rotate_row(q + t * q_s0 + h * q_s1, q_out + (t * Hq + h) * D, c, s, r2, D);
      const int64_t slot = slots[t];
      if (slot >= num_slots) {  // reported after the loop; never written outside the cache
        bad_slot = true;
        continue;
      }
      for (int64_t h = 0; h < Hkv; ++h) {
        const T* kr = k + t * k_s0 + h * k_s1;
        T* ko = k_out != nullptr ? k_out + (t * Hkv + h) * D : nullptr;
        if (slot >= 0) {
          T* kd = kc + slot * tok + h * D;
          rotate_row(kr, kd, c, s, r2, D);
          if (ko != nullptr) std::copy(kd, kd + D, ko);
          const T* vr = v + t * v_s0 + h * v_s1;
          std::copy(vr, vr + D, vc + slot * tok + h * D);
        } else if (ko != nullptr) {
          rotate_row(kr, ko, c, s, r2, D);
        }
      }
    }
  });
}
#pragma GCC pop_options

// (rotated q, rotated k or None without return_k). Every argument is checked here (the Python wrapper calls it
// unchecked and names the problem when it refuses one); q, k, v, cos and sin may be strided views of rows
// with a contiguous last dim, slot_mapping int64 or int32. With `positions` (int64 [tokens]), cos and sin are
// tables of any number of rows and token t takes row positions[t] (every position checked to lie in the tables
// before anything is written); without it, row t.
std::tuple<torch::Tensor, torch::Tensor> rotary_kv_write_rows(const torch::Tensor& q, const torch::Tensor& k,
                                                              const torch::Tensor& v, const torch::Tensor& cos,
                                                              const torch::Tensor& sin,
                                                              const c10::optional<torch::Tensor>& positions,
                                                              const torch::Tensor& slot_mapping,
                                                              const torch::Tensor& k_cache,
                                                              const torch::Tensor& v_cache, bool return_k) {
  for (const torch::Tensor* t : {&q, &k, &v, &cos, &sin, &slot_mapping, &k_cache, &v_cache})
    TORCH_CHECK(t->device().is_cpu(), "rotary_kv_write: every tensor must be on the CPU");
  const int64_t* rows = nullptr;
  if (positions.has_value()) {
    const torch::Tensor& pos = *positions;
    TORCH_CHECK(pos.device().is_cpu() && pos.scalar_type() == at::kLong && pos.dim() == 1 &&
                    pos.size(0) == q.size(0) && pos.is_contiguous(),
                "rotary_kv_write: positions must be a contiguous int64 [tokens] CPU tensor for ", q.size(0),
                " tokens; got ", pos.scalar_type(), " ", pos.sizes(), pos.is_contiguous() ? "" : " (strided)", " on ",
                pos.device());
    rows = pos.data_ptr<int64_t>();
  }
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(2) == k.size(2), "rotary_kv_write: q must be [tokens, heads, head_dim], k and v [tokens, ",
              "kv_heads, head_dim]");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "rotary_kv_write: q, k and v need a contiguous last dim");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 &&
                  v_cache.sizes() == k_cache.sizes() && k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2),
              "rotary_kv_write: k_cache / v_cache must be contiguous [num_blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                  k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "rotary_kv_write: q, k, v and the caches must share a dtype");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.dim() == 2 &&
                  sin.sizes() == cos.sizes() && (rows != nullptr || cos.size(0) == q.size(0)) &&
                  cos.stride(1) == 1 && sin.stride(1) == 1 && cos.size(1) > 0 && 2 * cos.size(1) <= q.size(2),
              "rotary_kv_write: cos / sin must be fp32 [tokens, rotary_dim / 2] rows (with positions: [rows, ",
              "rotary_dim / 2] tables), 0 < rotary_dim <= head_dim");
  for (int64_t t = 0; rows != nullptr && t < q.size(0); ++t)
    TORCH_CHECK(rows[t] >= 0 && rows[t] < cos.size(0), "rotary_kv_write: position ", rows[t],
                " is outside the rotary tables' ", cos.size(0), " rows");
  TORCH_CHECK((slot_mapping.scalar_type() == at::kLong || slot_mapping.scalar_type() == at::kInt) &&
                  slot_mapping.dim() == 1 && slot_mapping.size(0) == q.size(0),
              "rotary_kv_write: slot_mapping must be int64 or int32 [tokens]");
  const auto slots = slot_mapping.scalar_type() == at::kLong ? slot_mapping.contiguous()
                                                             : slot_mapping.to(at::kLong).contiguous();
  const int64_t T = q.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(2);
  auto q_out = torch::empty({T, Hq, D}, q.options());
  torch::Tensor k_out;  // undefined (None in Python) unless return_k
  if (return_k) k_out = torch::empty({T, Hkv, D}, q.options());
  std::atomic<bool> bad_slot{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary_kv_write", [&] {
    rotary_kv_write_kernel<scalar_t>(
        q.data_ptr<scalar_t>(), q.stride(0), q.stride(1), k.data_ptr<scalar_t>(), k.stride(0), k.stride(1),
        v.data_ptr<scalar_t>(), v.stride(0), v.stride(1), cos.data_ptr<float>(), cos.stride(0), sin.data_ptr<float>(),
        sin.stride(0), rows, slots.data_ptr<int64_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
        q_out.data_ptr<scalar_t>(), return_k ? k_out.data_ptr<scalar_t>() : nullptr, T, Hq, Hkv, D, cos.size(1),
        k_cache.size(0) * k_cache.size(1), bad_slot);
  });
  TORCH_CHECK(!bad_slot, "rotary_kv_write: a slot in slot_mapping is outside the cache's ",
              k_cache.size(0) * k_cache.size(1), " slots (the other tokens were written)");
  return {q_out, k_out};
}

std::tuple<torch::Tensor, torch::Tensor> rotary_kv_write(const torch::Tensor& q, const torch::Tensor& k,
                                                         const torch::Tensor& v, const torch::Tensor& cos,
                                                         const torch::Tensor& sin, const torch::Tensor& slot_mapping,
                                                         const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                                                         bool return_k) {
  return rotary_kv_write_rows(q, k, v, cos, sin, c10::nullopt, slot_mapping, k_cache, v_cache, return_k);
}

// rotary_kv_write of the fused projection's output qkv [tokens, (q_heads + 2 kv_heads) head_dim] (rows at any
// stride, a contiguous last dim): its q, k and v views made here (the engine's direct decode forward, once per
// layer, where Python's view + split_with_sizes cost ~3 us a call); returns the rotated q. The same bits. With
// `positions`, cos and sin are the whole rotary tables (`RotaryEmbedding.half_width_table`) and each token reads
// its position's row here, where gathering the rows first (`RotaryEmbedding.tables`) costs the direct decode
// step ~30 us: the same values, so the same bits.
torch::Tensor rotary_kv_write_qkv(const torch::Tensor& qkv, int64_t q_heads, int64_t kv_heads,
                                  const torch::Tensor& cos, const torch::Tensor& sin,
                                  const torch::Tensor& slot_mapping, const torch::Tensor& k_cache,
                                  const torch::Tensor& v_cache, const c10::optional<torch::Tensor>& positions) {
  TORCH_CHECK(qkv.dim() == 2 && q_heads > 0 && kv_heads > 0 && qkv.size(1) % (q_heads + 2 * kv_heads) == 0,
              "rotary_kv_write_qkv: qkv must be [tokens, (q_heads + 2 kv_heads) head_dim], got shape ", qkv.sizes(),
              " for ", q_heads, " q heads and ", kv_heads, " kv heads");
  const auto heads = qkv.view({qkv.size(0), q_heads + 2 * kv_heads, qkv.size(1) / (q_heads + 2 * kv_heads)});
  return std::get<0>(rotary_kv_write_rows(heads.narrow(1, 0, q_heads), heads.narrow(1, q_heads, kv_heads),
                                          heads.narrow(1, q_heads + kv_heads, kv_heads), cos, sin, positions,
                                          slot_mapping, k_cache, v_cache, false));
}

// ---- one-row linear (a batch-1 decode step's matmuls) --------------------------------------------
// y = x W^T (+ bias) (+ residual) for x [1, K], W [N, K] read in place (no packed copy): each of the
// step's small weights is read once, where oneDNN's prepacked linear costs a ~15 us floor per call at
// 2 threads and F.linear re-blocks. fp32 products and sums (bf16: exact bf16 products, fp32 sums,
// avx512_bf16's dot where the CPU has it), rounded once to the dtype, like the reference's addmm; vector paths
// (AVX-512, AVX2) in gemv_rows. Rows are split over threads in chunks of ~64 KiB of weight.
thread_local bool g_reading_plain_gemv = false;  // set by packed_linear.reading() (see ops.gemv)


#if defined(RL_AVX512) || defined(RL_AVX2)
// The dot products of x with R weight rows read side by side, U sums each (one x load serves the R rows):
// out[r * out_stride] = x . wr[r]. always_inline into gemv_rows (see there).
template <int R, int U, typename T>
__attribute__((always_inline)) inline void row_dots(const float* xf, const T* xt, const T* const* wr, int64_t K,
                                                    float* out, int64_t out_stride) {
  using Dot = DotOf<T, 32>;
  using V = typename Isa::V;
  constexpr int W = Isa::W;
  const typename Dot::Q* xq;
  if constexpr (Dot::kStoredQuery) xq = xt;
  else xq = xf;
  V acc[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) acc[r][u] = Isa::zero();
  int64_t k = 0;
  for (; k + U * Dot::kStep <= K; k += U * Dot::kStep)
    for (int u = 0; u < U; ++u) {
      const typename Dot::QV xv = Dot::load_q(xq + k + u * Dot::kStep);
      for (int r = 0; r < R; ++r) acc[r][u] = Dot::madd(acc[r][u], xv, Dot::load_k(wr[r] + k + u * Dot::kStep));
    }
  for (; k + Dot::kStep <= K; k += Dot::kStep) {
    const typename Dot::QV xv = Dot::load_q(xq + k);
    for (int r = 0; r < R; ++r) acc[r][0] = Dot::madd(acc[r][0], xv, Dot::load_k(wr[r] + k));
  }
  for (; k + W <= K; k += W) {  // Bf16Dot's tail
    const V xv = Isa::load(xf + k);
    for (int r = 0; r < R; ++r) acc[r][U - 1] = Isa::fma(xv, Isa::load(wr[r] + k), acc[r][U - 1]);
  }
  if (k < K) {
    const V xv = Isa::load_part(xf + k, K - k);
    for (int r = 0; r < R; ++r) acc[r][0] = Isa::fma(xv, Isa::load_part(wr[r] + k, K - k), acc[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    for (int u = 1; u < U; ++u) acc[r][0] = Isa::add(acc[r][0], acc[r][u]);
    out[r * out_stride] = Isa::reduce_add(acc[r][0]);
  }
}
#endif

// noinline, with row_dots inlined into it: GCC otherwise inlined gemv_rows into the parallel region and left
// row_dots<4, 2> a function of its own (AVX-512 build) whose 8 accumulators went through the stack around its tails,
// every 4 rows: the ~3.4M model's batch-1 linears (K = 256 / 768) took 1.06-1.20x as long (the loss 0f0b8ee's A/B
// showed at that size); the AVX2 build already had this shape. Reading only large weights in 4 streams (a thread's
// share >= 1 MiB, the one-stream loop below it) gained nothing over 4 streams everywhere once this was fixed.
template <typename T>
__attribute__((noinline)) void gemv_rows(const float* xf, const T* xt, const T* w, int64_t n0, int64_t n1, int64_t K,
                                         float* acc_out) {
  int64_t n = n0;
#if defined(RL_AVX512) || defined(RL_AVX2)
  // The rows in R = 4 streams far apart: stream r reads rows n0 + r S .. n0 + (r + 1) S - 1 (S = (n1 - n0) / R)
  // in order, each a sequential run of the weight (rows are contiguous) that the hardware prefetcher follows, the
  // four side by side (one x load serves them). One stream (a row at a time in 4 sums) took 1.18-1.21x as long a
  // batch-1 step of the ~40M model's 175 MB of fp32 weights (DRAM-bound) on AVX2 and 1.24-1.25x on AVX-512, bf16
  // 1.29-1.31x / 1.24-1.40x (1 thread, through the lock, load 7-9, builds alternated in one process). Neighbouring
  // rows side by side (2 or 4 streams inside one 4 KiB page) took 2x as long (the prefetcher then sees no
  // sequential stream); software prefetches ahead of one stream 0.7-1.0x.
  constexpr int R = 4, U = 2;
  const int64_t S = (n1 - n0) / R;
  for (int64_t i = 0; i < S; ++i) {
    const T* wr[R];
    for (int r = 0; r < R; ++r) wr[r] = w + (n0 + i + r * S) * K;
    row_dots<R, U>(xf, xt, wr, K, acc_out + i, S);
  }
  for (n = n0 + R * S; n < n1; ++n) {
    const T* wr[1] = {w + n * K};
    row_dots<1, U>(xf, xt, wr, K, acc_out + (n - n0), 0);
  }
#endif
  (void)xt;
  for (; n < n1; ++n) {
    const T* wr = w + n * K;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; ++k) s += xf[k] * to_f(wr[k]);
    acc_out[n - n0] = s;
  }
}

template <typename T>
void gemv_kernel(const T* x, const T* w, const T* bias, const T* res, T* out, int64_t N, int64_t K) {
  std::vector<float> xbuf(K);
  const float* xf = as_float_row(x, xbuf.data(), K);
  const int64_t grain = std::max<int64_t>(16, (int64_t(1) << 16) / (K * int64_t(sizeof(T))));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(end - begin);
    gemv_rows<T>(xf, x, w, begin, end, K, acc.data());
    for (int64_t n = begin; n < end; ++n) {
      float v = acc[n - begin];
      if (bias != nullptr) v += to_f(bias[n]);
      if (res != nullptr) v += to_f(res[n]);
      out[n] = from_f<T>(v);
    }
  });
}

// The op `rl_engine::cpu_gemv` (registered below): a batch-1 compiled step's linear of a weight the
// engine registered for packing. Outside packed_linear.reading() (an engine that does not pack, the
// trainer) it runs the reference (F.linear, addmm with a residual), like the packed op.
torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                   const c10::optional<torch::Tensor>& residual) {
  const int64_t K = weight.size(1), N = weight.size(0);
  const bool fast = g_reading_plain_gemv && x.dim() >= 1 && x.numel() == K && x.size(-1) == K &&
                    x.is_contiguous() && weight.is_contiguous() && x.scalar_type() == weight.scalar_type() &&
                    (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                    (!bias.has_value() || (bias->is_contiguous() && bias->scalar_type() == x.scalar_type())) &&
                    (!residual.has_value() || (residual->is_contiguous() && residual->numel() == N &&
                                               residual->scalar_type() == x.scalar_type()));
  if (!fast) {
    if (!residual.has_value()) return at::linear(x, weight, bias);
    if (!bias.has_value() && x.dim() == 2) return at::addmm(*residual, x, weight.t());
    return *residual + at::linear(x, weight, bias);
  }
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto out = torch::empty(sizes, x.options());
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    gemv_kernel<T>(x.data_ptr<T>(), weight.data_ptr<T>(), bias.has_value() ? bias->data_ptr<T>() : nullptr,
                   residual.has_value() ? residual->data_ptr<T>() : nullptr, out.data_ptr<T>(), N, K);
  };
  if (x.scalar_type() == at::kFloat) run(static_cast<float*>(nullptr));
  else run(static_cast<at::BFloat16*>(nullptr));
  return out;
}

bool set_reading(bool on) {
  const bool previous = g_reading_plain_gemv;
  g_reading_plain_gemv = on;
  return previous;
}

// ---- the compiled decode step's attention, an op in C++ ------------------------------------------------------------
// `rl_engine::decode_attend_rotary` (inference/compiled_decode.py): what PagedAttention.attend_rotary's direct path
// does, rotary_kv_write then paged_decode_attention on the layer's cache, called by the compiled step's graph
// through the dispatcher without entering Python (the Python op's kernel: boxed arguments to Python objects, the
// method's glue, two pybind calls: ~20-40 us a layer inside a decode step, whose kernels leave the caches cold).
// What changes from step to step is read in the engine's static buffers, registered once per attention object
// (`decode_context_set`): the bucket's first rows (q's) of the slot mapping, block tables and context lengths; the
// longest context is the largest of those lengths (padding rows hold 1). A call whose arguments either kernel refuses,
// and every call while the attention has a decode observer, goes to the Python op's kernel (`fallback`), which
// adapts them or names the problem (or calls the observer).
struct DecodeContext {
  torch::Tensor slot_mapping, block_tables, context_lens;  // every bucket's rows
  std::vector<torch::Tensor> k_caches, v_caches;
  int64_t first_layer = 0;
  py::object fallback;  // (q, k, v, cos, sin, handle, layer_idx, scale) -> Tensor
  std::atomic<bool> observed{false};  // a decode observer is set: every call goes to `fallback`, which calls it
};

// Contexts by handle. Engines in other threads may register or drop theirs while a graph runs (the op runs without
// the GIL where the graph releases it): the table is read and written under the lock; an entry's address stays valid
// while its engine lives (node-based map), and its engine cannot be collected while one of its steps runs.
std::unordered_map<int64_t, DecodeContext>& decode_contexts() {
  static auto* contexts = new std::unordered_map<int64_t, DecodeContext>();  // (never destroyed: no exit-order race)
  return *contexts;
}
std::mutex& decode_contexts_lock() {
  static auto* lock = new std::mutex();
  return *lock;
}

void decode_context_set(int64_t handle, const torch::Tensor& slot_mapping, const torch::Tensor& block_tables,
                        const torch::Tensor& context_lens, const std::vector<torch::Tensor>& k_caches,
                        const std::vector<torch::Tensor>& v_caches, int64_t first_layer, py::object fallback) {
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous(),
              "slot_mapping: contiguous int64 [rows]");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kInt && block_tables.stride(1) == 1,
              "block_tables: int32 [rows, blocks] with contiguous rows");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.scalar_type() == at::kInt && context_lens.is_contiguous(),
              "context_lens: contiguous int32 [rows]");
  TORCH_CHECK(k_caches.size() == v_caches.size(), "one v cache per k cache");
  std::lock_guard<std::mutex> guard(decode_contexts_lock());
  DecodeContext& c = decode_contexts()[handle];
  c.slot_mapping = slot_mapping;
  c.block_tables = block_tables;
  c.context_lens = context_lens;
  c.k_caches = k_caches;
  c.v_caches = v_caches;
  c.first_layer = first_layer;
  c.fallback = std::move(fallback);
  c.observed = false;
}

void decode_context_observed(int64_t handle, bool observed) {
  std::lock_guard<std::mutex> guard(decode_contexts_lock());
  auto it = decode_contexts().find(handle);
  if (it != decode_contexts().end()) it->second.observed = observed;
}

void decode_context_clear(int64_t handle) {  // (called with the GIL held: the fallback is released under it)
  std::lock_guard<std::mutex> guard(decode_contexts_lock());
  decode_contexts().erase(handle);
}

[[maybe_unused]] torch::Tensor decode_attend_rotary(const torch::Tensor& q, const torch::Tensor& k,
                                                    const torch::Tensor& v, const torch::Tensor& cos,
                                                    const torch::Tensor& sin, int64_t handle, int64_t layer_idx,
                                                    double scale) {
  const DecodeContext* found = nullptr;
  {
    std::lock_guard<std::mutex> guard(decode_contexts_lock());
    auto it = decode_contexts().find(handle);
    if (it != decode_contexts().end()) found = &it->second;
  }
  TORCH_CHECK(found != nullptr, "decode_attend_rotary: no decode context ", handle,
              " (the engine that compiled this step is gone)");
  const DecodeContext& c = *found;
  const int64_t i = layer_idx - c.first_layer, rows = q.size(0);
  if (!c.observed && i >= 0 && i < static_cast<int64_t>(c.k_caches.size()) && rows <= c.context_lens.size(0)) {
    try {
      const torch::Tensor lens = c.context_lens.narrow(0, 0, rows);
      const int32_t* l = lens.data_ptr<int32_t>();
      int64_t max_len = 0;
      for (int64_t r = 0; r < rows; ++r) max_len = std::max<int64_t>(max_len, l[r]);
      const torch::Tensor& kc = c.k_caches[i];
      const torch::Tensor& vc = c.v_caches[i];
      const auto rotated = rotary_kv_write(q, k, v, cos, sin, c.slot_mapping.narrow(0, 0, rows), kc, vc, false);
      return paged_decode_attention(std::get<0>(rotated), kc, vc, c.block_tables.narrow(0, 0, rows), lens, scale,
                                    max_len);
    } catch (const c10::Error&) {
    }
  }
  py::gil_scoped_acquire gil;
  return c.fallback(q, k, v, cos, sin, handle, layer_idx, scale).cast<torch::Tensor>();
}

// ---- the eager decode step's forward in one call (direct_decode.DirectDecode) ---------------------------------
// The same kernels on the same arguments in the same order as DirectDecode's Python loop did (so the same bits):
// per layer RMSNorm, the qkv linear, the fused rotary + KV write, the paged decode attention, the o linear with the
// residual, RMSNorm, the gate/up linear, SwiGLU, the down linear with the residual; then the final RMSNorm. Three of
// them live in other extensions, called by address (`fns`: small_gemm's `linear_address()`, train_elementwise's
// `decode_addresses()`; the engine builds all three from this repository with one compiler against one torch, so the
// signatures below are theirs). A step through Python between the ~37 calls cost ~0.2 ms of the ~3.7 ms batch-64
// step of benchmarks/generate.py's ~3.5M model (the calls' glue runs on caches the kernels just left cold).
// layers: kDecodeLayerTensors a layer (input norm weight, qkv weight, qkv bias or an empty tensor, o weight, post
// norm weight, gate/up weight, gate/up bias or empty, down weight, k cache, v cache), the linears' weights as their
// small-M GEMM panels or, one_row, as the weights themselves (the one-row gemv's); dims: kDecodeLayerDims a layer
// (q heads, kv heads, and the four linears' output features); consts: the two norms' eps and the attention's scale.
using SmallLinearFn = torch::Tensor (*)(const torch::Tensor&, const torch::Tensor&, int64_t, int64_t, int64_t,
                                        const c10::optional<torch::Tensor>&, const c10::optional<torch::Tensor>&,
                                        int64_t);
using RmsNormOutFn = torch::Tensor (*)(const torch::Tensor&, const torch::Tensor&, double);
using SiluAndMulFn = torch::Tensor (*)(const torch::Tensor&);
constexpr size_t kDecodeLayerTensors = 10, kDecodeLayerDims = 6, kDecodeLayerConsts = 3;

torch::Tensor decode_layers(const std::vector<int64_t>& fns, const torch::Tensor& input_ids,
                            const torch::Tensor& embed, const std::vector<torch::Tensor>& layers,
                            const std::vector<int64_t>& dims, const std::vector<double>& consts,
                            const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& slots,
                            const torch::Tensor& positions, const torch::Tensor& block_tables,
                            const torch::Tensor& context_lens, int64_t max_len, const torch::Tensor& norm_weight,
                            double norm_eps, bool one_row, int64_t panel, int64_t row_block,
                            int64_t min_macs_per_thread) {
  const size_t L = layers.size() / kDecodeLayerTensors;
  TORCH_CHECK(fns.size() == 3 && layers.size() == L * kDecodeLayerTensors && dims.size() == L * kDecodeLayerDims &&
                  consts.size() == L * kDecodeLayerConsts,
              "decode_layers: 3 entry points and ", kDecodeLayerTensors, " tensors, ", kDecodeLayerDims, " dims and ",
              kDecodeLayerConsts, " constants a layer, got ", fns.size(), ", ", layers.size(), ", ", dims.size(),
              " and ", consts.size());
  const auto small_linear = reinterpret_cast<SmallLinearFn>(fns[0]);
  const auto rms_norm = reinterpret_cast<RmsNormOutFn>(fns[1]);
  const auto silu_and_mul = reinterpret_cast<SiluAndMulFn>(fns[2]);
  const auto linear = [&](const torch::Tensor& x, const torch::Tensor& w, int64_t n, const torch::Tensor& bias,
                          const c10::optional<torch::Tensor>& residual) {
    const c10::optional<torch::Tensor> b =
        bias.defined() && bias.numel() > 0 ? c10::optional<torch::Tensor>(bias) : c10::nullopt;
    return one_row ? gemv(x, w, b, residual)
                   : small_linear(x, w, n, panel, row_block, b, residual, min_macs_per_thread);
  };
  const torch::Tensor none;
  torch::Tensor x = at::embedding(embed, input_ids);
  const int64_t T = x.size(0);
  for (size_t i = 0; i < L; ++i) {
    const torch::Tensor* t = layers.data() + i * kDecodeLayerTensors;
    const int64_t* d = dims.data() + i * kDecodeLayerDims;
    const double* c = consts.data() + i * kDecodeLayerConsts;
    const torch::Tensor &k_cache = t[8], &v_cache = t[9];
    const torch::Tensor qkv = linear(rms_norm(x, t[0], c[0]), t[1], d[2], t[2], c10::nullopt);
    const torch::Tensor q = rotary_kv_write_qkv(qkv, d[0], d[1], cos, sin, slots, k_cache, v_cache, positions);
    const torch::Tensor o = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, c[2], max_len);
    x = linear(o.view({T, -1}), t[3], d[3], none, x);
    const torch::Tensor gate_up = linear(rms_norm(x, t[4], c[1]), t[5], d[4], t[6], c10::nullopt);
    x = linear(silu_and_mul(gate_up), t[7], d[5], none, x);
  }
  return rms_norm(x, norm_weight, norm_eps);
}

}  // namespace

// -DRL_ENGINE_NO_TORCH_LIBRARY: a second build of this file loaded beside the engine's (another ISA's, for the tests
// and benchmarks/decode_isa.py) leaves the rl_engine ops to the first, as torch refuses a second definition.
#if !defined(RL_ENGINE_NO_TORCH_LIBRARY)
TORCH_LIBRARY_FRAGMENT(rl_engine, m) {
  m.def("cpu_gemv(Tensor x, Tensor weight, Tensor? bias, Tensor? residual) -> Tensor");
  m.def("decode_attend_rotary(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, int handle, int layer_idx, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(rl_engine, CPU, m) {
  m.impl("cpu_gemv", &gemv);
  m.impl("decode_attend_rotary", &decode_attend_rotary);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv);
  m.def("set_reading", &set_reading);
  m.def("paged_decode_attention", &paged_decode_attention);
  m.def("isa", &isa, "the instruction set of the vector paths: avx512, avx2 or portable");
  m.def("argmax_rows", &argmax_rows);
  m.def("sample_rows", &sample_rows);
  m.def("token_uniforms", &token_uniforms);
  m.def("sample_rows_seeded", &sample_rows_seeded);
  m.def("decode_context_set", &decode_context_set);
  m.def("decode_context_clear", &decode_context_clear);
  m.def("decode_context_observed", &decode_context_observed);
  m.def("continue_decode_inputs", &continue_decode_inputs, py::arg("tokens"), py::arg("stopped"),
        py::arg("prev_positions"), py::arg("prev_tables"), py::arg("seqs"), py::arg("block_size"),
        py::arg("input_ids").noconvert(), py::arg("positions").noconvert(), py::arg("context_lens").noconvert(),
        py::arg("slot_mapping").noconvert(), py::arg("block_tables").noconvert());
  // without the GIL (its kernels touch no Python object; the step arena serves threads apart): a server's Python
  // threads in the engine's process run during a decode step, as they could between the Python loop's calls
  m.def("decode_layers", &decode_layers, py::call_guard<py::gil_scoped_release>());
  m.def("rotary_kv_write", &rotary_kv_write);
  m.def("rotary_kv_write_qkv", &rotary_kv_write_qkv, py::arg("qkv"), py::arg("q_heads"), py::arg("kv_heads"),
        py::arg("cos"), py::arg("sin"), py::arg("slot_mapping"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("positions") = py::none());
}
