// The training forward's elementwise ops, forward and backward, fp32, one pass each over rows (threads over
// rows with ATen's intra-op pool): RMSNorm (with the optional residual add), SwiGLU (silu(gate) * up), the
// full-width rotate-half rotary, and the log-prob / entropy statistics of vocab-shard logits with their logits
// gradient. Built by rl_engine.kernels.cpu.load_source; the autograd Functions over them are in
// rl_engine/kernels/cpu/train_elementwise.py.
//
// In torch each of these is a handful of elementwise ops forward and as many backward, each a pass over
// [T, width] with its own dispatch and allocation (at a small model's widths, 64 to 384 floats a row, the
// passes and the dispatches are the cost, not the arithmetic); here each is one pass that keeps a row in cache.
//
// Numerics: RMSNorm sums a row's squares in one fp32 accumulator per vector lane (torch's order differs: within
// a few ulp); SwiGLU's exp is fast_exp.h's (~2 ulp); the rotary forward and backward are bit-equal to torch's
// x * cos + roll(x, D / 2) * sin and its backward (a product, a product, a sum, each rounded: no fused
// multiply-add there, see `rotary_row`); the log-prob statistics' exp is fast_exp's too.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "fast_exp.h"
#include "rows.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using rl_engine_cpu::fast_exp;
#if defined(__AVX512F__)
using rl_engine_cpu::fast_exp16;
#endif

using rl_engine_cpu::check_rows;  // fp32 rows (rows.h)
using rl_engine_cpu::grain_rows;

// ---- RMSNorm -------------------------------------------------------------------------------------------------

// A width a row kernel is compiled for (`NC`), or 0: the width at run time. At a small model's widths (64 floats a
// row: four 16-float vectors) each runtime-width loop's setup and remainder handling cost more than its arithmetic
// (the RMSNorm backward's three loops a row ran ~5x its forward's time at [4075, 64]); a compile-time width unrolls
// them. `dispatch_width` picks the instance: the RMSNorm's widths 64 and 128, the rotary's head dims 16-128.
template <int64_t NC>
inline int64_t width_of(int64_t N) { return NC > 0 ? NC : N; }

// f(std::integral_constant<int64_t, W>()) for the first compiled width W equal to N, else with 0 (N at run time).
template <int64_t... Widths, typename F>
inline void dispatch_width(int64_t N, F&& f) {
  if (!((N == Widths && (f(std::integral_constant<int64_t, Widths>()), true)) || ...)) {
    f(std::integral_constant<int64_t, 0>());
  }
}

// One thread's rows [begin, end) of rms_norm_forward.
template <int64_t NC>
void rms_norm_forward_rows(int64_t begin, int64_t end, int64_t N_, const float* xp, int64_t sx, const float* rp,
                           int64_t sr, const float* __restrict wp, float* op, float* sp, float* rs, float feps) {
  const int64_t N = width_of<NC>(N_);
  const float inv_n = 1.0f / static_cast<float>(N);
  for (int64_t r = begin; r < end; ++r) {
    const float* h = xp + r * sx;  // not __restrict: re-pointed below at the summed row written through s
    if (rp != nullptr) {
      const float* __restrict a = rp + r * sr;
      float* __restrict s = sp + r * N;
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) s[i] = h[i] + a[i];
      h = s;
    }
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < N; ++i) ss += h[i] * h[i];
    const float k = 1.0f / std::sqrt(ss * inv_n + feps);
    if (rs != nullptr) rs[r] = k;
    float* __restrict o = op + r * N;
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) o[i] = wp[i] * (h[i] * k);
  }
}

// RMSNorm's rows of x [R, N] (+ residual rows rp, sr apart) into out (op), and x + residual (sp) and rstd (rs) where
// not null: rms_norm_forward's and rms_norm_out's one loop over the rows, so both give the same bits.
void rms_norm_run(const torch::Tensor& x, const torch::Tensor& weight, double eps, const float* rp, int64_t sr,
                  float* op, float* sp, float* rs) {
  const int64_t R = x.size(0), N = x.size(1), sx = x.stride(0);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  dispatch_width<64, 128>(N, [&](auto nc) {
    at::parallel_for(0, R, grain_rows(N), [&](int64_t begin, int64_t end) {
      rms_norm_forward_rows<decltype(nc)::value>(begin, end, N, xp, sx, rp, sr, wp, op, sp, rs, feps);
    });
  });
}

