// The inference engine's bf16 RMSNorm without autograd (rl_engine/kernels/cpu/engine_elementwise.py calls it for
// bf16 inputs): the optional residual add and the norm in one pass over each row, threads over rows (ATen's
// intra-op pool). Rows as train_elementwise.cpp's (rows.h: [rows, H], the last dim contiguous, any row stride).
// Built by rl_engine.kernels.cpu.load_source, its own extension: a failed build of this file leaves the fp32
// kernels of train_elementwise.cpp running.
//
// In torch the reference takes ~7 passes over [rows, H] (add, upcast, square, sum, scale, downcast, weight); here
// a row stays in cache. bf16 is widened and rounded (to nearest even, NaN kept) with integer lane operations the
// compiler vectorises. (SwiGLU stays torch's in bf16: a one-pass C++ SwiGLU measured 0.46-0.71x of torch's silu
// then mul_ at 64-1,500 rows; its fp32 exp polynomial plus the conversions cost more than torch's two passes.)
//
// Numerics: the reference's (rl_engine/kernels/reference.py) steps and roundings to bf16: x (+ residual, rounded:
// the next residual stream) in fp32; inv = 1 / sqrt(eps + sum(x^2) / H); out = round(w * round(x * inv)). The
// sum is in per-lane fp32 accumulators (torch's order differs: within a few fp32 ulp before the rounding to bf16).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "rows.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// bf16 <-> fp32 over n elements, vectorisable (bit operations, no branches).
inline void widen(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}
// c10's round_to_nearest_even: (u + 0x7fff + lsb) >> 16, a NaN as 0x7fc0
inline void narrow(const float* src, c10::BFloat16* dst, int64_t n) {
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = s[i];
    const uint16_t rounded = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    d[i] = (u & 0x7fffffffu) > 0x7f800000u ? static_cast<uint16_t>(0x7fc0) : rounded;
  }
}
// x rounded to bf16 and back
inline void round_through(float* x, c10::BFloat16* tmp, int64_t n) {
  narrow(x, tmp, n);
  widen(tmp, x, n);
}

using rl_engine_cpu::check_rows;
using rl_engine_cpu::grain_rows;

using T = c10::BFloat16;

// rows of x and res at row strides sx and sr; out and res_out contiguous [rows, H]
void rms_norm_rows(const T* x, int64_t sx, const T* res, int64_t sr, const T* w, T* out, T* res_out, int64_t rows,
                   int64_t H, float eps) {
  const float inv_h = static_cast<float>(1.0 / static_cast<double>(H));
  at::parallel_for(0, rows, grain_rows(H), [&](int64_t begin, int64_t end) {
    std::vector<float> hb(H), wb(H), tb(H);
    std::vector<T> rounded(H);
    widen(w, wb.data(), H);
    float* h = hb.data();
    float* t = tb.data();
    for (int64_t r = begin; r < end; ++r) {
      widen(x + r * sx, h, H);
      if (res != nullptr) {  // x + residual, rounded to T: the next residual stream
        widen(res + r * sr, t, H);
#pragma omp simd
        for (int64_t i = 0; i < H; ++i) h[i] += t[i];
        narrow(h, res_out + r * H, H);
        widen(res_out + r * H, h, H);
      }
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < H; ++i) ss += h[i] * h[i];
      const float inv = 1.f / std::sqrt(eps + inv_h * ss);
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) t[i] = h[i] * inv;
      round_through(t, rounded.data(), H);
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) t[i] = wb[i] * t[i];
      narrow(t, out + r * H, H);
    }
  });
}

// (out [R, H], new residual [R, H] or an empty tensor) of the reference's rms_norm over the rows of x [R, H]
std::vector<torch::Tensor> rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                                    const c10::optional<torch::Tensor>& residual) {
  check_rows(x, "x", 2, at::kBFloat16);
  check_rows(weight, "weight", 1, at::kBFloat16);
  const int64_t R = x.size(0), H = x.size(1);
  TORCH_CHECK(weight.size(0) == H, "weight has ", weight.size(0), " entries, x rows have ", H);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) {
    check_rows(*residual, "residual", 2, at::kBFloat16);
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual shape ", residual->sizes(), " != x shape ", x.sizes());
  }
  auto out = torch::empty({R, H}, x.options());
  auto res_out = has_res ? torch::empty({R, H}, x.options()) : torch::empty({0}, x.options());
  rms_norm_rows(x.data_ptr<T>(), x.stride(0), has_res ? residual->data_ptr<T>() : nullptr,
                has_res ? residual->stride(0) : 0, weight.data_ptr<T>(), out.data_ptr<T>(),
                has_res ? res_out.data_ptr<T>() : nullptr, R, H, static_cast<float>(eps));
  return {out, res_out};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim (+ residual add): (out, new residual or empty)");
}
