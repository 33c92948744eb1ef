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
// of the thread count), then + bias, then + residual, rounded once to the dtype. bf16 panels store k in
// pairs ([K/2][width][2], K padded to even with zeros) for avx512_bf16's dot product (VDPBF16PS: 32
// multiply-adds an instruction, twice the fp32 FMA's): each output adds the exact products of k = 2i+1 and
// then k = 2i to its fp32 sum (denormal inputs read as zero), i = 0, 1, ...; without avx512_bf16 the
// portable loop sums the widened products in order. Threads (at::parallel_for, torch's intra-op pool) split
// the panels; each runs every row block of its panels (a panel stays in L2 while the row blocks read it), in chunks
// of rows where there are many (gemm_kernel's kChunkBytes).
//
// AVX-512 (F + BW + VL, as cpu_ops.cpp's RL_AVX512) has the micro-kernel; other CPUs run a portable loop
// over the same layout and summation order (the compiler vectorises it over the panel's columns).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define RL_AVX512 1
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>  // (arch_prctl: the tile state's permission)
#include <unistd.h>
#endif

#include <algorithm>
#include <array>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
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

// K as stored: bf16 panels hold k in pairs
template <typename T>
inline int64_t stored_k(int64_t K) { return std::is_same_v<T, float> ? K : (K + 1) / 2 * 2; }

// element (k, j) of a panel of `width` columns
template <typename T>
inline int64_t packed_index(int64_t k, int64_t j, int64_t width) {
  if constexpr (std::is_same_v<T, float>) return k * width + j;
  else return (k / 2) * 2 * width + 2 * j + (k & 1);
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
      const int64_t Ks = stored_k<T>(K);
      T* dst = out + n0 * Ks;
      for (int64_t j = 0; j < width; ++j) {
        const int64_t n = n0 + j;
        for (int64_t k = 0; k < Ks; ++k) dst[packed_index<T>(k, j, width)] = n < N && k < K ? w[n * K + k] : T(0);
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
// An MR x NV*16 tile of fp32 sums (+ bias) (+ residual) into out (row stride ldo), its first ncols columns.
template <int MR, int NV, typename T>
inline void store_tile(__m512 (&acc)[MR][NV], T* __restrict out, int64_t ldo, int64_t ncols,
                       const T* __restrict bias, const T* __restrict res) {
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
    alignas(64) float tile[NV * kLanes];
    for (int r = 0; r < MR; ++r) {
      for (int v = 0; v < NV; ++v) _mm512_store_ps(tile + v * kLanes, acc[r][v]);
      store_row<T>(tile, out + r * ldo, bias, res == nullptr ? nullptr : res + r * ldo, ncols);
    }
  }
}

constexpr int64_t kPrefetchRows = 8;

template <int MR, int NV>
inline void zero_tile(__m512 (&acc)[MR][NV]) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
}

// Both kernels read NV 64-byte lines of the panel a k step: the row kPrefetchRows steps ahead goes to L1, and
// line `step` of `next` to L2.
template <int NV>
inline void prefetch_step(const void* row, const char* next, int64_t step) {
  const char* ahead = static_cast<const char*>(row) + kPrefetchRows * NV * 64;
#pragma GCC unroll 4
  for (int l = 0; l < NV; ++l) _mm_prefetch(ahead + 64 * l, _MM_HINT_T0);
  _mm_prefetch(next + 64 * step, _MM_HINT_T1);
}

// x [MR rows of K fp32, row stride K] times one panel ([K][NV*16]) into out[MR][ncols] (row stride ldo).
// The K loop: NV panel loads, MR broadcasts, MR*NV FMAs per k; the panel row kPrefetchRows ahead is
// prefetched to L1, and one cache line a k of `next` to L2: the caller points it at the row block's share
// of the thread's next panel (a weight larger than L3, the 32k-vocab head, streams from memory while the
// current panel is computed) or, when there is none, at the current panel.
template <int MR, int NV>
void micro_kernel(const float* __restrict x, int64_t K, const float* __restrict b, float* __restrict out,
                  int64_t ldo, int64_t ncols, const float* __restrict bias, const float* __restrict res,
                  const char* next) {
  constexpr int64_t width = NV * kLanes;
  __m512 acc[MR][NV];
  zero_tile<MR, NV>(acc);
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * width;
    prefetch_step<NV>(bk, next, k);
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(bk + v * kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * K + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(xv, bv[v], acc[r][v]);
    }
  }
  store_tile<MR, NV, float>(acc, out, ldo, ncols, bias, res);
}