void check_rms_norm(const torch::Tensor& x, const torch::Tensor& weight) {
  check_rows(x, "x", 2);
  check_rows(weight, "weight", 1);
  TORCH_CHECK(weight.size(0) == x.size(1), "weight has ", weight.size(0), " entries, x rows have ", x.size(1));
}

// (out [R, N], h [R, N] (x + residual; empty without a residual), rstd [R]) of out = w * (h * rstd),
// rstd = 1 / sqrt(mean(h^2) + eps), h = x (+ residual).
std::vector<torch::Tensor> rms_norm_forward(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                                            const c10::optional<torch::Tensor>& residual) {
  check_rms_norm(x, weight);
  const int64_t R = x.size(0), N = x.size(1);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) {
    check_rows(*residual, "residual", 2);
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual shape ", residual->sizes(), " != x shape ", x.sizes());
  }
  auto out = torch::empty({R, N}, x.options());
  auto sum = has_res ? torch::empty({R, N}, x.options()) : torch::empty({0}, x.options());
  auto rstd = torch::empty({R}, x.options());
  rms_norm_run(x, weight, eps, has_res ? residual->data_ptr<float>() : nullptr, has_res ? residual->stride(0) : 0,
               out.data_ptr<float>(), has_res ? sum.data_ptr<float>() : nullptr, rstd.data_ptr<float>());
  return {out, sum, rstd};
}

// out alone of rms_norm_forward without a residual (the same rows, the same bits): one tensor made and returned
// where rms_norm_forward makes three and returns a list of them, ~2 us of its ~4.5 us a call at a decode step's
// [64, 256] (the engine's direct decode forward, 9 calls a step on the ~3.5M model).
torch::Tensor rms_norm_out(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  check_rms_norm(x, weight);
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  rms_norm_run(x, weight, eps, nullptr, 0, out.data_ptr<float>(), nullptr, nullptr);
  return out;
}

// One thread's rows [begin, end) of rms_norm_backward, its rows' dw summed into dw [N].
template <int64_t NC>
void rms_norm_backward_rows(int64_t begin, int64_t end, int64_t N_, const float* gp, int64_t sg, const float* hp,
                            int64_t shh, const float* __restrict wp, const float* rs, const float* gsp, int64_t sgs,
                            float* dp, float* __restrict dw) {
  const int64_t N = width_of<NC>(N_);
  const float inv_n = 1.0f / static_cast<float>(N);
  for (int64_t r = begin; r < end; ++r) {
    const float* __restrict g = gp + r * sg;
    const float* __restrict x = hp + r * shh;
    const float k = rs[r];
    float dot = 0.f;  // sum of g w xhat
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < N; ++i) dot += g[i] * wp[i] * (x[i] * k);
    const float c = dot * inv_n;
    float* __restrict d = dp + r * N;
    if (gsp != nullptr) {
      const float* __restrict gs = gsp + r * sgs;
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) d[i] = k * (g[i] * wp[i] - (x[i] * k) * c) + gs[i];
    } else {
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) d[i] = k * (g[i] * wp[i] - (x[i] * k) * c);
    }
#pragma omp simd
    for (int64_t i = 0; i < N; ++i) dw[i] += g[i] * (x[i] * k);
  }
}

