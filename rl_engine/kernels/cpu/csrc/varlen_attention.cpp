// Packed causal attention over variable-length segments, forward and backward, for the training forward on CPU
// (rl_engine/kernels/cpu/varlen_attention.py), built by rl_engine.kernels.cpu.load_source. Inputs fp32 or bf16
// (q, k, v, and in the backward the output and its gradient, all of one dtype); every product and sum in fp32,
// the outputs (o, dq, dk, dv) rounded once to the inputs' dtype; the log-sum-exp is fp32.
//
// Layout: q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, Dv] (strided rows, the head dim contiguous: the views of
// the fused qkv projection), segments by cu_seqlens [S + 1]. Segment s attends causally to itself and, when
// prefix_of[s] >= 0, fully to segment prefix_of[s]'s keys first (the shared-prefix layout: a GRPO group's
// completions attend to their prompt's K/V). Query head h reads KV head h / (Hq / Hkv).
//
// The segments are short (a prompt, a completion: tens to hundreds of tokens), so one segment's keys for one
// KV head are a tile that fits in L1/L2, and the work is a few small matrix products per (segment, head):
// too small for a BLAS call each (its overhead) and, batched by torch as one padded masked SDPA, spent on
// padding, masks and glue. Here every product is C += A B in vector accumulators with the BQ = 16 query rows of a
// block (one vector: at most 15 causally hidden keys a row computed and masked) as the vector dimension of the
// scores, which are kept transposed, st[key][row], so the softmax's reductions over keys are elementwise vector
// max / add: the scores and dP^T (keys by rows) and dV, dK (keys by the head dim) are `mm_acc`; O += P V and
// dQ += dS K are `mm_acc_t`, which reads P^T / dS^T as they lie and K, V rows in place, so the rows of O and dQ
// come out as rows (no transposed copy of V or K per item, no transposed O / dQ per block).
// The forward is flash-attention style (online softmax over key chunks of BK = 64, so any length works) and
// saves the log-sum-exp of each (row, head); the backward recomputes p = exp(s - lse) and takes
// dS = p * (dP - rowsum(dO * O)) (O as stored: bf16 inputs give a bf16 O, as in FlashAttention's backward).
// bf16 rows are widened to fp32 as they are read: an item's K and V rows into fp32 copies once (read in place
// when fp32 with a head dim that is a multiple of 16, else copied zero-padded to one), the query, output and
// gradient rows with the other per-row copies.
//
// Threads (ATen's intra-op pool): the forward splits (segment, KV head) items, the backward (prefix group,
// KV head) items, where a prefix group is a segment and the segments naming it as their prefix: the prefix
// keys' gradients sum over the whole group, so one item owns every row it writes (no atomics, no reduction
// pass). Items are split over threads by their estimated cost.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "fast_exp.h"
#include "vec16.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t BQ = 16;  // query rows of a block: the vector dimension of the transposed scores
constexpr int64_t BK = 64;  // keys of a chunk
constexpr int64_t VL = 16;  // floats of one v16

using rl_engine_cpu::load16;
using rl_engine_cpu::splat;
using rl_engine_cpu::store16;
using rl_engine_cpu::v16;

inline int64_t round16(int64_t n) { return (n + VL - 1) / VL * VL; }

// fast_exp.h's exp (~2 ulp, vectorises); callers mask their -inf entries themselves (it clamps to [-87.3, 88]).
using rl_engine_cpu::fast_exp;