#if defined(__AVX512BF16__)
// bf16: x as k pairs ([MR][Kh] 32-bit words, row stride Kh), the panel as [Kh][width][2]; per k pair NV panel
// loads (32 bf16 each: 16 columns x 2 k), MR pair broadcasts, MR*NV dot products.
// O: the output's dtype (bf16 for linear; fp32 for greedy_screen's estimates, no bias or residual).
template <int MR, int NV, typename O = at::BFloat16>
void dot_kernel(const uint32_t* __restrict x, int64_t Kh, const at::BFloat16* __restrict b,
                O* __restrict out, int64_t ldo, int64_t ncols, const O* __restrict bias,
                const O* __restrict res, const char* next) {
  constexpr int64_t pair_row = 2 * NV * kLanes;  // bf16 elements a k pair
  __m512 acc[MR][NV];
  zero_tile<MR, NV>(acc);
#pragma GCC unroll 2
  for (int64_t kh = 0; kh < Kh; ++kh) {
    const at::BFloat16* bk = b + kh * pair_row;
    prefetch_step<NV>(bk, next, kh);
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      bv[v] = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(bk + v * 2 * kLanes));
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * Kh + kh]));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xv, bv[v]);
    }
  }
  store_tile<MR, NV, O>(acc, out, ldo, ncols, bias, res);
}
#define RL_BF16_DOT 1
#endif

// x: fp32 rows (stride K) for fp32, k-pair rows (stride Ks / 2) for bf16; Ks: K as stored. O: the output's dtype,
// the weight's (T) for linear; fp32 from bf16 for greedy_screen's estimates.
template <typename T, typename O = T>
using Kernel = void (*)(const void*, int64_t, const T*, O*, int64_t, int64_t, const O*, const O*, const char*);

template <int MR, int NV, typename T, typename O>
void tile_kernel(const void* x, int64_t Ks, const T* b, O* out, int64_t ldo, int64_t ncols, const O* bias,
                 const O* res, const char* next) {
  if constexpr (std::is_same_v<T, float>) {
    micro_kernel<MR, NV>(static_cast<const float*>(x), Ks, b, out, ldo, ncols, bias, res, next);
  } else {
#if defined(RL_BF16_DOT)
    dot_kernel<MR, NV, O>(static_cast<const uint32_t*>(x), Ks / 2, b, out, ldo, ncols, bias, res, next);
#endif
  }
}

template <typename T, typename O, int MR, int... NVs>
constexpr std::array<Kernel<T, O>, kMaxVectors> row_of(std::integer_sequence<int, NVs...>) {
  return {(MR * (NVs + 1) <= kMaxAccumulators ? &tile_kernel<MR, NVs + 1, T, O> : nullptr)...};
}

template <typename T, typename O, int... MRs>
constexpr std::array<std::array<Kernel<T, O>, kMaxVectors>, kMaxRows> table_of(
    std::integer_sequence<int, MRs...>) {
  return {row_of<T, O, MRs + 1>(std::make_integer_sequence<int, kMaxVectors>{})...};
}

// kernels<T, O>[MR - 1][NV - 1]; nullptr where MR * NV accumulators would not fit in registers
template <typename T, typename O = T>
constexpr auto kernels = table_of<T, O>(std::make_integer_sequence<int, kMaxRows>{});

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
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) acc[j] += xv * to_f(b[packed_index<T>(k, j, width)]);
    }
    store_row<T>(acc, out + r * ldo, bias, res == nullptr ? nullptr : res + r * ldo, ncols);
  }
}

// O: the output's dtype (T, or fp32 from bf16 for greedy_screen: only where the bf16 dot is compiled in, so that the
// vector kernels take every tile)
// A product of many rows (a prefill chunk) runs its rows in chunks of whole row blocks whose x takes about
// kChunkBytes, at least kChunkMinRows rows (so a decode step's 64 rows are one chunk), each chunk through every panel:
// one chunk's x stays in cache while the panels stream, where all of x (2 MiB at 2,048 rows of 256) was read again
// from L3 for each panel. Each output's sum is the same (a lane's k in order), so the same bits. Measured (1 thread,
// this machine's Intel Xeon with AMX, seven alternated rounds in one process, best): benchmarks/generate.py's ~3.5M
// shapes at 2,048 rows 118.3 -> 136.4 GFLOP/s, --large's ~50M shapes 177.5 -> 191.7; 16-96 KiB chunks within 2% of
// each other, 128-512 KiB 3-9% slower than 64; at 64 rows level (one chunk either way). Inside generate.py's batch-64
// greedy run (6 runs each, alternated): its prefill 195.7 -> 187.8 ms median.
constexpr int64_t kChunkBytes = int64_t(1) << 16;
constexpr int64_t kChunkMinRows = 64;