// (dh [R, N], dw [N]): dh = rstd * (g w - xhat mean(g w xhat)) (+ g_sum), dw = sum over rows of g xhat,
// xhat = h rstd. Each thread sums its rows' dw into its own row of a [threads, N] buffer, summed at the end.
std::vector<torch::Tensor> rms_norm_backward(const torch::Tensor& grad, const torch::Tensor& h,
                                             const torch::Tensor& weight, const torch::Tensor& rstd,
                                             const c10::optional<torch::Tensor>& grad_sum) {
  check_rows(grad, "grad", 2);
  check_rows(h, "h", 2);
  check_rows(weight, "weight", 1);
  const int64_t R = h.size(0), N = h.size(1);
  TORCH_CHECK(grad.sizes() == h.sizes(), "grad shape ", grad.sizes(), " != input shape ", h.sizes());
  TORCH_CHECK(rstd.is_contiguous() && rstd.numel() == R, "rstd must be contiguous with ", R, " entries");
  const bool has_gs = grad_sum.has_value() && grad_sum->defined();
  if (has_gs) {
    check_rows(*grad_sum, "grad_sum", 2);
    TORCH_CHECK(grad_sum->sizes() == h.sizes(), "grad_sum shape ", grad_sum->sizes(), " != ", h.sizes());
  }
  auto dh = torch::empty({R, N}, h.options());
  const int64_t threads = at::get_num_threads();
  auto partial = torch::zeros({threads, N}, h.options());
  const float* gp = grad.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* rs = rstd.data_ptr<float>();
  const float* gsp = has_gs ? grad_sum->data_ptr<float>() : nullptr;
  float* dp = dh.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  const int64_t sg = grad.stride(0), shh = h.stride(0), sgs = has_gs ? grad_sum->stride(0) : 0;
  dispatch_width<64, 128>(N, [&](auto nc) {
    at::parallel_for(0, R, grain_rows(N), [&](int64_t begin, int64_t end) {
      float* dw = pp + std::min<int64_t>(at::get_thread_num(), threads - 1) * N;
      rms_norm_backward_rows<decltype(nc)::value>(begin, end, N, gp, sg, hp, shh, wp, rs, gsp, sgs, dp, dw);
    });
  });
  return {dh, partial.sum(0)};
}

// ---- SwiGLU --------------------------------------------------------------------------------------------------

// o[i] = silu(a[i]) * b[i], i < d: the sigmoid first, then two products (half the time of a[i] / (1 + e) * b[i],
// measured). The AVX-512 build's 16-lane form has the loop's bits: fast_exp16 has fast_exp's, and 1 + e rounds
// alike fused or not (e = p * 2^n is exact, or below 2^-126); tests/kernels/test_cpu_train_elementwise.py compares
// it with the loop, which silu_and_mul_backward runs, over wide inputs. GCC's own vectorisation of the loop took
// ~1.4x its time at [64, 1536] (24 against 16.5 us): it splits the lanes by fast_exp's clamp with compares and
// blends.
inline void silu_and_mul_row(const float* __restrict a, const float* __restrict b, float* __restrict o, int64_t d) {
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.0f);
  const auto silu_mul16 = [one](__m512 av, __m512 bv) {
    const __m512 neg = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(av), _mm512_set1_epi32(INT32_MIN)));
    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, fast_exp16(neg)));
    return _mm512_mul_ps(_mm512_mul_ps(av, sig), bv);
  };
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) _mm512_storeu_ps(o + i, silu_mul16(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i)));
  if (i < d) {
    const __mmask16 m = static_cast<__mmask16>((1u << (d - i)) - 1);
    _mm512_mask_storeu_ps(o + i, m, silu_mul16(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i)));
  }
#else
  for (int64_t i = 0; i < d; ++i) {
    const float sig = 1.0f / (1.0f + fast_exp(-a[i]));
    o[i] = a[i] * sig * b[i];
  }
#endif
}

// out [R, d] = silu(x[:, :d]) * x[:, d:], x [R, 2d] (rows strided).
torch::Tensor silu_and_mul_forward(const torch::Tensor& x) {
  check_rows(x, "x", 2);
  TORCH_CHECK(x.size(1) % 2 == 0, "x's last dim (", x.size(1), ") must be even: [gate | up]");
  const int64_t R = x.size(0), d = x.size(1) / 2, sx = x.stride(0);
  auto out = torch::empty({R, d}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, grain_rows(3 * d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* __restrict a = xp + r * sx;
      const float* __restrict b = a + d;
      float* __restrict o = op + r * d;
      silu_and_mul_row(a, b, o, d);
    }
  });
  return out;
}