// C[M][N] += A[M][K] B[K][N]; N a multiple of 16, B and C rows contiguous (ldb, ldc), A rows at lda (a
// local buffer or a strided tensor row). 8 rows of A by 16 columns of B a step when N is one vector, else 4 rows by
// 32 columns, the K products of each entry in increasing k.
void mm_acc(const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t M, int64_t K,
            int64_t N) {
  int64_t m = 0;
  if (N == VL) {  // one vector of columns: 8 rows a step
    for (; m + 8 <= M; m += 8) {
      const float* a = A + m * lda;
      float* c = C + m * ldc;
      v16 x0 = load16(c), x1 = load16(c + ldc), x2 = load16(c + 2 * ldc), x3 = load16(c + 3 * ldc);
      v16 x4 = load16(c + 4 * ldc), x5 = load16(c + 5 * ldc), x6 = load16(c + 6 * ldc), x7 = load16(c + 7 * ldc);
      for (int64_t k = 0; k < K; ++k) {
        const v16 b = load16(B + k * ldb);
        x0 += splat(a[k]) * b; x1 += splat(a[lda + k]) * b; x2 += splat(a[2 * lda + k]) * b;
        x3 += splat(a[3 * lda + k]) * b; x4 += splat(a[4 * lda + k]) * b; x5 += splat(a[5 * lda + k]) * b;
        x6 += splat(a[6 * lda + k]) * b; x7 += splat(a[7 * lda + k]) * b;
      }
      store16(c, x0); store16(c + ldc, x1); store16(c + 2 * ldc, x2); store16(c + 3 * ldc, x3);
      store16(c + 4 * ldc, x4); store16(c + 5 * ldc, x5); store16(c + 6 * ldc, x6); store16(c + 7 * ldc, x7);
    }
  }
  for (; m + 4 <= M; m += 4) {
    const float* a0 = A + m * lda;
    const float* a1 = a0 + lda;
    const float* a2 = a1 + lda;
    const float* a3 = a2 + lda;
    float* c0 = C + m * ldc;
    int64_t n = 0;
    for (; n + 2 * VL <= N; n += 2 * VL) {
      v16 x00 = load16(c0 + n), x01 = load16(c0 + n + VL);
      v16 x10 = load16(c0 + ldc + n), x11 = load16(c0 + ldc + n + VL);
      v16 x20 = load16(c0 + 2 * ldc + n), x21 = load16(c0 + 2 * ldc + n + VL);
      v16 x30 = load16(c0 + 3 * ldc + n), x31 = load16(c0 + 3 * ldc + n + VL);
      for (int64_t k = 0; k < K; ++k) {
        const v16 b0 = load16(B + k * ldb + n), b1 = load16(B + k * ldb + n + VL);
        const v16 s0 = splat(a0[k]), s1 = splat(a1[k]), s2 = splat(a2[k]), s3 = splat(a3[k]);
        x00 += s0 * b0; x01 += s0 * b1;
        x10 += s1 * b0; x11 += s1 * b1;
        x20 += s2 * b0; x21 += s2 * b1;
        x30 += s3 * b0; x31 += s3 * b1;
      }
      store16(c0 + n, x00); store16(c0 + n + VL, x01);
      store16(c0 + ldc + n, x10); store16(c0 + ldc + n + VL, x11);
      store16(c0 + 2 * ldc + n, x20); store16(c0 + 2 * ldc + n + VL, x21);
      store16(c0 + 3 * ldc + n, x30); store16(c0 + 3 * ldc + n + VL, x31);
    }
    for (; n < N; n += VL) {
      v16 x0 = load16(c0 + n), x1 = load16(c0 + ldc + n), x2 = load16(c0 + 2 * ldc + n), x3 = load16(c0 + 3 * ldc + n);
      for (int64_t k = 0; k < K; ++k) {
        const v16 b = load16(B + k * ldb + n);
        x0 += splat(a0[k]) * b; x1 += splat(a1[k]) * b; x2 += splat(a2[k]) * b; x3 += splat(a3[k]) * b;
      }
      store16(c0 + n, x0); store16(c0 + ldc + n, x1); store16(c0 + 2 * ldc + n, x2); store16(c0 + 3 * ldc + n, x3);
    }
  }
  for (; m < M; ++m) {
    const float* a = A + m * lda;
    float* c = C + m * ldc;
    for (int64_t n = 0; n < N; n += VL) {
      v16 x = load16(c + n);
      for (int64_t k = 0; k < K; ++k) x += splat(a[k]) * load16(B + k * ldb + n);
      store16(c + n, x);
    }
  }
}