template <typename T, typename O = T>
void gemm_kernel(const float* x, const uint32_t* x_pairs, const T* packed, const O* bias, const O* res, O* out,
                 int64_t M, int64_t N, int64_t K, int64_t panel, int64_t row_block, int64_t min_macs_per_thread) {
#if !defined(RL_BF16_DOT)
  static_assert(std::is_same_v<T, O>, "an output dtype other than the weight's needs the bf16 dot kernels");
#endif
  const int64_t Ks = stored_k<T>(K);
#if defined(RL_AVX512)
  // the vector kernels: fp32 always, bf16 with avx512_bf16 (else the portable loop)
#if defined(RL_BF16_DOT)
  constexpr bool vector = true;
#else
  constexpr bool vector = std::is_same_v<T, float>;
#endif
  const void* xv = std::is_same_v<T, float> ? static_cast<const void*>(x) : static_cast<const void*>(x_pairs);
  const int64_t x_stride = std::is_same_v<T, float> ? K : Ks / 2, iters = x_stride;  // (K loop trips)
#endif
  const int64_t panels = (N + panel - 1) / panel;
  // rows in chunks (kChunkBytes): each chunk runs every panel of the thread, as one call of its rows would
  const int64_t x_row_bytes = std::is_same_v<T, float> ? K * int64_t(sizeof(float)) : Ks * 2;
  const int64_t chunk =
      std::max<int64_t>(kChunkMinRows, kChunkBytes / std::max<int64_t>(1, x_row_bytes) / row_block * row_block);
  const int64_t grain = std::max<int64_t>(1, min_macs_per_thread / std::max<int64_t>(1, M * K * panel));
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t c0 = 0; c0 < M; c0 += chunk) {
      const int64_t c1 = std::min(M, c0 + chunk);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n0 = p * panel, width = panel_width(N, panel, p), ncols = std::min(width, N - n0);
        const T* b = packed + n0 * Ks;
        const O* bias_p = bias == nullptr ? nullptr : bias + n0;
        // the next panel of this thread, as K-line shares for the row blocks (64-byte lines)
        const char* next = reinterpret_cast<const char*>(b + width * Ks);
        const int64_t next_bytes = p + 1 < end ? panel_width(N, panel, p + 1) * Ks * int64_t(sizeof(T)) : 0;
        for (int64_t m0 = c0, block = 0; m0 < c1; m0 += row_block, ++block) {
          const int64_t rows = std::min(row_block, c1 - m0);
          const O* res_p = res == nullptr ? nullptr : res + m0 * N + n0;
#if defined(RL_AVX512)
          if constexpr (vector) {
            const char* share = (block + 1) * iters * 64 <= next_bytes ? next + block * iters * 64
                                                                       : reinterpret_cast<const char*>(b);
            const void* x_block = std::is_same_v<T, float>
                                      ? static_cast<const void*>(static_cast<const float*>(xv) + m0 * x_stride)
                                      : static_cast<const void*>(static_cast<const uint32_t*>(xv) + m0 * x_stride);
            kernels<T, O>[rows - 1][width / kLanes - 1](x_block, Ks, b, out + m0 * N + n0, N, ncols, bias_p, res_p,
                                                        share);
            continue;
          }
#endif
          if constexpr (std::is_same_v<T, O>)
            portable_tile<T>(x + m0 * K, K, b, width, out + m0 * N + n0, N, ncols, bias_p, res_p, rows);
        }
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

void check_weight(const torch::Tensor& weight, int64_t panel) {
  check_blocking(panel, 1);
  TORCH_CHECK(weight.dim() == 2 && weight.device().is_cpu(), "weight must be a 2-D CPU tensor, got ",
              weight.sizes(), " on ", weight.device());
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16,
              "weight must be float32 or bfloat16, got ", weight.scalar_type());
}

int64_t stored_k_of(at::ScalarType dtype, int64_t K) {
  return dtype == at::kFloat ? stored_k<float>(K) : stored_k<at::BFloat16>(K);
}

}  // namespace

// Elements of weight [N, K]'s panels (what `pack` returns or fills).
int64_t packed_size(const torch::Tensor& weight, int64_t panel) {
  check_weight(weight, panel);
  return packed_numel(weight.size(0), stored_k_of(weight.scalar_type(), weight.size(1)), panel);
}

