// Batch-invariant causal attention for model.batch_invariant (rl_engine/kernels/invariant.py), built
// by rl_engine.kernels.cpu.load_source. One routine, `attend_query`, computes every query of every
// path (paged decode, chunked prefill over the paged cache, prefill and training over contiguous
// keys): a query's output bits depend only on its own q row, its keys and values at positions
// 0..pos, the head sizes and the scale, never on how many queries share the call, the thread split
// or where its keys live (a key row is found by position, through a block table or an offset).
//
// Per (query, kv head), for the G query heads of the GQA group (each K/V row is read once for all G):
//   q' = q * scale (fp32, rounded once);
//   s_t = q' . k_t for t = 0..pos: 16 fp32 lanes, lane i accumulating dims i, i + 16, ... by fma in
//         increasing order (a dim tail is zero-padded), then the lanes summed by a fixed tree
//         (i + i+8, then i + i+4, i + i+2, i + i+1);
//   m = max_t s_t (exact in any order);
//   e_t = exp(s_t - m) by one fma polynomial (Cephes' expf, within ~2 ulp), l = sum_t e_t with key t
//         in lane t mod 16, in increasing t, then the same lane tree;
//   o = (sum_t e_t v_t) / l: each output dim accumulates by fma over t = 0..pos in increasing order,
//         then one division, and one rounding to q's dtype.
// Every floating-point step is an explicit fma, add, mul, max or division on 16 lanes written once
// (`V16`), and there is no mul feeding an add that the compiler could contract (-ffp-contract=fast),
// so the bits are the same with AVX-512 (one 16-lane register), AVX2 (two 8-lane registers in the
// same lane order) and the scalar fallback (std::fma), whichever -march the build gets.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if (defined(__AVX512F__) || defined(__AVX2__)) && !defined(RL_INVARIANT_SCALAR)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t LANES = 16;

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