// C[M][N] += A[M][K] B[K][N] with A given transposed (At[k][m] at At + k * lda + m: the transposed scores); N a
// multiple of 16, B and C rows contiguous (ldb, ldc). 8 rows of C by 16 columns a step, each entry's K products in
// increasing k, as mm_acc's: the same sums as mm_acc of A, and no transposed copy of B or C.
void mm_acc_t(const float* At, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, int64_t M, int64_t K,
              int64_t N) {
  for (int64_t n = 0; n < N; n += VL) {
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) {
      float* c = C + m * ldc + n;
      v16 x0 = load16(c), x1 = load16(c + ldc), x2 = load16(c + 2 * ldc), x3 = load16(c + 3 * ldc);
      v16 x4 = load16(c + 4 * ldc), x5 = load16(c + 5 * ldc), x6 = load16(c + 6 * ldc), x7 = load16(c + 7 * ldc);
      for (int64_t k = 0; k < K; ++k) {
        const v16 b = load16(B + k * ldb + n);
        const float* a = At + k * lda + m;
        x0 += splat(a[0]) * b; x1 += splat(a[1]) * b; x2 += splat(a[2]) * b; x3 += splat(a[3]) * b;
        x4 += splat(a[4]) * b; x5 += splat(a[5]) * b; x6 += splat(a[6]) * b; x7 += splat(a[7]) * b;
      }
      store16(c, x0); store16(c + ldc, x1); store16(c + 2 * ldc, x2); store16(c + 3 * ldc, x3);
      store16(c + 4 * ldc, x4); store16(c + 5 * ldc, x5); store16(c + 6 * ldc, x6); store16(c + 7 * ldc, x7);
    }
    for (; m + 4 <= M; m += 4) {
      float* c = C + m * ldc + n;
      v16 x0 = load16(c), x1 = load16(c + ldc), x2 = load16(c + 2 * ldc), x3 = load16(c + 3 * ldc);
      for (int64_t k = 0; k < K; ++k) {
        const v16 b = load16(B + k * ldb + n);
        const float* a = At + k * lda + m;
        x0 += splat(a[0]) * b; x1 += splat(a[1]) * b; x2 += splat(a[2]) * b; x3 += splat(a[3]) * b;
      }
      store16(c, x0); store16(c + ldc, x1); store16(c + 2 * ldc, x2); store16(c + 3 * ldc, x3);
    }
    for (; m < M; ++m) {
      float* c = C + m * ldc + n;
      v16 x = load16(c);
      for (int64_t k = 0; k < K; ++k) x += splat(At[k * lda + m]) * load16(B + k * ldb + n);
      store16(c, x);
    }
  }
}

template <typename T>
struct Tensor3 {  // a strided [T, H, D] view (fp32 or bf16) with a contiguous last dim
  T* data;
  int64_t row, head;
  T* at(int64_t t, int64_t h) const { return data + t * row + h * head; }
};

template <typename T>
Tensor3<T> view3(const torch::Tensor& x) {
  return {x.data_ptr<T>(), x.stride(0), x.stride(1)};
}

inline float to_f(float x) { return x; }
inline float to_f(at::BFloat16 x) { return static_cast<float>(x); }

struct Layout {
  std::vector<int64_t> bounds;  // [S + 1]
  std::vector<int64_t> prefix;  // [S], -1: none
};

Layout read_layout(const torch::Tensor& cu_seqlens, const torch::Tensor& prefix_of, int64_t T) {
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1, "cu_seqlens must be 1-D [S + 1]");
  const torch::Tensor cu = cu_seqlens.to(torch::kInt64).contiguous();
  Layout lay;
  lay.bounds.assign(cu.data_ptr<int64_t>(), cu.data_ptr<int64_t>() + cu.numel());
  const int64_t S = cu.numel() - 1;
  TORCH_CHECK(lay.bounds[0] == 0 && lay.bounds[S] == T, "cu_seqlens must start at 0 and end at T = ", T);
  for (int64_t s = 0; s < S; ++s) TORCH_CHECK(lay.bounds[s] <= lay.bounds[s + 1], "cu_seqlens must not decrease");
  lay.prefix.assign(S, -1);
  if (prefix_of.numel()) {
    TORCH_CHECK(prefix_of.numel() == S, "prefix_of must have one entry per segment (", S, ")");
    const torch::Tensor p = prefix_of.to(torch::kInt64).contiguous();
    for (int64_t s = 0; s < S; ++s) {
      const int64_t r = p.data_ptr<int64_t>()[s];
      TORCH_CHECK(r < S && r != s && (r < 0 || (p.data_ptr<int64_t>()[r] < 0)),
                  "prefix_of[", s, "] = ", r, " must be -1 or another segment without a prefix");
      lay.prefix[s] = r;
    }
  }
  return lay;
}