// weight [N, K] (fp32 or bf16) -> its panels, a 1-D tensor of the same dtype: `out` where given (1-D, contiguous,
// the weight's dtype, `packed_size` elements; every element written), else a new tensor.
torch::Tensor pack(const torch::Tensor& weight, int64_t panel, const c10::optional<torch::Tensor>& out_opt) {
  check_weight(weight, panel);
  const auto w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t numel = packed_numel(N, stored_k_of(w.scalar_type(), K), panel);
  torch::Tensor out;
  if (out_opt.has_value()) {
    out = *out_opt;
    TORCH_CHECK(out.dim() == 1 && out.is_contiguous() && out.device().is_cpu() && out.scalar_type() ==
                w.scalar_type() && out.numel() == numel, "out must be a contiguous 1-D CPU ", w.scalar_type(),
                " tensor of ", numel, " elements (packed_size of this weight and panel), got ", out.sizes(), " ",
                out.scalar_type(), " on ", out.device());
  } else {
    out = torch::empty({numel}, w.options());
  }
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
  const int64_t Ks = stored_k_of(x.scalar_type(), K);
  TORCH_CHECK(packed.dim() == 1 && packed.is_contiguous() && packed.numel() == packed_numel(N, Ks, panel),
              "packed weight has ", packed.numel(), " elements; a [", N, ", ", K, "] weight packed in panels of ",
              panel, " has ", packed_numel(N, Ks, panel), " (pack it with this x's width K and this panel)");
  const auto xc = x.contiguous();
  int64_t M = 1;  // rows: x's leading dims (not numel / K, which is 0 when K is)
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
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
  if (K == 0) {
    // No products: each output is 0 (+ bias) (+ residual), summed in fp32 and rounded once to x's dtype,
    // as the kernels' epilogue does (the kernels would leave the rows unwritten).
    auto acc = torch::zeros({M, N}, x.options().dtype(at::kFloat));
    if (bias_c.defined()) acc.add_(bias_c.view({N}).to(at::kFloat));
    if (res_c.defined()) acc.add_(res_c.view({M, N}).to(at::kFloat));
    return acc.to(x.scalar_type()).view(sizes);
  }
  auto out = torch::empty(sizes, x.options());
  if (M == 0 || N == 0) return out;
  if (xc.scalar_type() == at::kFloat) {
    gemm_kernel<float>(xc.data_ptr<float>(), nullptr, packed.data_ptr<float>(),
                       bias_c.defined() ? bias_c.data_ptr<float>() : nullptr,
                       res_c.defined() ? res_c.data_ptr<float>() : nullptr, out.data_ptr<float>(), M, N, K, panel,
                       row_block, min_macs_per_thread);
  } else {
    const auto xf = xc.view({M, K}).to(at::kFloat);  // [M, K] widened: the portable loop's x
    auto x_pairs = torch::zeros({M, Ks}, xc.options());  // [M, Ks] bf16, k pairs as 32-bit words: the dot's x
    x_pairs.narrow(1, 0, K).copy_(xc.view({M, K}));
    using B = at::BFloat16;
    gemm_kernel<B>(xf.data_ptr<float>(), reinterpret_cast<const uint32_t*>(x_pairs.data_ptr<B>()), packed.data_ptr<B>(), bias_c.defined() ? bias_c.data_ptr<B>() : nullptr,
                   res_c.defined() ? res_c.data_ptr<B>() : nullptr, out.data_ptr<B>(), M, N, K, panel, row_block,
                   min_macs_per_thread);
  }
  return out;
}