#if defined(__AVX512F__) && !defined(RL_INVARIANT_SCALAR) && !defined(RL_INVARIANT_AVX2)
#define RL_INVARIANT_ISA "avx512"
struct V16 {
  __m512 x;
  static V16 zero() { return {_mm512_setzero_ps()}; }
  static V16 set1(float a) { return {_mm512_set1_ps(a)}; }
  static V16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static V16 load(const c10::BFloat16* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, x); }
  friend V16 fma(V16 a, V16 b, V16 c) { return {_mm512_fmadd_ps(a.x, b.x, c.x)}; }
  friend V16 operator+(V16 a, V16 b) { return {_mm512_add_ps(a.x, b.x)}; }
  friend V16 operator-(V16 a, V16 b) { return {_mm512_sub_ps(a.x, b.x)}; }
  friend V16 operator*(V16 a, V16 b) { return {_mm512_mul_ps(a.x, b.x)}; }
  friend V16 vmax(V16 a, V16 b) { return {_mm512_max_ps(a.x, b.x)}; }
  friend V16 vmin(V16 a, V16 b) { return {_mm512_min_ps(a.x, b.x)}; }
  friend V16 vfloor(V16 a) { return {_mm512_roundscale_ps(a.x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)}; }
  // 2^n for integer-valued n in [-126, 127], through the exponent bits
  friend V16 pow2(V16 n) {
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n.x), _mm512_set1_epi32(127)), 23);
    return {_mm512_castsi512_ps(e)};
  }
  float sum() const {  // (i + i+8), (i + i+4), (i + i+2), (i + i+1)
    const __m256 lo = _mm512_castps512_ps256(x);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));
    const __m256 s8 = _mm256_add_ps(lo, hi);
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    return _mm_cvtss_f32(s1);
  }
};
#elif defined(__AVX2__) && defined(__FMA__) && !defined(RL_INVARIANT_SCALAR)
#define RL_INVARIANT_ISA "avx2"
struct V16 {  // lanes 0-7 in lo, 8-15 in hi
  __m256 lo, hi;
  static V16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static V16 set1(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
  static V16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static __m256 load8(const c10::BFloat16* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static V16 load(const c10::BFloat16* p) { return {load8(p), load8(p + 8)}; }
  void store(float* p) const { _mm256_storeu_ps(p, lo); _mm256_storeu_ps(p + 8, hi); }
  friend V16 fma(V16 a, V16 b, V16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
  friend V16 operator+(V16 a, V16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
  friend V16 operator-(V16 a, V16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
  friend V16 operator*(V16 a, V16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
  friend V16 vmax(V16 a, V16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
  friend V16 vmin(V16 a, V16 b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
  friend V16 vfloor(V16 a) { return {_mm256_floor_ps(a.lo), _mm256_floor_ps(a.hi)}; }
  static __m256 pow2_8(__m256 n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_castsi256_ps(e);
  }
  friend V16 pow2(V16 n) { return {pow2_8(n.lo), pow2_8(n.hi)}; }
  float sum() const {
    const __m256 s8 = _mm256_add_ps(lo, hi);
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    const __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    return _mm_cvtss_f32(s1);
  }
};
#else
#define RL_INVARIANT_ISA "scalar"
struct V16 {
  float v[LANES];
  static V16 zero() { return set1(0.f); }
  static V16 set1(float a) { V16 r; for (int i = 0; i < LANES; ++i) r.v[i] = a; return r; }
  static V16 load(const float* p) { V16 r; std::memcpy(r.v, p, sizeof r.v); return r; }
  static V16 load(const c10::BFloat16* p) {
    V16 r;
    for (int i = 0; i < LANES; ++i) r.v[i] = bf16_bits_to_float(p[i].x);
    return r;
  }
  void store(float* p) const { std::memcpy(p, v, sizeof v); }
  friend V16 fma(V16 a, V16 b, V16 c) { V16 r; for (int i = 0; i < LANES; ++i) r.v[i] = std::fma(a.v[i], b.v[i], c.v[i]); return r; }
  friend V16 operator+(V16 a, V16 b) { V16 r; for (int i = 0; i < LANES; ++i) r.v[i] = a.v[i] + b.v[i]; return r; }
  friend V16 operator-(V16 a, V16 b) { V16 r; for (int i = 0; i < LANES; ++i) r.v[i] = a.v[i] - b.v[i]; return r; }
  friend V16 operator*(V16 a, V16 b) { V16 r; for (int i = 0; i < LANES; ++i) r.v[i] = a.v[i] * b.v[i]; return r; }
  // x86 max/min semantics (the second operand when unordered); inputs here are never NaN
  friend V16 vmax(V16 a, V16 b) { V16 r; for (int i = 0; i < LANES; ++i) r.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i]; return r; }
  friend V16 vmin(V16 a, V16 b) { V16 r; for (int i = 0; i < LANES; ++i) r.v[i] = a.v[i] < b.v[i] ? a.v[i] : b.v[i]; return r; }
  friend V16 vfloor(V16 a) { V16 r; for (int i = 0; i < LANES; ++i) r.v[i] = std::floor(a.v[i]); return r; }
  friend V16 pow2(V16 n) {
    V16 r;
    for (int i = 0; i < LANES; ++i) {
      const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n.v[i]) + 127) << 23;
      std::memcpy(&r.v[i], &bits, sizeof bits);
    }
    return r;
  }
  float sum() const {
    float a[8];
    for (int i = 0; i < 8; ++i) a[i] = v[i] + v[i + 8];
    for (int i = 0; i < 4; ++i) a[i] = a[i] + a[i + 4];
    for (int i = 0; i < 2; ++i) a[i] = a[i] + a[i + 2];
    return a[0] + a[1];
  }
};
#endif

// exp(x) for x <= 0 (scores minus their max): Cephes' expf with every step an explicit fma, so no
// ISA or compiler contraction changes a bit. x is clamped to >= -87.3 (exp(-87.3) ~ 1.2e-38, added
// to a sum >= 1), so 2^n stays a normal number and p * 2^n is exact.
inline V16 exp_nonpositive(V16 x) {
  x = vmin(vmax(x, V16::set1(-87.3f)), V16::set1(0.f));
  const V16 n = vfloor(fma(x, V16::set1(1.44269504088896341f), V16::set1(0.5f)));
  V16 r = fma(n, V16::set1(-0.693359375f), x);
  r = fma(n, V16::set1(2.12194440e-4f), r);
  V16 p = V16::set1(1.9875691500E-4f);
  p = fma(p, r, V16::set1(1.3981999507E-3f));
  p = fma(p, r, V16::set1(8.3334519073E-3f));
  p = fma(p, r, V16::set1(4.1665795894E-2f));
  p = fma(p, r, V16::set1(1.6666665459E-1f));
  p = fma(p, r, V16::set1(5.0000001201E-1f));
  p = fma(p, r * r, r) + V16::set1(1.f);
  return p * pow2(n);
}

template <typename T>
inline V16 load16(const T* p) { return V16::load(p); }
template <>
inline V16 load16<c10::Half>(const c10::Half* p) {  // fp16: converted through a buffer (exact)
  float buf[LANES];
  for (int i = 0; i < LANES; ++i) buf[i] = static_cast<float>(p[i]);
  return V16::load(buf);
}

// One row of `n` elements as chunks of 16 lanes: read in place when n is a multiple of 16, else copied
// to `pad` (zeros past n) so no lane reads past the row.
template <typename T>
struct RowReader {
  int64_t n, chunks;
  std::vector<T> pad;
  explicit RowReader(int64_t n_) : n(n_), chunks((n_ + LANES - 1) / LANES), pad(n_ % LANES ? chunks * LANES : 0) {}
  const T* operator()(const T* row) {
    if (pad.empty()) return row;
    std::copy(row, row + n, pad.data());  // the tail stays zero
    return pad.data();
  }
};

// Scratch of one thread: q' of the group, its scores / weights, its accumulators.
struct Scratch {
  std::vector<float> q, s, acc, sums;
  std::vector<const void*> rows;  // the value rows of a query, by position
};

// P.V with all G x VC accumulators in registers (G and VC known at compile time): each accumulator is
// the same fma chain over t = 0..L-1 as in the generic loop below, but the G * VC chains interleave
// instead of each update going through memory (a store-to-load round trip per fma).
template <typename T, int G, int VC>
void weighted_values(const float* s, int64_t Lp, const void* const* rows, int64_t L, float* acc, int64_t Vp) {
  V16 a[G * VC];
  for (int k = 0; k < G * VC; ++k) a[k] = V16::zero();
  for (int64_t t = 0; t < L; ++t) {
    const T* vr = static_cast<const T*>(rows[t]);
    V16 v[VC];
    for (int c = 0; c < VC; ++c) v[c] = load16(vr + c * LANES);
    for (int g = 0; g < G; ++g) {
      const V16 p = V16::set1(s[g * Lp + t]);
      for (int c = 0; c < VC; ++c) a[g * VC + c] = fma(p, v[c], a[g * VC + c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < VC; ++c) a[g * VC + c].store(acc + g * Vp + c * LANES);
}

// The (G, VC) pairs with a register version (at most 16 accumulators); nullptr: the generic loop.
template <typename T>
using WeightedValues = void (*)(const float*, int64_t, const void* const*, int64_t, float*, int64_t);
template <typename T>
WeightedValues<T> weighted_values_for(int64_t G, int64_t VC) {
  if (G > 8 || VC > 8) return nullptr;  // G * 16 + VC names a pair only for VC < 16
  switch (G * 16 + VC) {
    case 1 * 16 + 1: return weighted_values<T, 1, 1>;
    case 1 * 16 + 2: return weighted_values<T, 1, 2>;
    case 1 * 16 + 4: return weighted_values<T, 1, 4>;
    case 1 * 16 + 8: return weighted_values<T, 1, 8>;
    case 2 * 16 + 1: return weighted_values<T, 2, 1>;
    case 2 * 16 + 2: return weighted_values<T, 2, 2>;
    case 2 * 16 + 4: return weighted_values<T, 2, 4>;
    case 2 * 16 + 8: return weighted_values<T, 2, 8>;
    case 4 * 16 + 1: return weighted_values<T, 4, 1>;
    case 4 * 16 + 2: return weighted_values<T, 4, 2>;
    case 4 * 16 + 4: return weighted_values<T, 4, 4>;
    case 8 * 16 + 1: return weighted_values<T, 8, 1>;
    case 8 * 16 + 2: return weighted_values<T, 8, 2>;
    default: return nullptr;
  }
}

// The one routine (see the header). q: the group's G query rows, q_head_stride apart; key_row(t) and
// value_row(t): this kv head's row of key position t (nullptr: outside the cache, reported by the
// caller). Writes G rows of Dv to out (out_head_stride apart). Returns false on a bad row.
template <typename T, typename KeyRow, typename ValueRow>
bool attend_query(const T* q, int64_t q_head_stride, int64_t G, int64_t D, int64_t Dv, int64_t pos, float scale,
                  KeyRow key_row, ValueRow value_row, T* out, int64_t out_head_stride, Scratch& sc,
                  RowReader<T>& krd, RowReader<T>& vrd) {
  const int64_t DC = krd.chunks, VC = vrd.chunks, Dp = DC * LANES, Vp = VC * LANES;
  const int64_t L = pos + 1, Lp = (L + LANES - 1) / LANES * LANES;
  sc.q.assign(G * Dp, 0.f);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) sc.q[g * Dp + d] = static_cast<float>(q[g * q_head_stride + d]) * scale;
  if (static_cast<int64_t>(sc.s.size()) < G * Lp) sc.s.resize(G * Lp);
  float* s = sc.s.data();
  // scores
  for (int64_t t = 0; t < L; ++t) {
    const T* kr = key_row(t);
    if (kr == nullptr) return false;
    kr = krd(kr);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = sc.q.data() + g * Dp;
      V16 a = V16::zero();
      for (int64_t c = 0; c < DC; ++c) a = fma(V16::load(qg + c * LANES), load16(kr + c * LANES), a);
      s[g * Lp + t] = a.sum();
    }
  }
  // weights e_t = exp(s_t - m), zero past pos, and their sums
  sc.sums.resize(G);
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * Lp;
    float m = sg[0];
    for (int64_t t = 1; t < L; ++t) m = std::max(m, sg[t]);
    for (int64_t t = L; t < Lp; ++t) sg[t] = m;
    const V16 mv = V16::set1(m);
    for (int64_t t = 0; t < Lp; t += LANES) exp_nonpositive(V16::load(sg + t) - mv).store(sg + t);
    for (int64_t t = L; t < Lp; ++t) sg[t] = 0.f;
    V16 l = V16::zero();
    for (int64_t t = 0; t < Lp; t += LANES) l = l + V16::load(sg + t);
    sc.sums[g] = l.sum();
  }
  // P.V in increasing key order
  sc.acc.assign(G * Vp, 0.f);
  float* acc = sc.acc.data();
  const WeightedValues<T> in_registers = vrd.pad.empty() ? weighted_values_for<T>(G, VC) : nullptr;
  if (in_registers != nullptr) {  // value rows read in place (no tail)
    sc.rows.resize(L);
    for (int64_t t = 0; t < L; ++t)
      if ((sc.rows[t] = value_row(t)) == nullptr) return false;
    in_registers(s, Lp, sc.rows.data(), L, acc, Vp);
  } else for (int64_t t = 0; t < L; ++t) {
    const T* vr = value_row(t);
    if (vr == nullptr) return false;
    vr = vrd(vr);
    for (int64_t c = 0; c < VC; ++c) {
      const V16 vc = load16(vr + c * LANES);
      for (int64_t g = 0; g < G; ++g) {
        float* ag = acc + g * Vp + c * LANES;
        fma(V16::set1(s[g * Lp + t]), vc, V16::load(ag)).store(ag);
      }
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < Dv; ++d) out[g * out_head_stride + d] = static_cast<T>(acc[g * Vp + d] / sc.sums[g]);
  return true;
}

// Tasks are (query, kv head) pairs; a chunk of them per at::parallel_for range. `positions[n] < 0`:
// a padding query, zeros.
template <typename T, typename MakeRows>
void run_tasks(const torch::Tensor& q, torch::Tensor& out, const int32_t* positions, int64_t Hkv, int64_t Dv,
               float scale, MakeRows make_rows, std::atomic<bool>& bad) {
  const int64_t N = q.size(0), Hq = q.size(1), D = q.size(2), G = Hq / Hkv;
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  int64_t total = 0;
  for (int64_t n = 0; n < N; ++n) total += std::max<int64_t>(0, positions[n] + 1);
  const int64_t tasks = N * Hkv;
  const int64_t per_task = std::max<int64_t>(1, total * G * (D + Dv) / std::max<int64_t>(1, N));
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / per_task);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    Scratch sc;
    RowReader<T> krd(D), vrd(Dv);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / Hkv, h = task % Hkv;
      T* o = op + n * os0 + h * G * os1;
      const int64_t pos = positions[n];
      bool ok = pos >= 0;
      if (ok) {
        auto rows = make_rows(n, h);
        ok = attend_query<T>(qp + n * qs0 + h * G * qs1, qs1, G, D, Dv, pos, scale, rows.first, rows.second, o,
                             os1, sc, krd, vrd);
        if (!ok) bad = true;
      }
      if (!ok)
        for (int64_t g = 0; g < G; ++g) std::fill(o + g * os1, o + g * os1 + Dv, static_cast<T>(0.f));
    }
  });
}

void check_common(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                  const torch::Tensor& positions, int64_t Hkv) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [tokens, heads, head_dim] with a contiguous last dim");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k and v must share a dtype");
  TORCH_CHECK(Hkv > 0 && q.size(1) % Hkv == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(positions.scalar_type() == at::kInt && positions.is_contiguous() && positions.numel() == q.size(0),
              "positions: int32 [tokens]");
  TORCH_CHECK(!q.is_cuda(), "CPU kernel");
}

// fp32, bf16 and fp16 (fp16 rows are converted through a buffer)
template <typename F>
void dispatch(at::ScalarType type, const char* name, F&& f) {
  switch (type) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, name, ": dtype ", type, " is not fp32, bf16 or fp16");
  }
}

