// Small-M GEMM for CPU decode steps: y = x W^T (+ bias) (+ residual), x [M, K] with M ~ 2..64 rows (a
// batched decode step), W [N, K] prepacked once (built by rl_engine/kernels/cpu/__init__.py's load_source;
// Python side: rl_engine/kernels/cpu/small_gemm.py).
//
// Packed layout: W split into panels of `panel` output columns (16, 32, 48 or 64); panel p holds
// W[p*panel .. p*panel+width, :] transposed, [K][width], contiguous, at offset p*panel*K; the last panel's
// width is its column count rounded up to 16 (zero columns, never stored). A register-blocked micro-kernel
// keeps an MR x width tile of fp32 accumulators in zmm registers (MR rows, width/16 vectors each), and for
// each k broadcasts x[m, k] and FMAs it into the panel's k-th row: every output is one lane accumulating
// its K products in order k = 0, 1, ..., K-1 (a sequential fp32 sum, independent of M, of the row block and
// of the thread count), then + bias, then + residual, rounded once to the dtype. bf16: exact bf16 products
// (operands widened to fp32), the same fp32 sums. Threads (at::parallel_for, torch's intra-op pool) split
// the panels; each runs every row block of its panels (a panel stays in L2 while the row blocks read it).
//
// AVX-512 (F + BW + VL, as cpu_ops.cpp's RL_AVX512) has the micro-kernel; other CPUs run a portable loop
// over the same layout and summation order (the compiler vectorises it over the panel's columns).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define RL_AVX512 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;
constexpr int kMaxRows = 12;        // row blocks of 1..12 rows
constexpr int kMaxVectors = 4;      // panels of 16..64 columns
constexpr int kMaxAccumulators = 28;  // of the 32 zmm registers: the rest hold the panel row and x

inline int64_t panel_width(int64_t N, int64_t panel, int64_t p) {
  return std::min(panel, (N - p * panel + kLanes - 1) / kLanes * kLanes);
}

inline int64_t packed_numel(int64_t N, int64_t K, int64_t panel) {
  const int64_t full = N / panel, rest = N - full * panel;
  return (full * panel + (rest + kLanes - 1) / kLanes * kLanes) * K;
}

template <typename T>
void pack_kernel(const T* w, T* out, int64_t N, int64_t K, int64_t panel) {
  const int64_t panels = (N + panel - 1) / panel;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t width = panel_width(N, panel, p), n0 = p * panel;
      T* dst = out + n0 * K;
      for (int64_t j = 0; j < width; ++j) {
        const int64_t n = n0 + j;
        for (int64_t k = 0; k < K; ++k) dst[k * width + j] = n < N ? w[n * K + k] : T(0);
      }
    }
  });
}

inline float to_f(float v) { return v; }
inline float to_f(at::BFloat16 v) { return static_cast<float>(v); }
template <typename T>
inline T from_f(float v) { return static_cast<T>(v); }

// One output tile's epilogue for the portable path and the bf16 stores: acc (+ bias) (+ residual) -> out.
template <typename T>
inline void store_row(const float* acc, T* out, const T* bias, const T* res, int64_t ncols) {
  for (int64_t j = 0; j < ncols; ++j) {
    float v = acc[j];
    if (bias != nullptr) v += to_f(bias[j]);
    if (res != nullptr) v += to_f(res[j]);
    out[j] = from_f<T>(v);
  }
}

#if defined(RL_AVX512)
inline __m512 load_panel(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_panel(const at::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load_masked(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load_masked(const at::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, reinterpret_cast<const void*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// x [MR rows of K fp32, row stride K] times one panel ([K][NV*16]) into out[MR][ncols] (row stride ldo).
// The K loop: NV panel loads, MR broadcasts, MR*NV FMAs per k; the panel row prefetch_rows ahead is
// prefetched to L1, and one cache line a k of `next` to L2: the caller points it at the row block's share
// of the thread's next panel (a weight larger than L3, the 32k-vocab head, streams from memory while the
// current panel is computed) or, when there is none, at the current panel.
template <int MR, int NV, typename T>
void micro_kernel(const float* __restrict x, int64_t K, const T* __restrict b, T* __restrict out, int64_t ldo,
                  int64_t ncols, const T* __restrict bias, const T* __restrict res, const char* next) {
  constexpr int64_t width = NV * kLanes;
  constexpr int64_t prefetch_rows = 8;
  constexpr int lines_per_row = static_cast<int>((width * sizeof(T) + 63) / 64);
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    const T* bk = b + k * width;
#pragma GCC unroll 4
    for (int l = 0; l < lines_per_row; ++l)
      _mm_prefetch(reinterpret_cast<const char*>(bk + prefetch_rows * width) + 64 * l, _MM_HINT_T0);
    _mm_prefetch(next + 64 * k, _MM_HINT_T1);
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = load_panel(bk + v * kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * K + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(xv, bv[v], acc[r][v]);
    }
  }
  if constexpr (std::is_same_v<T, float>) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const int64_t left = ncols - v * kLanes;
      if (left <= 0) break;
      const __mmask16 m = left >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      const __m512 bias_v = bias != nullptr ? _mm512_maskz_loadu_ps(m, bias + v * kLanes) : _mm512_setzero_ps();
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        __m512 y = acc[r][v];
        if (bias != nullptr) y = _mm512_add_ps(y, bias_v);
        if (res != nullptr) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m, res + r * ldo + v * kLanes));
        _mm512_mask_storeu_ps(out + r * ldo + v * kLanes, m, y);
      }
    }
  } else {
    alignas(64) float tile[width];
    for (int r = 0; r < MR; ++r) {
      for (int v = 0; v < NV; ++v) _mm512_store_ps(tile + v * kLanes, acc[r][v]);
      store_row<T>(tile, out + r * ldo, bias, res == nullptr ? nullptr : res + r * ldo, ncols);
    }
  }
}