// Items split over the pool's threads by cost: thread t takes the items whose cost prefix falls in its share.
template <typename F>
void run_items(const std::vector<double>& cost, const F& work) {
  const int64_t n = static_cast<int64_t>(cost.size());
  if (n == 0) return;
  std::vector<double> before(n + 1, 0.0);
  for (int64_t i = 0; i < n; ++i) before[i + 1] = before[i] + cost[i];
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const double lo = before[n] * t / threads, hi = before[n] * (t + 1) / threads;
      for (int64_t i = 0; i < n; ++i) {
        const double mid = 0.5 * (before[i] + before[i + 1]);
        if (mid >= lo && (mid < hi || t == threads - 1)) work(i);
      }
    }
  });
}

// One segment's keys for one KV head: the prefix's P rows first (seen by every query), then the segment's
// own C rows (causal).
struct Keys {
  int64_t pre_start, P, own_start, C;
  int64_t n() const { return P + C; }
  int64_t row(int64_t j) const { return j < P ? pre_start + j : own_start + j - P; }
};

Keys keys_of(const Layout& lay, int64_t s) {
  const int64_t p = lay.prefix[s];
  const int64_t own = lay.bounds[s], C = lay.bounds[s + 1] - own;
  if (p < 0) return {0, 0, own, C};
  return {lay.bounds[p], lay.bounds[p + 1] - lay.bounds[p], own, C};
}

// An item's key (or value) rows of one KV head in fp32, in Keys' order: the prefix's P rows, then the own rows,
// each part rows at a stride (the tensor's rows in place, or a widened copy's).
struct Rows {
  const float* pre;
  const float* own;
  int64_t pre_stride, own_stride, P;
  const float* at(int64_t j) const { return j < P ? pre + j * pre_stride : own + (j - P) * own_stride; }
  int64_t stride(int64_t j) const { return j < P ? pre_stride : own_stride; }
};

// The rows as mm_acc's A (`width` entries a row) and as mm_acc_t's B (round16(width) entries a row: the entries past
// `width` zero). fp32 rows of a multiple of 16 entries are read in place; others (bf16: widened) are copied into
// `copy` ([N][round16(width)]) once per item.
template <typename T>
Rows rows_of(const Keys& keys, const Tensor3<T>& x, int64_t h, int64_t width, std::vector<float>& copy) {
  if constexpr (std::is_same_v<T, float>) {
    if (width % VL == 0) return {x.at(keys.pre_start, h), x.at(keys.own_start, h), x.row, x.row, keys.P};
  }
  const int64_t wp = round16(width);
  copy.assign(keys.n() * wp, 0.f);
  for (int64_t j = 0; j < keys.n(); ++j) {
    const T* src = x.at(keys.row(j), h);
    for (int64_t d = 0; d < width; ++d) copy[j * wp + d] = to_f(src[d]);
  }
  return {copy.data(), copy.data() + keys.P * wp, wp, wp, keys.P};
}

// C[j - j0][:] += rows[j] B for the chunk's rows j0 .. j0 + bk - 1: mm_acc over each run of rows at one stride
// (the prefix part, then the own part), A = the rows as they lie.
void rows_mm_acc(const Rows& rows, int64_t j0, int64_t bk, const float* B, int64_t K, float* C, int64_t bq) {
  for (int64_t j = j0; j < j0 + bk;) {
    const int64_t run_end = j < rows.P ? std::min(j0 + bk, rows.P) : j0 + bk;
    mm_acc(rows.at(j), rows.stride(j), B, bq, C + (j - j0) * bq, bq, run_end - j, K, bq);
    j = run_end;
  }
}

// C[r][:] += sum_j At[j - j0][r] rows[j][:] (r < M) for the chunk's rows j0 .. j0 + bk - 1: mm_acc_t over each run of
// rows at one stride, B = the rows as they lie.
void rows_mm_acc_t(const float* At, int64_t lda, const Rows& rows, int64_t j0, int64_t bk, float* C, int64_t ldc,
                   int64_t M, int64_t N) {
  for (int64_t j = j0; j < j0 + bk;) {
    const int64_t run_end = j < rows.P ? std::min(j0 + bk, rows.P) : j0 + bk;
    mm_acc_t(At + (j - j0) * lda, lda, rows.at(j), rows.stride(j), C, ldc, M, run_end - j, N);
    j = run_end;
  }
}