// AMX (Intel's tile unit; AMX-TILE + AMX-BF16 compiled in by -march=native, and the kernel's permission for the
// tile state, asked once): greedy_screen's estimates by TDPBF16PS, which forms the same terms as VDPBF16PS (the exact
// products of the bf16 x and weight, denormal inputs read as zero, fp32 adds rounded to nearest even, denormal sums
// flushed) in another order: per instruction each output's even and odd k of 16 pairs summed from 0 apart, then both
// added to its accumulator, so a term goes through at most K + 2 K / 32 adds, within the 2 K the screen's bound
// counts (packed_linear._Screen). The weight as B tiles: [N/16][K/32][16 k pairs][16 columns][2], N padded to 32
// columns, K to 32, with zeros; x as bf16 rows padded to 32 rows and K to 32 (A tiles, 16 rows x 32 k each).
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(RL_BF16_DOT)
#define RL_AMX 1
namespace {

constexpr int64_t kTileRows = 16, kTileK = 32;  // a tile: 16 rows x 64 bytes (32 bf16 or 16 fp32)

struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Whether this process may use the tile registers (Linux >= 5.16 asks for it: arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); asked once.
bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// est [Mp, Np] (row stride Np) = x_tiles [Mp, Kp] (bf16 rows) times the B tiles of `b` (`amx_pack`), fp32; Mp, Np
// multiples of 32, Kp of 32. Threads split the 32-column blocks.
void amx_estimates(const at::BFloat16* x, const at::BFloat16* b, float* est, int64_t Mp, int64_t Np, int64_t Kp,
                   int64_t min_macs_per_thread) {
  const int64_t Kt = Kp / kTileK, blocks = Np / 32;
  const int64_t grain = std::max<int64_t>(1, min_macs_per_thread / std::max<int64_t>(1, Mp * Kp * 32));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) cfg.rows[t] = kTileRows, cfg.colsb[t] = 64;
    _tile_loadconfig(&cfg);
    for (int64_t nb = begin; nb < end; ++nb) {
      const at::BFloat16* b0 = b + (2 * nb) * Kt * 512;
      const at::BFloat16* b1 = b0 + Kt * 512;
      for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
        const at::BFloat16* a0 = x + m0 * Kp;
        const at::BFloat16* a1 = a0 + kTileRows * Kp;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t t = 0; t < Kt; ++t) {
          _tile_loadd(4, a0 + t * kTileK, Kp * 2);
          _tile_loadd(6, b0 + t * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_loadd(5, a1 + t * kTileK, Kp * 2);
          _tile_dpbf16ps(2, 5, 6);
          _tile_loadd(7, b1 + t * 512, 64);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(3, 5, 7);
        }
        float* c = est + m0 * Np + nb * 32;
        _tile_stored(0, c, Np * 4);
        _tile_stored(1, c + 16, Np * 4);
        _tile_stored(2, c + kTileRows * Np, Np * 4);
        _tile_stored(3, c + kTileRows * Np + 16, Np * 4);
      }
    }
    _tile_release();
  });
}

}  // namespace
#endif

bool has_amx() {
#if defined(RL_AMX)
  return amx_permitted();
#else
  return false;
#endif
}

// weight [N, K] bf16 -> greedy_screen's AMX B tiles (1-D bf16, [ceil(N/32)*2][ceil(K/32)][16][16][2], zero padded).
torch::Tensor amx_pack(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.device().is_cpu(),
              "weight must be a 2-D CPU bfloat16 tensor, got ", weight.sizes(), " ", weight.scalar_type(), " on ",
              weight.device());
  TORCH_CHECK(has_amx(), "amx_pack needs AMX-BF16 compiled in and permitted (has_amx() is False)");
  const auto w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t Nt = (N + 31) / 32 * 2, Kt = (K + 31) / 32;
  auto out = torch::zeros({Nt * Kt * 512}, w.options());
  const at::BFloat16* src = w.data_ptr<at::BFloat16>();
  at::BFloat16* dst = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, Nt, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j)
      for (int64_t t = 0; t < Kt; ++t)
        for (int64_t r = 0; r < 16; ++r)
          for (int64_t c = 0; c < 16; ++c)
            for (int64_t e = 0; e < 2; ++e) {
              const int64_t n = j * 16 + c, k = t * 32 + 2 * r + e;
              if (n < N && k < K) dst[((j * Kt + t) * 16 + r) * 32 + c * 2 + e] = src[n * K + k];
            }
  });
  return out;
}

// greedy_screen's and screen_estimates' check of `packed`: the bf16 panels of an [N, K] weight, where no AMX tiles
// are given (with them the panels are not read, and may be empty)
void check_screen_panels(const torch::Tensor& packed, const c10::optional<torch::Tensor>& amx_opt, int64_t N,
                         int64_t K, int64_t panel) {
  const int64_t numel = packed_numel(N, stored_k<at::BFloat16>(K), panel);
  TORCH_CHECK(amx_opt.has_value() || (packed.dim() == 1 && packed.is_contiguous() &&
              packed.scalar_type() == at::kBFloat16 && packed.numel() == numel),
              "packed must be the weight's bf16 panels (", numel, " elements) where amx_packed is not given, got ",
              packed.numel(), " ", packed.scalar_type());
}