// Keys through a block table: query n reads row tables[rows[n]], key position t lives in block
// table[t / block_size] at offset t % block_size of k_cache [num_blocks, block_size, Hkv, D].
torch::Tensor paged(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                    const torch::Tensor& block_tables, const torch::Tensor& table_rows,
                    const torch::Tensor& positions, double scale) {
  const int64_t Hkv = k_cache.size(2);
  check_common(q, k_cache, v_cache, positions, Hkv);
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "k_cache/v_cache: contiguous [num_blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(k_cache.size(3) == q.size(2), "k_cache's head_dim must be q's");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.stride(1) == 1,
              "block_tables: int32 [rows, max_blocks]");
  TORCH_CHECK(table_rows.scalar_type() == at::kInt && table_rows.is_contiguous() && table_rows.numel() == q.size(0),
              "table_rows: int32 [tokens]");
  const int64_t bs = k_cache.size(1), Dv = v_cache.size(3), num_blocks = k_cache.size(0);
  const int64_t width = block_tables.size(1), R = block_tables.size(0), tab_s = block_tables.stride(0);
  const int64_t ktok = Hkv * k_cache.size(3), vtok = Hkv * Dv;
  auto out = torch::empty({q.size(0), q.size(1), Dv}, q.options());
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* rows = table_rows.data_ptr<int32_t>();
  std::atomic<bool> bad{false};
  dispatch(q.scalar_type(), "invariant paged attention", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* kc = k_cache.data_ptr<scalar_t>();
    const scalar_t* vc = v_cache.data_ptr<scalar_t>();
    const int64_t D = q.size(2);
    run_tasks<scalar_t>(q, out, positions.data_ptr<int32_t>(), Hkv, Dv, static_cast<float>(scale),
        [&](int64_t n, int64_t h) {
          const int64_t r = rows[n];
          const int32_t* table = (r >= 0 && r < R) ? tables + r * tab_s : nullptr;
          auto slot = [=](int64_t t) -> int64_t {
            if (table == nullptr || t / bs >= width) return -1;
            const int64_t block = table[t / bs];
            return (block < 0 || block >= num_blocks) ? -1 : block * bs + t % bs;
          };
          auto key = [=](int64_t t) -> const scalar_t* {
            const int64_t sl = slot(t);
            return sl < 0 ? nullptr : kc + sl * ktok + h * D;
          };
          auto value = [=](int64_t t) -> const scalar_t* {
            const int64_t sl = slot(t);
            return sl < 0 ? nullptr : vc + sl * vtok + h * Dv;
          };
          return std::make_pair(key, value);
        }, bad);
  });
  TORCH_CHECK(!bad, "invariant paged attention: a query's table row or a block table entry within its context is "
              "outside the block table / the cache's ", num_blocks, " blocks");
  return out;
}