// Scores of a block, transposed: st[j][r] = (q_r * scale) . k_j for the chunk's keys against qt [D][bq] (bq = BQ
// lanes); entries that a row does not see (or padding rows r >= rows) become -inf.
void block_scores(const Keys& keys, const Rows& k, int64_t D, const float* qt, int64_t i0, int64_t rows, int64_t j0,
                  int64_t bk, float* st, int64_t bq) {
  std::fill(st, st + bk * bq, 0.f);
  rows_mm_acc(k, j0, bk, qt, D, st, bq);
  // row r sees key j when j < P or j - P <= i0 + r: the rows before max(0, j - P - i0) do not
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t jj = 0; jj < bk; ++jj) {
    float* row = st + jj * bq;
    const int64_t hidden = std::min<int64_t>(rows, std::max<int64_t>(0, j0 + jj - keys.P - i0));
    std::fill(row, row + hidden, ninf);
    std::fill(row + rows, row + bq, ninf);
  }
}

// Keys [0, end) that the block's rows i0 .. i0 + rows - 1 see.
inline int64_t keys_seen(const Keys& keys, int64_t i0, int64_t rows) { return keys.P + std::min(keys.C, i0 + rows); }

template <typename T>
void forward_item(const Layout& lay, int64_t s, int64_t h, const Tensor3<T>& q, const Tensor3<T>& k,
                  const Tensor3<T>& v, const Tensor3<T>& o, float* lse, int64_t Hq, int64_t G, int64_t D, int64_t Dv,
                  float scale) {
  const Keys keys = keys_of(lay, s);
  if (keys.C == 0) return;
  const int64_t Dvp = round16(Dv);
  std::vector<float> k_copy, v_copy;
  const Rows kr = rows_of(keys, k, h, D, k_copy), vr = rows_of(keys, v, h, Dv, v_copy);
  std::vector<float> qt(D * BQ), st(BK * BQ), ob(BQ * Dvp);  // ob: the block's output rows [BQ][Dvp]
  float m[BQ], l[BQ], corr[BQ];
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t g = 0; g < G; ++g) {
    const int64_t hq = h * G + g;
    for (int64_t i0 = 0; i0 < keys.C; i0 += BQ) {
      const int64_t rows = std::min(BQ, keys.C - i0);
      std::fill(qt.begin(), qt.end(), 0.f);
      for (int64_t r = 0; r < rows; ++r) {
        const T* src = q.at(keys.own_start + i0 + r, hq);
        for (int64_t d = 0; d < D; ++d) qt[d * BQ + r] = to_f(src[d]) * scale;
      }
      std::fill(ob.begin(), ob.end(), 0.f);
      std::fill(m, m + BQ, ninf);
      std::fill(l, l + BQ, 0.f);
      const int64_t end = keys_seen(keys, i0, rows);
      for (int64_t j0 = 0; j0 < end; j0 += BK) {
        const int64_t bk = std::min(BK, end - j0);
        block_scores(keys, kr, D, qt.data(), i0, rows, j0, bk, st.data(), BQ);
        float mnew[BQ];
        std::copy(m, m + BQ, mnew);
        for (int64_t jj = 0; jj < bk; ++jj)
#pragma omp simd
          for (int64_t r = 0; r < BQ; ++r) mnew[r] = std::max(mnew[r], st[jj * BQ + r]);
        float base[BQ];
        for (int64_t r = 0; r < BQ; ++r) {  // rows that saw nothing yet keep m = -inf: exp(-inf - 0) = 0
          base[r] = mnew[r] == ninf ? 0.f : mnew[r];
          corr[r] = m[r] == ninf ? 0.f : fast_exp(m[r] - base[r]);
        }
        float sum[BQ] = {};
        for (int64_t jj = 0; jj < bk; ++jj) {
          float* row = st.data() + jj * BQ;
#pragma omp simd
          for (int64_t r = 0; r < BQ; ++r) {
            const float p = row[r] == ninf ? 0.f : fast_exp(row[r] - base[r]);
            row[r] = p;
            sum[r] += p;
          }
        }
        for (int64_t r = 0; r < BQ; ++r) {
          l[r] = l[r] * corr[r] + sum[r];
          m[r] = mnew[r];
        }
        for (int64_t r = 0; r < rows; ++r)
#pragma omp simd
          for (int64_t d = 0; d < Dvp; ++d) ob[r * Dvp + d] *= corr[r];
        rows_mm_acc_t(st.data(), BQ, vr, j0, bk, ob.data(), Dvp, rows, Dvp);  // O += P V
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = keys.own_start + i0 + r;
        T* dst = o.at(t, hq);
        const float inv = 1.f / l[r];
        for (int64_t d = 0; d < Dv; ++d) dst[d] = static_cast<T>(ob[r * Dvp + d] * inv);
        lse[t * Hq + hq] = m[r] + std::log(l[r]);
      }
    }
  }
}