#if defined(RL_BF16_DOT)
// greedy_screen's estimates of x [M, K] (fp32, contiguous) times the bf16 weight [N, K]: by AMX tiles where
// `amx_opt` (amx_pack's) is given ([M rounded up to 32, N rounded up to 32]: read the first M x N; `packed` is not
// read, and may be empty), else by the VDPBF16PS panels `packed` ([M, N]).
torch::Tensor estimates(const torch::Tensor& x, const torch::Tensor& packed,
                        const c10::optional<torch::Tensor>& amx_opt, int64_t N, int64_t panel, int64_t row_block,
                        int64_t min_macs_per_thread) {
  const int64_t M = x.size(0), K = x.size(1), Ks = stored_k<at::BFloat16>(K);
  torch::Tensor est;
  if (amx_opt.has_value()) {  // the estimates by AMX tiles (amx_pack's B tiles of the same bf16 weight)
#if defined(RL_AMX)
    const int64_t Mp = round_up(M, 32), Np = round_up(N, 32), Kp = round_up(K, kTileK);
    TORCH_CHECK(has_amx() && amx_opt->scalar_type() == at::kBFloat16 && amx_opt->is_contiguous() &&
                amx_opt->numel() == Np / 16 * (Kp / kTileK) * 512, "amx_packed must be amx_pack of this weight (",
                Np / 16 * (Kp / kTileK) * 512, " bf16 elements) where has_amx(), got ", amx_opt->numel(), " ",
                amx_opt->scalar_type());
    auto x_tiles = torch::zeros({Mp, Kp}, x.options().dtype(at::kBFloat16));
    x_tiles.narrow(0, 0, M).narrow(1, 0, K).copy_(x);  // round to nearest even
    est = torch::empty({Mp, Np}, x.options());
    amx_estimates(x_tiles.data_ptr<at::BFloat16>(), amx_opt->data_ptr<at::BFloat16>(), est.data_ptr<float>(), Mp, Np,
                  Kp, min_macs_per_thread);
#else
    TORCH_CHECK(false, "amx_packed was given but this build has no AMX (has_amx() is False)");
#endif
  } else {
    auto x_pairs = torch::zeros({M, Ks}, x.options().dtype(at::kBFloat16));
    x_pairs.narrow(1, 0, K).copy_(x);  // round to nearest even
    const auto* xp = reinterpret_cast<const uint32_t*>(x_pairs.data_ptr<at::BFloat16>());
    est = torch::empty({M, N}, x.options());
    // the estimates: linear's bf16 product (its panels split over torch's threads; each estimate the same whatever
    // the split) with fp32 outputs
    gemm_kernel<at::BFloat16, float>(nullptr, xp, packed.data_ptr<at::BFloat16>(), nullptr, nullptr,
                                     est.data_ptr<float>(), M, N, K, panel, row_block, min_macs_per_thread);
  }
  return est;
}
#endif

// The exact greedy pick of x [M, K] times weight [N, K] (fp32) without every fp32 logit: each row's first
// maximum of the logits `linear` computes from the weight's fp32 panels (each one fma chain over k = 0..K-1
// from +0, the micro-kernel's lane), or an empty tensor when the screen cannot decide (the caller computes
// the logits then). `packed`: the weight rounded to bf16 (round to nearest even) in panels of `panel`;
// `bound` [N]: c * ||w_v||_2, `slack` [N]: an absolute term per unit of (1 + ||x_m||_2) (packed_linear.py's
// `_Screen` computes both and proves the bound). Per row m: a_v = the bf16 product (x rounded to bf16, fp32 sums),
// e_v = ||x_m|| * bound_v + (1 + ||x_m||) * slack_v >= |a_v - l_v| for the fp32 logit l_v; the rows' first
// maximum is among {v : a_v + e_v >= max_u (a_u - e_u)}, whose logits are computed as `linear` does and
// compared in index order. Empty result: a non-finite estimate, bound or logit, ||x_m|| outside
// [norm_min, norm_max], or more than max_candidates candidates in a row.
// min_macs_per_thread: as linear's (the bf16 product's panels split over torch's threads).
torch::Tensor greedy_screen(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& weight,
                            const torch::Tensor& bound, const torch::Tensor& slack, int64_t panel,
                            int64_t row_block, int64_t max_candidates, double norm_min, double norm_max,
                            int64_t min_macs_per_thread, const c10::optional<torch::Tensor>& amx_opt) {
  check_blocking(panel, row_block);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous 2-D CPU float32 tensor, got ", x.sizes(), " ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K && weight.scalar_type() == at::kFloat &&
              weight.is_contiguous(), "weight must be a contiguous float32 [N, ", K, "] tensor, got ",
              weight.sizes(), " ", weight.scalar_type());
  check_screen_panels(packed, amx_opt, N, K, panel);
  TORCH_CHECK(bound.numel() == N && slack.numel() == N && bound.scalar_type() == at::kFloat &&
              slack.scalar_type() == at::kFloat && bound.is_contiguous() && slack.is_contiguous(),
              "bound and slack must be contiguous float32 tensors of ", N, " elements");
  TORCH_CHECK(max_candidates >= 1, "max_candidates must be >= 1, got ", max_candidates);
  auto none = torch::empty({0}, x.options().dtype(at::kLong));
