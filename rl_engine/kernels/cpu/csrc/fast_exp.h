// Shared by the C++ CPU kernel files of rl_engine (included by name; kernels/cpu/__init__.py's
// extension_name hashes every header of csrc/ into each build's cache name, so editing this rebuilds them).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace rl_engine_cpu {

// exp for fp32 that the compiler vectorises (libm's expf is a call per element): Cephes' expf, a
// degree-6 polynomial on x - n ln2 with n = round(x / ln2), scaled by 2^n through the exponent bits;
// within 2 ulps of expf on [-87.3, 88] (inputs are clamped there: exp(-inf) gives ~1e-38, not 0,
// which every use below multiplies by zero or adds to a sum of at least 1). fast_exp16 below is its 16-lane twin.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.3f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

#if defined(__AVX512F__)
// fast_exp of 16 lanes (AVX-512 builds): fast_exp's operations in its order, with the products fused where
// -ffp-contract=fast fuses them in the compiled fast_exp (x * log2e + 0.5, x - n * c1 + n * c2, each p * r + c,
// p * r * r + r), so every lane has fast_exp's bits (cpu_ops.cpp's sampled pick; tests/kernels/test_cpu_ops_avx2
// compares its tokens and log-probs with the AVX2 build's row-by-row `sample_row`). A change to one of the two
// expressions must be made to the other.
inline __m512 fast_exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.3f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                                   _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}
#endif

}  // namespace rl_engine_cpu