// The backward of one segment s for one KV head: writes its queries' dQ and its own keys' dK, dV (once: each row and
// head belongs to one segment) and adds its prefix keys' dK, dV into the fp32 key gradients (the prefix's rows are
// shared by the group, which this item owns; the prefix segment itself, run first, wrote them).
template <typename T>
void backward_segment(const Layout& lay, int64_t s, int64_t h, const Tensor3<T>& q, const Tensor3<T>& k,
                      const Tensor3<T>& v, const Tensor3<T>& o, const Tensor3<T>& dout, const float* lse,
                      const Tensor3<T>& dq, const Tensor3<float>& dk, const Tensor3<float>& dv, int64_t Hq, int64_t G,
                      int64_t D, int64_t Dv, float scale) {
  const Keys keys = keys_of(lay, s);
  if (keys.C == 0) return;
  const int64_t N = keys.n(), Dp = round16(D), Dvp = round16(Dv);
  std::vector<float> k_copy, v_copy;
  const Rows kr = rows_of(keys, k, h, D, k_copy), vr = rows_of(keys, v, h, Dv, v_copy);
  std::vector<float> dkl(N * Dp, 0.f), dvl(N * Dvp, 0.f);  // this segment's key gradients [N][D], [N][Dv]
  std::vector<float> qt(D * BQ), qs(BQ * Dp), dot_(Dv * BQ), dor(BQ * Dvp), st(BK * BQ), dpt(BK * BQ),
      dqr(BQ * Dp);  // dqr: the block's dQ rows [BQ][Dp]
  float lse_r[BQ], delta[BQ];
  for (int64_t g = 0; g < G; ++g) {
    const int64_t hq = h * G + g;
    for (int64_t i0 = 0; i0 < keys.C; i0 += BQ) {
      const int64_t rows = std::min(BQ, keys.C - i0);
      std::fill(qt.begin(), qt.end(), 0.f);
      std::fill(qs.begin(), qs.end(), 0.f);
      std::fill(dot_.begin(), dot_.end(), 0.f);
      std::fill(dor.begin(), dor.end(), 0.f);
      std::fill(dqr.begin(), dqr.end(), 0.f);
      std::fill(lse_r, lse_r + BQ, 0.f);
      std::fill(delta, delta + BQ, 0.f);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = keys.own_start + i0 + r;
        const T* qsrc = q.at(t, hq);
        const T* gsrc = dout.at(t, hq);
        const T* osrc = o.at(t, hq);
        float dsum = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          const float x = to_f(qsrc[d]) * scale;
          qt[d * BQ + r] = x;
          qs[r * Dp + d] = x;
        }
        for (int64_t d = 0; d < Dv; ++d) {
          const float g = to_f(gsrc[d]);
          dot_[d * BQ + r] = g;
          dor[r * Dvp + d] = g;
          dsum += g * to_f(osrc[d]);
        }
        delta[r] = dsum;
        lse_r[r] = lse[t * Hq + hq];
      }
      const int64_t end = keys_seen(keys, i0, rows);
      for (int64_t j0 = 0; j0 < end; j0 += BK) {
        const int64_t bk = std::min(BK, end - j0);
        block_scores(keys, kr, D, qt.data(), i0, rows, j0, bk, st.data(), BQ);
        std::fill(dpt.begin(), dpt.begin() + bk * BQ, 0.f);
        rows_mm_acc(vr, j0, bk, dot_.data(), Dv, dpt.data(), BQ);  // dP^T = V dO^T
        const float ninf = -std::numeric_limits<float>::infinity();
        for (int64_t jj = 0; jj < bk; ++jj) {
          float* prow = st.data() + jj * BQ;
          float* drow = dpt.data() + jj * BQ;
#pragma omp simd
          for (int64_t r = 0; r < BQ; ++r) {
            const float p = prow[r] == ninf ? 0.f : fast_exp(prow[r] - lse_r[r]);
            prow[r] = p;                       // P^T
            drow[r] = p * (drow[r] - delta[r]);  // dS^T (unscaled)
          }
        }
        mm_acc(st.data(), BQ, dor.data(), Dvp, dvl.data() + j0 * Dvp, Dvp, bk, rows, Dvp);  // dV += P^T dO
        mm_acc(dpt.data(), BQ, qs.data(), Dp, dkl.data() + j0 * Dp, Dp, bk, rows, Dp);     // dK += dS^T (q scale)
        rows_mm_acc_t(dpt.data(), BQ, kr, j0, bk, dqr.data(), Dp, rows, Dp);                // dQ += dS K
      }
      for (int64_t r = 0; r < rows; ++r) {
        T* dst = dq.at(keys.own_start + i0 + r, hq);
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(dqr[r * Dp + d] * scale);
      }
    }
  }
  for (int64_t j = 0; j < N; ++j) {
    float* kd = dk.at(keys.row(j), h);
    float* vd = dv.at(keys.row(j), h);
    if (j < keys.P) {
      for (int64_t d = 0; d < D; ++d) kd[d] += dkl[j * Dp + d];
      for (int64_t d = 0; d < Dv; ++d) vd[d] += dvl[j * Dvp + d];
    } else {
      for (int64_t d = 0; d < D; ++d) kd[d] = dkl[j * Dp + d];
      for (int64_t d = 0; d < Dv; ++d) vd[d] = dvl[j * Dvp + d];
    }
  }
}

