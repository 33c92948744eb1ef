// Shared by the C++ CPU kernel files of rl_engine (included by name; kernels/cpu/__init__.py's
// extension_name hashes every header of csrc/ into each build's cache name, so editing this rebuilds them).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace rl_engine_cpu {

// exp for fp32 that the compiler vectorises (libm's expf is a call per element): Cephes' expf, a
// degree-6 polynomial on x - n ln2 with n = round(x / ln2), scaled by 2^n through the exponent bits;
// within 2 ulps of expf on [-87.3, 88] (inputs are clamped there: exp(-inf) gives ~1e-38, not 0,
// which every use below multiplies by zero or adds to a sum of at least 1).
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

}  // namespace rl_engine_cpu