// One row of SwiGLU's backward: da[i] = g[i] b[i] (sig (1 + a[i] (1 - sig))), db[i] = g[i] (a[i] sig), sig =
// sigmoid(a[i]) as the forward's. da / db may be a / b themselves (the backward written over its input, `in_place`):
// each element is read before its own two outputs are written, and no other element reads it. Every product and
// sum is rounded apart, as GCC compiled the scalar loop this replaces (its vectorised loop kept a (1 - sig) out of a
// fused multiply-add); the empty asm keeps -ffp-contract=fast from fusing it here. The AVX-512 form has the bits of
// the loop that builds without AVX-512 run (fast_exp16 has fast_exp's; 1 + e rounds alike fused or not):
// tests/kernels/test_cpu_train_elementwise.py compares the two builds. GCC's own vectorisation of the loop split the
// lanes by fast_exp's clamp with compares and blends: 1.04-1.17x this one's time at [7504, 384] (cold, 1 / 2 threads).
inline void silu_and_mul_backward_row(const float* a, const float* b, const float* __restrict g, float* da, float* db,
                                      int64_t d) {
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.0f);
  const auto grads16 = [one](__m512 av, __m512 bv, __m512 gv, __m512& dav, __m512& dbv) {
    const __m512 neg = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(av), _mm512_set1_epi32(INT32_MIN)));
    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, fast_exp16(neg)));
    __m512 t = _mm512_mul_ps(av, _mm512_sub_ps(one, sig));
    asm("" : "+v"(t));  // a (1 - sig) rounded before the sum
    dav = _mm512_mul_ps(_mm512_mul_ps(gv, bv), _mm512_mul_ps(sig, _mm512_add_ps(one, t)));
    dbv = _mm512_mul_ps(gv, _mm512_mul_ps(av, sig));
  };
  __m512 dav, dbv;
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    grads16(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), _mm512_loadu_ps(g + i), dav, dbv);
    _mm512_storeu_ps(da + i, dav);
    _mm512_storeu_ps(db + i, dbv);
  }
  if (i < d) {
    const __mmask16 m = static_cast<__mmask16>((1u << (d - i)) - 1);
    grads16(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), _mm512_maskz_loadu_ps(m, g + i), dav,
            dbv);
    _mm512_mask_storeu_ps(da + i, m, dav);
    _mm512_mask_storeu_ps(db + i, m, dbv);
  }
#else
  for (int64_t i = 0; i < d; ++i) {
    const float ai = a[i], bi = b[i], gi = g[i];
    const float sig = 1.0f / (1.0f + fast_exp(-ai));
    float t = ai * (1.0f - sig);
    asm("" : "+x"(t));
    da[i] = gi * bi * (sig * (1.0f + t));
    db[i] = gi * (ai * sig);
  }
#endif
}

// dx [R, 2d]: d gate = g up sig (1 + gate (1 - sig)), d up = g silu(gate), sig = sigmoid(gate). `in_place`: dx is x
// itself, written over (x's rows at their stride), for a caller whose x has no other reader (SwiGLUMLP's gate_up
// output): no fresh [R, 2d] buffer to fill.
torch::Tensor silu_and_mul_backward(const torch::Tensor& grad, const torch::Tensor& x, bool in_place) {
  check_rows(grad, "grad", 2);
  check_rows(x, "x", 2);
  const int64_t R = x.size(0), d = x.size(1) / 2, sx = x.stride(0), sg = grad.stride(0);
  TORCH_CHECK(grad.size(0) == R && grad.size(1) == d, "grad shape ", grad.sizes(), " != [", R, ", ", d, "]");
  auto dx = in_place ? x : torch::empty({R, 2 * d}, x.options());
  const int64_t sd = dx.stride(0);
  const float* xp = x.data_ptr<float>();
  const float* gp = grad.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  at::parallel_for(0, R, grain_rows(5 * d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* a = xp + r * sx;
      float* da = dp + r * sd;
      silu_and_mul_backward_row(a, a + d, gp + r * sg, da, da + d, d);
    }
  });
  return dx;
}

// ---- rotary --------------------------------------------------------------------------------------------------