void check_inputs(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 || q.scalar_type() == torch::kBFloat16,
              "q, k, v must be fp32 or bf16, not ", q.scalar_type());
  for (const torch::Tensor* x : {&q, &k, &v}) {
    TORCH_CHECK(x->dim() == 3 && x->scalar_type() == q.scalar_type() && x->device().is_cpu() && x->stride(2) == 1,
                "q, k, v must be 3-D CPU tensors [T, heads, head_dim] of one dtype with a contiguous head dim");
  }
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "q, k, v must have the same token count");
  TORCH_CHECK(k.size(1) == v.size(1) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "query heads (", q.size(1), ") must be a multiple of the KV heads (", k.size(1), ")");
  TORCH_CHECK(k.size(2) == q.size(2), "q and k head dims differ");
}

double segment_cost(const Layout& lay, int64_t s) {
  const Keys keys = keys_of(lay, s);
  return static_cast<double>(keys.C) * (keys.P + 0.5 * keys.C + BQ) + 1.0;
}

// (o [T, Hq, Dv], lse [T, Hq]) of the packed attention.
std::vector<torch::Tensor> forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                   const torch::Tensor& cu_seqlens, const torch::Tensor& prefix_of, double scale) {
  check_inputs(q, k, v);
  const int64_t T = q.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(2), Dv = v.size(2), G = Hq / Hkv;
  const Layout lay = read_layout(cu_seqlens, prefix_of, T);
  const int64_t S = static_cast<int64_t>(lay.prefix.size());
  torch::Tensor o = torch::empty({T, Hq, Dv}, q.options());
  torch::Tensor lse = torch::empty({T, Hq}, q.options().dtype(torch::kFloat32));
  float* lse_p = lse.data_ptr<float>();
  std::vector<double> cost(S * Hkv);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t h = 0; h < Hkv; ++h) cost[s * Hkv + h] = segment_cost(lay, s);
  auto run = [&](auto* tag) {
    using E = std::remove_pointer_t<decltype(tag)>;
    const Tensor3<E> tq = view3<E>(q), tk = view3<E>(k), tv = view3<E>(v), to = view3<E>(o);
    run_items(cost, [&](int64_t item) {
      forward_item<E>(lay, item / Hkv, item % Hkv, tq, tk, tv, to, lse_p, Hq, G, D, Dv, static_cast<float>(scale));
    });
  };
  if (q.scalar_type() == torch::kBFloat16) run(static_cast<at::BFloat16*>(nullptr));
  else run(static_cast<float*>(nullptr));
  return {o, lse};
}