template <typename T>
using Kernel = void (*)(const float*, int64_t, const T*, T*, int64_t, int64_t, const T*, const T*, const char*);

template <typename T, int MR, int... NVs>
constexpr std::array<Kernel<T>, kMaxVectors> row_of(std::integer_sequence<int, NVs...>) {
  return {(MR * (NVs + 1) <= kMaxAccumulators ? &micro_kernel<MR, NVs + 1, T> : nullptr)...};
}

template <typename T, int... MRs>
constexpr std::array<std::array<Kernel<T>, kMaxVectors>, kMaxRows> table_of(std::integer_sequence<int, MRs...>) {
  return {row_of<T, MRs + 1>(std::make_integer_sequence<int, kMaxVectors>{})...};
}

// kernels<T>[MR - 1][NV - 1]; nullptr where MR * NV accumulators would not fit in registers
template <typename T>
constexpr auto kernels = table_of<T>(std::make_integer_sequence<int, kMaxRows>{});
#endif

// The portable path: the same panels and the same per-output order of sums.
template <typename T>
void portable_tile(const float* x, int64_t K, const T* b, int64_t width, T* out, int64_t ldo, int64_t ncols,
                   const T* bias, const T* res, int64_t rows) {
  float acc[kMaxVectors * kLanes];
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(acc, acc + width, 0.f);
    const float* xr = x + r * K;
    for (int64_t k = 0; k < K; ++k) {
      const float xv = xr[k];
      const T* bk = b + k * width;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) acc[j] += xv * to_f(bk[j]);
    }
    store_row<T>(acc, out + r * ldo, bias, res == nullptr ? nullptr : res + r * ldo, ncols);
  }
}

template <typename T>
void gemm_kernel(const float* x, const T* packed, const T* bias, const T* res, T* out, int64_t M, int64_t N,
                 int64_t K, int64_t panel, int64_t row_block, int64_t min_macs_per_thread) {
  const int64_t panels = (N + panel - 1) / panel;
  const int64_t grain = std::max<int64_t>(1, min_macs_per_thread / std::max<int64_t>(1, M * K * panel));
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * panel, width = panel_width(N, panel, p), ncols = std::min(width, N - n0);
      const T* b = packed + n0 * K;
      const T* bias_p = bias == nullptr ? nullptr : bias + n0;
      // the next panel of this thread, as K-line shares for the row blocks (64-byte lines)
      const char* next = reinterpret_cast<const char*>(b + width * K);
      const int64_t next_bytes = p + 1 < end ? panel_width(N, panel, p + 1) * K * int64_t(sizeof(T)) : 0;
      for (int64_t m0 = 0, block = 0; m0 < M; m0 += row_block, ++block) {
        const int64_t rows = std::min(row_block, M - m0);
        const T* res_p = res == nullptr ? nullptr : res + m0 * N + n0;
#if defined(RL_AVX512)
        const char* share = (block + 1) * K * 64 <= next_bytes ? next + block * K * 64
                                                                : reinterpret_cast<const char*>(b);
        kernels<T>[rows - 1][width / kLanes - 1](x + m0 * K, K, b, out + m0 * N + n0, N, ncols, bias_p, res_p,
                                                 share);
#else
        portable_tile<T>(x + m0 * K, K, b, width, out + m0 * N + n0, N, ncols, bias_p, res_p, rows);
#endif
      }
    }
  });
}