// One token's heads: out[h][i] = x[h][i] * c[i] + x[h][(i + D/2) % D] * s[i] (forward, `transpose` false), or
// out[h][j] = x[h][j] * c[j] + x[h][(j + D/2) % D] * s[(j + D/2) % D] (the backward, x the output's gradient).
// Each product and the sum rounded apart, as torch's mul, mul, add: no fused multiply-add under this file's
// -ffp-contract=fast (GCC's optimize attribute; under clang, which ignores it, the clang pragma below, honoured under
// the -ffp-contract=on that kernels/cpu/__init__.py gives clang), so the results equal torch's bit for bit.
// DC: the head_dim compiled for (`dispatch_width`; at 16, a small model's, each half is one 8-float loop, whose
// run-time setup cost more than its arithmetic), or 0: D at run time.
template <int64_t DC>
__attribute__((optimize("fp-contract=off"))) void rotary_row(const float* x, int64_t head_stride, int64_t heads,
                                                              int64_t D_, const float* c, const float* s, float* out,
                                                              bool transpose) {
  const int64_t D = width_of<DC>(D_);
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const float* xh = x + h * head_stride;
    float* o = out + h * D;
    if (!transpose) {
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float p = xh[i] * c[i], q = xh[i + half] * s[i];
        o[i] = p + q;
      }
#pragma omp simd
      for (int64_t i = half; i < D; ++i) {
        const float p = xh[i] * c[i], q = xh[i - half] * s[i];
        o[i] = p + q;
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float p = xh[i] * c[i], q = xh[i + half] * s[i + half];
        o[i] = p + q;
      }
#pragma omp simd
      for (int64_t i = half; i < D; ++i) {
        const float p = xh[i] * c[i], q = xh[i - half] * s[i - half];
        o[i] = p + q;
      }
    }
  }
}

// out [R, H, D] (rows at any stride, heads contiguous) from x [R, H, D] (rows and heads strided) and the full-width
// tables cos, sin [R, D]: rotary_qkv's backward writes d q and d k into their columns of d qkv this way.
void rotary_into(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, bool transpose,
                 const torch::Tensor& out) {
  check_rows(x, "x", 3);
  check_rows(cos, "cos", 2);
  check_rows(sin, "sin", 2);
  const int64_t R = x.size(0), H = x.size(1), D = x.size(2);
  TORCH_CHECK(D % 2 == 0, "head_dim (", D, ") must be even");
  TORCH_CHECK(cos.size(0) == R && cos.size(1) == D && sin.sizes() == cos.sizes(), "cos and sin must be [", R,
              ", ", D, "], got ", cos.sizes(), " and ", sin.sizes());
  check_rows(out, "out", 3);
  TORCH_CHECK(out.sizes() == x.sizes() && (H <= 1 || out.stride(1) == D), "out must be ", x.sizes(),
              " with contiguous heads, got ", out.sizes(), " at strides ", out.strides());
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t sxr = x.stride(0), sxh = x.stride(1), sc = cos.stride(0), ss = sin.stride(0), so = out.stride(0);
  dispatch_width<16, 32, 64, 128>(D, [&](auto dc) {
    at::parallel_for(0, R, grain_rows(H * D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        rotary_row<decltype(dc)::value>(xp + r * sxr, sxh, H, D, cp + r * sc, sp + r * ss, op + r * so, transpose);
    });
  });
}

// [R, H, D] contiguous from x [R, H, D] (rows and heads strided) and the full-width tables cos, sin [R, D].
torch::Tensor rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, bool transpose) {
  torch::Tensor out = torch::empty(x.sizes(), x.options());
  rotary_into(x, cos, sin, transpose, out);
  return out;
}

// ---- log-prob and entropy statistics of vocab-shard logits ----------------------------------------------------
// kernels/logprob.py's contract: z = logits / temperature over this shard's first n_valid columns (the rest padding),
// m = max z, e = exp(z - m), S = sum e, A = sum e (z - m), the target's z (0 outside the shard); the backward's
// d/d logits = (g_lp (onehot - p) - g_H p (log p + H)) / temperature with p = exp(z - lse). A -inf logit (and a
// padded column) has e = p = 0; so does a p below fast_exp's range (log p < -87.3, where exp is ~1e-38 or less).