// (dq, dk, dv) of the packed attention, from its saved inputs, output and log-sum-exp.
std::vector<torch::Tensor> backward(const torch::Tensor& dout, const torch::Tensor& q, const torch::Tensor& k,
                                    const torch::Tensor& v, const torch::Tensor& o, const torch::Tensor& lse,
                                    const torch::Tensor& cu_seqlens, const torch::Tensor& prefix_of, double scale) {
  check_inputs(q, k, v);
  TORCH_CHECK(dout.sizes() == o.sizes() && dout.stride(2) == 1 && o.stride(2) == 1 &&
                  dout.scalar_type() == q.scalar_type() && o.scalar_type() == q.scalar_type() &&
                  lse.scalar_type() == torch::kFloat32 && lse.is_contiguous(),
              "dout and o must have the inputs' dtype and the output's shape, with a contiguous head dim, and lse "
              "must be the forward's contiguous fp32 log-sum-exp");
  const int64_t T = q.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(2), Dv = v.size(2), G = Hq / Hkv;
  const Layout lay = read_layout(cu_seqlens, prefix_of, T);
  const int64_t S = static_cast<int64_t>(lay.prefix.size());
  torch::Tensor dq = torch::empty({T, Hq, D}, q.options());
  // the key gradients sum a prefix's rows over its group in fp32, rounded to the inputs' dtype at the end; every row
  // is written by its segment's backward_segment (cu_seqlens covers [0, T))
  torch::Tensor dk = torch::empty({T, Hkv, D}, q.options().dtype(torch::kFloat32));
  torch::Tensor dv = torch::empty({T, Hkv, Dv}, q.options().dtype(torch::kFloat32));
  const Tensor3<float> tdk = view3<float>(dk), tdv = view3<float>(dv);
  // prefix groups: each root segment (no prefix) first, then the segments that name it
  std::vector<std::vector<int64_t>> members(S);
  for (int64_t s = 0; s < S; ++s)
    if (lay.prefix[s] < 0) members[s].push_back(s);
  for (int64_t s = 0; s < S; ++s)
    if (lay.prefix[s] >= 0) members[lay.prefix[s]].push_back(s);
  std::vector<int64_t> roots;
  std::vector<double> cost;
  for (int64_t r = 0; r < S; ++r) {
    if (lay.prefix[r] >= 0) continue;
    double c = 0.0;
    for (int64_t s : members[r]) c += segment_cost(lay, s);
    for (int64_t h = 0; h < Hkv; ++h) {
      roots.push_back(r);
      cost.push_back(c);
    }
  }
  const float* lse_p = lse.data_ptr<float>();
  auto run = [&](auto* tag) {
    using E = std::remove_pointer_t<decltype(tag)>;
    const Tensor3<E> tq = view3<E>(q), tk = view3<E>(k), tv = view3<E>(v), to = view3<E>(o), tdo = view3<E>(dout),
                     tdq = view3<E>(dq);
    run_items(cost, [&](int64_t item) {
      const int64_t r = roots[item], h = item % Hkv;
      for (int64_t s : members[r])
        backward_segment<E>(lay, s, h, tq, tk, tv, to, tdo, lse_p, tdq, tdk, tdv, Hq, G, D, Dv,
                            static_cast<float>(scale));
    });
  };
  if (q.scalar_type() == torch::kBFloat16) {
    run(static_cast<at::BFloat16*>(nullptr));
    return {dq, dk.to(torch::kBFloat16), dv.to(torch::kBFloat16)};
  }
  run(static_cast<float*>(nullptr));
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "(o, lse) of packed causal attention over segments with optional prefixes");
  m.def("backward", &backward, "(dq, dk, dv) of packed causal attention over segments with optional prefixes");
}