void check_blocking(int64_t panel, int64_t row_block) {
  TORCH_CHECK(panel % kLanes == 0 && panel >= kLanes && panel <= kMaxVectors * kLanes,
              "panel (", panel, ") must be 16, 32, 48 or 64 columns");
  TORCH_CHECK(row_block >= 1 && row_block <= kMaxRows && row_block * (panel / kLanes) <= kMaxAccumulators,
              "row_block (", row_block, ") must be in 1..", kMaxRows, " with row_block * panel / 16 <= ",
              kMaxAccumulators, " (accumulators that fit in the 32 vector registers)");
}

}  // namespace

// weight [N, K] (fp32 or bf16, contiguous) -> its panels, a 1-D tensor of the same dtype.
torch::Tensor pack(const torch::Tensor& weight, int64_t panel) {
  check_blocking(panel, 1);
  TORCH_CHECK(weight.dim() == 2 && weight.device().is_cpu(), "weight must be a 2-D CPU tensor, got ",
              weight.sizes(), " on ", weight.device());
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "weight must be float32 or bfloat16, got ", weight.scalar_type());
  const auto w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  auto out = torch::empty({packed_numel(N, K, panel)}, w.options());
  if (w.scalar_type() == at::kFloat) {
    pack_kernel<float>(w.data_ptr<float>(), out.data_ptr<float>(), N, K, panel);
  } else {
    pack_kernel<at::BFloat16>(w.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), N, K, panel);
  }
  return out;
}

// x [..., K] times the packed weight ([N, K] packed with `panel`) -> [..., N] (+ bias [N]) (+ residual [..., N]).
// min_macs_per_thread: a thread takes at least this many multiply-adds (fewer threads for small products).
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t N, int64_t panel,
                     int64_t row_block, const c10::optional<torch::Tensor>& bias,
                     const c10::optional<torch::Tensor>& residual, int64_t min_macs_per_thread) {
  check_blocking(panel, row_block);
  TORCH_CHECK(x.dim() >= 1 && x.device().is_cpu() && x.scalar_type() == packed.scalar_type(),
              "x must be a CPU tensor of the packed weight's dtype (", packed.scalar_type(), "), got ",
              x.scalar_type(), " on ", x.device());
  const int64_t K = x.size(-1);
  TORCH_CHECK(packed.dim() == 1 && packed.is_contiguous() && packed.numel() == packed_numel(N, K, panel),
              "packed weight has ", packed.numel(), " elements; a [", N, ", ", K, "] weight packed in panels of ",
              panel, " has ", packed_numel(N, K, panel), " (pack it with this x's width K and this panel)");
  const auto xc = x.contiguous();
  const int64_t M = xc.numel() / std::max<int64_t>(K, 1);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto out = torch::empty(sizes, x.options());
  torch::Tensor bias_c, res_c;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N && bias->scalar_type() == x.scalar_type(), "bias must have ", N,
                " elements of dtype ", x.scalar_type());
    bias_c = bias->contiguous();
  }
  if (residual.has_value()) {
    TORCH_CHECK(residual->numel() == M * N && residual->scalar_type() == x.scalar_type(),
                "residual must have the output's ", M * N, " elements and dtype ", x.scalar_type());
    res_c = residual->contiguous();
  }
  if (M == 0 || N == 0) return out;
  if (xc.scalar_type() == at::kFloat) {
    gemm_kernel<float>(xc.data_ptr<float>(), packed.data_ptr<float>(),
                       bias_c.defined() ? bias_c.data_ptr<float>() : nullptr,
                       res_c.defined() ? res_c.data_ptr<float>() : nullptr, out.data_ptr<float>(), M, N, K, panel,
                       row_block, min_macs_per_thread);
  } else {
    const auto xf = xc.to(at::kFloat);  // [M, K] widened once: the kernel broadcasts fp32 x
    using B = at::BFloat16;
    gemm_kernel<B>(xf.data_ptr<float>(), packed.data_ptr<B>(), bias_c.defined() ? bias_c.data_ptr<B>() : nullptr,
                   res_c.defined() ? res_c.data_ptr<B>() : nullptr, out.data_ptr<B>(), M, N, K, panel, row_block,
                   min_macs_per_thread);
  }
  return out;
}

bool has_avx512() {
#if defined(RL_AVX512)
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "weight [N, K] -> its panels (1-D)", py::arg("weight"), py::arg("panel"));
  m.def("linear", &linear, "x [..., K] times a packed [N, K] weight", py::arg("x"), py::arg("packed"), py::arg("n"),
        py::arg("panel"), py::arg("row_block"), py::arg("bias"), py::arg("residual"),
        py::arg("min_macs_per_thread"));
  m.def("has_avx512", &has_avx512, "whether the AVX-512 micro-kernel was compiled in");
}