inline float exp_or_zero(float d) { return d < -87.3f ? 0.0f : fast_exp(d); }

constexpr int64_t kStatsBlock = 256;  // logprob_stats' columns per block (two [256] fp32 buffers a thread)

// stats [4, R]: max, S, A, target z
torch::Tensor logprob_stats(const torch::Tensor& logits, const torch::Tensor& targets, double temperature,
                            int64_t vocab_start, int64_t n_valid) {
  check_rows(logits, "logits", 2);
  const int64_t R = logits.size(0), V = logits.size(1), sl = logits.stride(0);
  TORCH_CHECK(targets.scalar_type() == torch::kInt64 && targets.is_contiguous() && targets.numel() == R,
              "targets must be a contiguous int64 [", R, "], got ", targets.scalar_type(), " ", targets.sizes());
  TORCH_CHECK(n_valid >= 0 && n_valid <= V, "n_valid (", n_valid, ") must be in [0, ", V, "]");
  auto stats = torch::empty({4, R}, logits.options());
  const float* lp = logits.data_ptr<float>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  float* st = stats.data_ptr<float>();
  const float temp = static_cast<float>(temperature), lowest = std::numeric_limits<float>::lowest();
  at::parallel_for(0, R, grain_rows(4 * V), [&](int64_t begin, int64_t end) {
    // e and (z - m) e of a block of columns first, in a loop the compiler vectorises with fast_exp inlined, then
    // their sums: the exp inside the `omp simd` reduction loop ran ~4x slower (1054 -> 283 us at [3584, 101])
    alignas(64) float eb[kStatsBlock], ab[kStatsBlock];
    for (int64_t r = begin; r < end; ++r) {
      const float* x = lp + r * sl;
      // max z = (max logit) / temperature: a correctly rounded division by a positive number keeps the order, so
      // this is the max of the row's z bit for bit, in one vectorised max pass and one division (a z a column, in a
      // loop that did not vectorise: 311 -> 244 us at [3750, 101], 2 threads)
      float xm = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : xm)
      for (int64_t i = 0; i < n_valid; ++i) xm = std::max(xm, x[i]);
      const float m = xm / temp;
      const float mc = std::max(m, lowest);
      float S = 0.f, A = 0.f;
      for (int64_t i0 = 0; i0 < n_valid; i0 += kStatsBlock) {
        const int64_t n = std::min(kStatsBlock, n_valid - i0);
        const float* __restrict xi = x + i0;
        float* __restrict e = eb;
        float* __restrict a = ab;
        for (int64_t i = 0; i < n; ++i) {
          const float d = xi[i] / temp - mc;
          e[i] = exp_or_zero(d);
          a[i] = std::max(d, lowest) * e[i];
        }
#pragma omp simd reduction(+ : S, A)
        for (int64_t i = 0; i < n; ++i) {
          S += e[i];
          A += a[i];
        }
      }
      const int64_t local = tp[r] - vocab_start;
      st[r] = m;
      st[R + r] = S;
      st[2 * R + r] = A;
      st[3 * R + r] = (local >= 0 && local < n_valid) ? x[local] / temp : 0.0f;
    }
  });
  return stats;
}