#if defined(RL_BF16_DOT)
  if (M == 0 || N == 0 || K == 0) return none;
  const auto est = estimates(x, packed, amx_opt, N, panel, row_block, min_macs_per_thread);
  const int64_t ld = est.size(1);  // (AMX: N padded)
  float* a = est.data_ptr<float>();
  auto out = torch::empty({M}, x.options().dtype(at::kLong));
  int64_t* tok = out.data_ptr<int64_t>();
  const float* xs = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const float* bd = bound.data_ptr<float>();
  const float* sl = slack.data_ptr<float>();
  // per row: its candidates (vocab ids, ascending) at cand[start[m] .. start[m + 1])
  std::vector<int64_t> cand, start(M + 1, 0);
  cand.reserve(M * 8);
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = xs + m * K;
    __m512 sq = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += kLanes) {
      const __m512 xv = _mm512_maskz_loadu_ps(K - k >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1),
                                              xm + k);
      sq = _mm512_fmadd_ps(xv, xv, sq);
    }
    const float norm = std::sqrt(_mm512_reduce_add_ps(sq));
    if (!(norm >= norm_min && norm <= norm_max)) return none;  // (NaN fails too)
    const float* am = a + m * ld;
    const __m512 nv = _mm512_set1_ps(norm), ev = _mm512_set1_ps(1.f + norm);
    // pass 1: the largest lower bound a_u - e_u, and whether every estimate is finite (|a| < inf: NaN fails)
    __m512 lo = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __mmask16 finite = 0xFFFF;
    int64_t v = 0;
    for (; v + kLanes <= N; v += kLanes) {
      const __m512 av = _mm512_loadu_ps(am + v);
      const __m512 e = _mm512_fmadd_ps(ev, _mm512_loadu_ps(sl + v), _mm512_mul_ps(nv, _mm512_loadu_ps(bd + v)));
      finite &= _mm512_cmp_ps_mask(_mm512_abs_ps(av), inf, _CMP_LT_OQ);
      lo = _mm512_max_ps(lo, _mm512_sub_ps(av, e));
    }
    float thr = _mm512_reduce_max_ps(lo);
    bool ok = finite == 0xFFFF;
    for (; v < N; ++v) {
      const float e = std::fma(1.f + norm, sl[v], norm * bd[v]);
      ok = ok && std::fabs(am[v]) < std::numeric_limits<float>::infinity();
      thr = std::max(thr, am[v] - e);
    }
    if (!ok || !(std::fabs(thr) < std::numeric_limits<float>::infinity())) return none;
    // pass 2: the candidates a_v + e_v >= thr, in index order
    const int64_t first = static_cast<int64_t>(cand.size());
    const __m512 tv = _mm512_set1_ps(thr);
    for (v = 0; v + kLanes <= N; v += kLanes) {
      const __m512 e = _mm512_fmadd_ps(ev, _mm512_loadu_ps(sl + v), _mm512_mul_ps(nv, _mm512_loadu_ps(bd + v)));
      __mmask16 hit = _mm512_cmp_ps_mask(_mm512_add_ps(_mm512_loadu_ps(am + v), e), tv, _CMP_GE_OQ);
      while (hit) {
        cand.push_back(v + __builtin_ctz(hit));
        hit &= hit - 1;
      }
    }
    for (; v < N; ++v)
      if (am[v] + std::fma(1.f + norm, sl[v], norm * bd[v]) >= thr) cand.push_back(v);
    if (static_cast<int64_t>(cand.size()) - first > max_candidates) return none;
    start[m + 1] = static_cast<int64_t>(cand.size());
  }
  // the candidates' logits as linear's lane computes them (one fma chain each from +0, k in order), eight
  // independent chains at a time
  const int64_t total = static_cast<int64_t>(cand.size());
  std::vector<const float*> xrow(total);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = start[m]; i < start[m + 1]; ++i) xrow[i] = xs + m * K;
  std::vector<float> logit(total);
  constexpr int kChains = 8;
  for (int64_t i0 = 0; i0 < total; i0 += kChains) {
    const int n = static_cast<int>(std::min<int64_t>(kChains, total - i0));
    const float* xr[kChains];
    const float* wr[kChains];
    float l[kChains];
    for (int j = 0; j < kChains; ++j) {  // (unused chains repeat the last one)
      const int64_t i = i0 + std::min(j, n - 1);
      xr[j] = xrow[i], wr[j] = w + cand[i] * K, l[j] = 0.f;
    }
    for (int64_t k = 0; k < K; ++k)
#pragma GCC unroll 8
      for (int j = 0; j < kChains; ++j) l[j] = std::fma(xr[j][k], wr[j][k], l[j]);
    for (int j = 0; j < n; ++j) logit[i0 + j] = l[j];
  }
  // each row's first maximum among its candidates
  for (int64_t m = 0; m < M; ++m) {
    int64_t best = -1;
    float best_l = 0.f;
    for (int64_t i = start[m]; i < start[m + 1]; ++i) {
      if (!(std::fabs(logit[i]) < std::numeric_limits<float>::infinity())) return none;
      if (best < 0 || logit[i] > best_l) best = cand[i], best_l = logit[i];
    }
    if (best < 0) return none;  // (cannot happen: the first maximum is a candidate)
    tok[m] = best;
  }
  return out;
