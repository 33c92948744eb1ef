// 16 fp32 lanes for the C++ CPU kernels written with the GCC / Clang vector extension (prefill_attention.cpp,
// varlen_attention.cpp): one AVX-512 register, two AVX2 ones, or scalar code, as the build's -march allows. Loads
// and stores through memcpy (any alignment). Included by name; kernels/cpu/__init__.py's extension_name hashes every
// header of csrc/ into each build's cache name, so editing this rebuilds them.
#pragma once

#include <cstring>

namespace rl_engine_cpu {

typedef float v16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
// every lane x: one broadcast (`v16{} + x` costs a scalar add first: 0 + x is not x for x = -0)
inline v16 splat(float x) { return v16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

}  // namespace rl_engine_cpu