// d loss / d logits [R, V]
torch::Tensor logprob_grad(const torch::Tensor& logits, const torch::Tensor& targets, const torch::Tensor& grad_lp,
                           const torch::Tensor& grad_ent, const torch::Tensor& lse, const torch::Tensor& entropy,
                           double temperature, int64_t vocab_start, int64_t n_valid) {
  check_rows(logits, "logits", 2);
  const int64_t R = logits.size(0), V = logits.size(1), sl = logits.stride(0);
  TORCH_CHECK(targets.scalar_type() == torch::kInt64 && targets.is_contiguous() && targets.numel() == R,
              "targets must be a contiguous int64 [", R, "]");
  for (const auto* t : {&grad_lp, &grad_ent, &lse, &entropy})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->numel() == R,
                "grad_logprobs, grad_entropy, logsumexp and entropy must be contiguous fp32 [", R, "]");
  TORCH_CHECK(n_valid >= 0 && n_valid <= V, "n_valid (", n_valid, ") must be in [0, ", V, "]");
  auto grad = torch::empty({R, V}, logits.options());
  const float* lp = logits.data_ptr<float>();
  const int64_t* tp = targets.data_ptr<int64_t>();
  const float *glp = grad_lp.data_ptr<float>(), *gh = grad_ent.data_ptr<float>();
  const float *lsep = lse.data_ptr<float>(), *hp = entropy.data_ptr<float>();
  float* gp = grad.data_ptr<float>();
  const float temp = static_cast<float>(temperature);
  at::parallel_for(0, R, grain_rows(4 * V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* __restrict x = lp + r * sl;
      float* __restrict g = gp + r * V;
      const float a = glp[r], b = gh[r], l = lsep[r], H = hp[r];
      for (int64_t i = 0; i < n_valid; ++i) {
        const float logp = x[i] / temp - l;
        const float p = exp_or_zero(logp);
        g[i] = p == 0.0f ? 0.0f : -(((logp + H) * b + a) * p);
      }
      for (int64_t i = n_valid; i < V; ++i) g[i] = 0.0f;
      const int64_t local = tp[r] - vocab_start;
      if (local >= 0 && local < n_valid) g[local] += a;
      if (temp != 1.0f)
        for (int64_t i = 0; i < V; ++i) g[i] /= temp;
    }
  });
  return grad;
}