#else
  return none;
#endif
}

// The screen's estimates as greedy_screen forms them (x [M, K] fp32; `packed` the bf16 panels, `amx_packed` the
// AMX tiles or None): [M, N] fp32, for the tests.
torch::Tensor screen_estimates(const torch::Tensor& x, const torch::Tensor& packed,
                               const c10::optional<torch::Tensor>& amx_opt, int64_t n, int64_t panel,
                               int64_t row_block, int64_t min_macs_per_thread) {
  check_blocking(panel, row_block);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous 2-D CPU float32 tensor, got ", x.sizes(), " ", x.scalar_type());
  check_screen_panels(packed, amx_opt, n, x.size(1), panel);
#if defined(RL_BF16_DOT)
  return estimates(x, packed, amx_opt, n, panel, row_block, min_macs_per_thread).narrow(0, 0, x.size(0))
      .narrow(1, 0, n).contiguous();
#else
  TORCH_CHECK(false, "screen_estimates needs the avx512_bf16 dot (has_screen() is False)");
#endif
}

bool has_avx512() {
#if defined(RL_AVX512)
  return true;
#else
  return false;
#endif
}

// linear's address, for cpu_ops.cpp's decode_layers (built by the same compiler against the same torch headers, so
// the signature it casts the address to is this one)
int64_t linear_address() { return reinterpret_cast<int64_t>(&linear); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack", &pack, "weight [N, K] -> its panels (1-D; into `out` where given)", py::arg("weight"),
        py::arg("panel"), py::arg("out") = py::none());
  m.def("packed_size", &packed_size, "elements of weight [N, K]'s panels", py::arg("weight"), py::arg("panel"));
  m.def("linear", &linear, "x [..., K] times a packed [N, K] weight", py::arg("x"), py::arg("packed"), py::arg("n"),
        py::arg("panel"), py::arg("row_block"), py::arg("bias"), py::arg("residual"),
        py::arg("min_macs_per_thread"));
  m.def("greedy_screen", &greedy_screen, "each row's first maximum of x weight^T, screened in bf16 (empty: undecided)",
        py::arg("x"), py::arg("packed"), py::arg("weight"), py::arg("bound"), py::arg("slack"), py::arg("panel"),
        py::arg("row_block"), py::arg("max_candidates"), py::arg("norm_min"), py::arg("norm_max"),
        py::arg("min_macs_per_thread"), py::arg("amx_packed") = py::none());
  m.def("screen_estimates", &screen_estimates, "greedy_screen's bf16 estimates [M, N] (for the tests)", py::arg("x"),
        py::arg("packed"), py::arg("amx_packed"), py::arg("n"), py::arg("panel"), py::arg("row_block"),
        py::arg("min_macs_per_thread"));
  m.def("amx_pack", &amx_pack, "a bf16 weight [N, K] -> greedy_screen's AMX B tiles", py::arg("weight"));
  m.def("has_amx", &has_amx, "whether greedy_screen's AMX estimates are compiled in and permitted");
  m.def("has_screen", []() {
#if defined(RL_BF16_DOT)
    return true;
#else
    return false;
#endif
  }, "whether greedy_screen's avx512_bf16 product was compiled in");
  m.def("has_avx512", &has_avx512, "whether the AVX-512 micro-kernel was compiled in");
  m.def("linear_address", &linear_address, "linear's address (cpu_ops' decode_layers calls it)");
}