// Keys in rows of k [Tk, Hkv, D] (any row stride): query n reads rows key_starts[n] + 0..positions[n].
torch::Tensor contiguous(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                         const torch::Tensor& key_starts, const torch::Tensor& positions, double scale) {
  const int64_t Hkv = k.size(1);
  check_common(q, k, v, positions, Hkv);
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.size(0) == v.size(0) && v.size(1) == Hkv && k.size(2) == q.size(2),
              "k: [keys, kv_heads, head_dim] and v: [keys, kv_heads, v_head_dim]");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(1) == v.size(2),
              "k/v rows must be contiguous per token");
  TORCH_CHECK(key_starts.scalar_type() == at::kInt && key_starts.is_contiguous() && key_starts.numel() == q.size(0),
              "key_starts: int32 [tokens]");
  const int64_t Tk = k.size(0), Dv = v.size(2), ks = k.stride(0), vs = v.stride(0);
  auto out = torch::empty({q.size(0), q.size(1), Dv}, q.options());
  const int32_t* starts = key_starts.data_ptr<int32_t>();
  std::atomic<bool> bad{false};
  dispatch(q.scalar_type(), "invariant attention", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    const int64_t D = q.size(2);
    run_tasks<scalar_t>(q, out, positions.data_ptr<int32_t>(), Hkv, Dv, static_cast<float>(scale),
        [&](int64_t n, int64_t h) {
          const int64_t start = starts[n];
          auto key = [=](int64_t t) -> const scalar_t* {
            const int64_t row = start + t;
            return (start < 0 || row >= Tk) ? nullptr : kp + row * ks + h * D;
          };
          auto value = [=](int64_t t) -> const scalar_t* {
            const int64_t row = start + t;
            return (start < 0 || row >= Tk) ? nullptr : vp + row * vs + h * Dv;
          };
          return std::make_pair(key, value);
        }, bad);
  });
  TORCH_CHECK(!bad, "invariant attention: a query's keys (key_starts + 0..position) run past the ", Tk, " key rows");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged", &paged);
  m.def("contiguous", &contiguous);
  m.attr("isa") = RL_INVARIANT_ISA;
}