// torch.optim.AdamW's single-tensor step (torch/optim/adam.py, `_single_tensor_adam` with decoupled weight decay,
// no amsgrad / maximize / capturable) over each parameter in two passes and ATen's sqrt between them, where torch
// makes six ATen calls: the same fp32 operations on each element in the same order with the same roundings
// (measured bit for bit against it: tests/kernels/test_cpu_train_elementwise.py). First exp_avg = fma(w, grad -
// exp_avg, exp_avg) for w = (float)(1 - beta1) < 0.5 (ATen's vectorised lerp; w - 1 and grad as the base above it)
// and exp_avg_sq = fma((float)(1 - beta2) * grad, grad, exp_avg_sq * (float)beta2) (addcmul, contracted as ATen's
// build does); then s = at::sqrt(exp_avg_sq): ATen's, since its fp32 sqrt (MKL's vector math on x86) is not
// IEEE's correctly rounded one (~16% of random inputs differ by an ulp); then param = param * (float)(1 - lr wd) +
// ((float)(-step_size) * exp_avg) / (s / (float)bc2_sqrt + (float)eps) (mul_, then addcdiv). The scalars are
// torch's, in double: each step tensor (fp32, as torch keeps it) += 1, then bc1 = 1 - beta1^step, bc2_sqrt = (1 -
// beta2^step)^0.5 (pow, as Python's ** calls), step_size = lr / bc1. Only the two fused multiply-adds above are
// fused: the function and its passes (lambdas, compiled apart from it: an attribute on the function would not reach
// them, and a pass split over threads gave other bits) are built with fp-contract off, where the file's flag is fast
// (under clang, which ignores GCC's pragma, its own in each pass).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
void adamw_step(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& grads,
                const std::vector<torch::Tensor>& exp_avgs, const std::vector<torch::Tensor>& exp_avg_sqs,
                const std::vector<torch::Tensor>& steps, double lr, double beta1, double beta2, double eps,
                double weight_decay) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
              "adamw_step: ", n, " params with ", grads.size(), " grads, ", exp_avgs.size(), " exp_avgs, ",
              exp_avg_sqs.size(), " exp_avg_sqs, ", steps.size(), " steps");
  int64_t largest = 0;
  for (size_t t = 0; t < n; ++t) {
    const int64_t numel = params[t].numel();
    for (const auto* x : {&params[t], &grads[t], &exp_avgs[t], &exp_avg_sqs[t]}) {
      TORCH_CHECK(x->device().is_cpu() && x->scalar_type() == torch::kFloat32 && x->is_contiguous() &&
                      x->numel() == numel, "adamw_step: tensor ", t, " must be fp32, CPU, contiguous, of ", numel,
                  " elements; got ", x->scalar_type(), " ", x->sizes());
    }
    TORCH_CHECK(steps[t].device().is_cpu() && steps[t].scalar_type() == torch::kFloat32 && steps[t].numel() == 1,
                "adamw_step: step ", t, " must be a one-element fp32 CPU tensor");
    largest = std::max(largest, numel);
  }
  const float decay = static_cast<float>(1.0 - lr * weight_decay);
  const float w = static_cast<float>(1.0 - beta1);
  const bool small = std::abs(w) < 0.5f;
  const float coeff = small ? w : w - 1.0f;
  const float b2 = static_cast<float>(beta2), c2 = static_cast<float>(1.0 - beta2), epsf = static_cast<float>(eps);
  auto roots = torch::empty({largest}, torch::kFloat32);
  for (size_t t = 0; t < n; ++t) {
    const int64_t numel = params[t].numel();
    float* step_p = steps[t].data_ptr<float>();
    step_p[0] = step_p[0] + 1.0f;
    const double step = step_p[0];
    const double bc1 = 1.0 - std::pow(beta1, step);
    const double bc2_sqrt = std::pow(1.0 - std::pow(beta2, step), 0.5);
    const float bc2f = static_cast<float>(bc2_sqrt), neg_step = static_cast<float>(-(lr / bc1));
    float* pp = params[t].data_ptr<float>();
    const float* gp = grads[t].data_ptr<float>();
    float* mp = exp_avgs[t].data_ptr<float>();
    float* vp = exp_avg_sqs[t].data_ptr<float>();
    at::parallel_for(0, numel, 32768, [&](int64_t begin, int64_t end) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
      const float* __restrict g = gp;
      float* __restrict m = mp;
      float* __restrict v = vp;
      for (int64_t i = begin; i < end; ++i) {
        const float gi = g[i], mi = m[i];
        m[i] = std::fma(coeff, gi - mi, small ? mi : gi);
        v[i] = std::fma(c2 * gi, gi, v[i] * b2);
      }
    });
    auto root = roots.narrow(0, 0, numel);
    at::sqrt_out(root, exp_avg_sqs[t].view({numel}));
    const float* sp = root.data_ptr<float>();
    at::parallel_for(0, numel, 32768, [&](int64_t begin, int64_t end) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
      float* __restrict p = pp;
      const float* __restrict m = mp;
      const float* __restrict s = sp;
      for (int64_t i = begin; i < end; ++i) p[i] = p[i] * decay + (neg_step * m[i]) / (s[i] / bc2f + epsf);
    });
  }
}
#pragma GCC pop_options

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm_forward", &rms_norm_forward, "(out, x + residual | empty, rstd) of RMSNorm");
  m.def("rms_norm_out", &rms_norm_out, "out of RMSNorm without a residual (rms_norm_forward's first result)");
  m.def("decode_addresses", []() {
    return std::vector<int64_t>{reinterpret_cast<int64_t>(&rms_norm_out),
                                reinterpret_cast<int64_t>(&silu_and_mul_forward)};
  }, "the addresses of rms_norm_out and silu_and_mul_forward (cpu_ops' decode_layers calls them)");
  m.def("rms_norm_backward", &rms_norm_backward, "(d input, d weight) of RMSNorm");
  m.def("silu_and_mul_forward", &silu_and_mul_forward, "silu(gate) * up of x = [gate | up]");
  m.def("silu_and_mul_backward", &silu_and_mul_backward, "d x of silu(gate) * up (in_place: written over x)");
  m.def("rotary", &rotary, "x * cos + roll(x, D / 2) * sin (transpose: its backward)");
  m.def("rotary_into", &rotary_into, "rotary written into out (rows at any stride, heads contiguous)");
  m.def("logprob_stats", &logprob_stats, "[4, R]: max, sum exp, sum exp * shifted z, target z of a vocab shard");
  m.def("logprob_grad", &logprob_grad, "d (log-prob, entropy) loss / d logits of a vocab shard");
  m.def("adamw_step", &adamw_step, "torch.optim.AdamW's single-tensor step over each parameter in one pass");
}
