// The inference engine's prefill attention on CPU (the registry's `paged_prefill_attention`, called through
// rl_engine/kernels/cpu/prefill_attention.py): every prefill chunk of a step in one call, each chunk's queries
// attending causally to their sequence's keys read in place in the paged cache. Built by
// rl_engine.kernels.cpu.load_source.
//
// Tiled: a task is (chunk, kv head, tile of QT query positions); its rows are the tile's queries times the G query
// heads of the GQA group. Keys go by tiles of KT = 16: each key tile is widened to fp32 and transposed once
// ([D][16]) for all the task's rows, so a row's 16 scores are D fma of a broadcast q element into one 16-lane
// accumulator (no per-key horizontal sum, the per-query kernel's cost); the values of the tile are widened once
// too. Softmax is online (flash attention's running max m, sum l and rescaled accumulator per row), in fp32;
// the output is rounded once to q's dtype. Threads over tasks (ATen's intra-op pool).
//
// Numerics: fp32 accumulation like the reference's SDPA in fp32, in another order (key tiles, online
// rescaling), exp by fast_exp.h (~2 ulp): within a few ulp of fp32 attention, then one rounding.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "fast_exp.h"
#include "vec16.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using rl_engine_cpu::fast_exp;

constexpr int64_t KT = 16;  // keys per tile: one 16-lane fp32 vector of scores per row
constexpr int64_t KB = 128;  // keys per block (softmax in one pass over a block)
constexpr int64_t QT = 32;  // query positions per task (each key block widened once for all their rows)

inline float widen1(float x) { return x; }
inline float widen1(c10::BFloat16 x) {
  const uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float widen1(c10::Half x) { return static_cast<float>(x); }

using rl_engine_cpu::load16;
using rl_engine_cpu::splat;
using rl_engine_cpu::store16;
using rl_engine_cpu::v16;

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
// horizontal max and sum by halving trees
inline float hmax(v16 v) {
  const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const v8 b = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v8 m8 = a > b ? a : b;
  const v4 c = __builtin_shufflevector(m8, m8, 0, 1, 2, 3), d = __builtin_shufflevector(m8, m8, 4, 5, 6, 7);
  const v4 m4 = c > d ? c : d;
  return std::max(std::max(m4[0], m4[1]), std::max(m4[2], m4[3]));
}
inline float hsum(v16 v) {
  const v8 s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}
inline v16 vexp(v16 x) {
  float a[16];
  store16(a, x);
#pragma omp simd
  for (int i = 0; i < 16; ++i) a[i] = fast_exp(a[i]);
  return load16(a);
}

// One task: rows j * G + g (query j of the tile, head g of kv head h's group). Keys go by blocks of KB = 128
// (8 tiles of 16): a block's scores for 4 rows at a time, then per row its max and weights, then the 4 rows' P.V
// over the block together, the running max / sum / accumulator rescaled once per block (online softmax across
// blocks).
// Dp / Vp: D / Dv rounded up to 16 (the buffers' tails stay zero).
template <typename T>
void attend_tile(const T* q, int64_t qs0, int64_t qs1, const T* kc, const T* vc, const int32_t* table,
                 int64_t width, int64_t num_blocks, int64_t bs, int64_t Hkv, int64_t h, int64_t G, int64_t D,
                 int64_t Dv, int64_t first_pos, int64_t nq, float scale, T* out, int64_t os0, int64_t os1,
                 std::vector<float>& buf, std::atomic<bool>& bad) {
  constexpr int64_t NT = KB / KT;
  const int64_t R = nq * G, Dp = (D + 15) / 16 * 16, Vp = (Dv + 15) / 16 * 16;
  const int64_t need = KB * Dp + KB * Vp + R * Dp + 2 * R + R * Vp + 4 * KB;
  if (static_cast<int64_t>(buf.size()) < need) buf.resize(need);  // new elements are zeros
  float* kt = buf.data();      // NT tiles of [Dp][KT]: the key block transposed by tile (rows past D stay zero)
  float* vt = kt + KB * Dp;    // [KB][Vp] (columns past Dv stay zero)
  float* sb = vt + KB * Vp;    // [4][KB] scores of 4 rows
  float* qf = sb + 4 * KB;     // [R][Dp], q * scale
  float* m = qf + R * Dp;      // [R] running max
  float* l = m + R;            // [R] running sum
  float* acc = l + R;          // [R][Vp]
  for (int64_t j = 0; j < nq; ++j)
    for (int64_t g = 0; g < G; ++g) {
      const T* qr = q + j * qs0 + (h * G + g) * qs1;
      float* dst = qf + (j * G + g) * Dp;
      for (int64_t d = 0; d < D; ++d) dst[d] = widen1(qr[d]) * scale;
      std::fill(dst + D, dst + Dp, 0.f);
    }
  std::fill(m, m + R, -std::numeric_limits<float>::infinity());
  std::fill(l, l + R, 0.f);
  std::fill(acc, acc + R * Vp, 0.f);
  const int64_t ktok = Hkv * D, vtok = Hkv * Dv;
  const int64_t last = first_pos + nq - 1;  // the tile's last query position: keys 0..last
  v16 lane;
  for (int i = 0; i < 16; ++i) lane[i] = static_cast<float>(i);
  const v16 neg_inf = splat(-std::numeric_limits<float>::infinity());
  for (int64_t k0 = 0; k0 <= last; k0 += KB) {
    const int64_t nk = std::min(KB, last + 1 - k0), ntiles = (nk + KT - 1) / KT;
    for (int64_t t = 0; t < ntiles * KT; ++t) {
      float* kd = kt + (t / KT) * Dp * KT + t % KT;
      if (t >= nk) {  // past the block's keys: zeros (masked below)
        for (int64_t d = 0; d < D; ++d) kd[d * KT] = 0.f;
        for (int64_t d = 0; d < Dv; ++d) vt[t * Vp + d] = 0.f;
        continue;
      }
      const int64_t pos = k0 + t, b = pos / bs;
      const int64_t block = b < width ? table[b] : -1;
      if (block < 0 || block >= num_blocks) {
        bad = true;
        return;
      }
      const int64_t slot = block * bs + pos % bs;
      const T* kr = kc + slot * ktok + h * D;
      const T* vr = vc + slot * vtok + h * Dv;
      for (int64_t d = 0; d < D; ++d) kd[d * KT] = widen1(kr[d]);
      for (int64_t d = 0; d < Dv; ++d) vt[t * Vp + d] = widen1(vr[d]);
    }
    // the first row whose query sees any key of the block: query j sees keys <= first_pos + j
    const int64_t r0 = std::max<int64_t>(0, k0 - first_pos) * G;
    for (int64_t r = r0; r < R; r += 4) {
      const int64_t nr = std::min<int64_t>(4, R - r);
      const float* q0 = qf + r * Dp;
      const float* q1 = q0 + (nr > 1 ? Dp : 0);
      const float* q2 = q0 + (nr > 2 ? 2 * Dp : 0);
      const float* q3 = q0 + (nr > 3 ? 3 * Dp : 0);
      // the keys the last of the 4 rows sees (the others see no more)
      const int64_t seen = std::min(nk, first_pos + (r + nr - 1) / G - k0 + 1);
      for (int64_t tile = 0; tile * KT < seen; ++tile) {
        const float* kd = kt + tile * Dp * KT;
        v16 s0{}, s1{}, s2{}, s3{};
        for (int64_t d = 0; d < Dp; ++d) {
          const v16 k = load16(kd + d * KT);
          s0 += q0[d] * k;
          s1 += q1[d] * k;
          s2 += q2[d] * k;
          s3 += q3[d] * k;
        }
        store16(sb + tile * KT, s0);
        store16(sb + KB + tile * KT, s1);
        store16(sb + 2 * KB + tile * KT, s2);
        store16(sb + 3 * KB + tile * KT, s3);
      }
      float alpha[4] = {1.f, 1.f, 1.f, 1.f};
      int64_t vis[4];
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t row = r + i;
        const int64_t visible = std::min(nk, first_pos + row / G - k0 + 1);  // keys k0 .. k0 + visible - 1
        vis[i] = std::max<int64_t>(visible, 0);
        if (visible <= 0) continue;
        float* sr = sb + i * KB;
        const int64_t nv = (visible + KT - 1) / KT;
        const v16 tail = splat(static_cast<float>(visible - (nv - 1) * KT));
        store16(sr + (nv - 1) * KT, lane < tail ? load16(sr + (nv - 1) * KT) : neg_inf);
        v16 vmax = load16(sr);
        for (int64_t u = 1; u < nv; ++u) {
          const v16 x = load16(sr + u * KT);
          vmax = vmax > x ? vmax : x;
        }
        const float mx = std::max(m[row], hmax(vmax));
        alpha[i] = fast_exp(m[row] - mx);  // the first block: exp(-inf) -> ~1e-38, times zeros
        m[row] = mx;
        v16 vsum{};
        for (int64_t u = 0; u < nv; ++u) {
          float* su = sr + u * KT;
#if defined(__AVX512F__)  // (fast_exp16: fast_exp's bits, the weights summed from the register, not reloaded)
          v16 e = reinterpret_cast<v16>(rl_engine_cpu::fast_exp16(reinterpret_cast<__m512>(load16(su) - splat(mx))));
#else
#pragma omp simd
          for (int t = 0; t < KT; ++t) su[t] = fast_exp(su[t] - mx);
          v16 e = load16(su);
#endif
          if (u == nv - 1) e = lane < tail ? e : v16{};
          store16(su, e);
          vsum += e;
        }
        l[row] = l[row] * alpha[i] + hsum(vsum);
      }
      // P.V: each row's accumulator a = a * alpha + sum over its visible keys t, in key order, of p_t * v_t (16
      // lanes at a time). Four rows by two vectors of 16 columns at once: eight independent sums, so the fma
      // chain's latency is hidden (a row at a time ran one chain, four where the head dim is a multiple of 64), each
      // row's sums in the same order. With QT 32, against the kernel before (generate.py's 64 prompts of 16-128
      // tokens, fp32, 1 thread, alternated in one process through the lock at load ~1.3, two input draws): 8 / 2
      // heads of 32 7.5 -> 5.6 and 7.7 -> 4.6 ms a call (QT 16: 6.0, 6.1), of 64 10.4 -> 8.2-8.5 and 9.3 -> 7.2 (QT 16:
      // 10.2, 9.1); at 2 threads pair ratios 0.78-0.94 (32) and 0.92-0.95 (64) (QT 16: 0.77-0.79, 0.97-0.98).
      if (nr == 4) {
        const int64_t common = std::min(std::min(vis[0], vis[1]), std::min(vis[2], vis[3]));
        float* a0r = acc + r * Vp;
        for (int64_t c = 0; c < Vp; c += 32) {
          if (c + 32 <= Vp) {
            v16 x0 = load16(a0r + c) * alpha[0], y0 = load16(a0r + c + 16) * alpha[0];
            v16 x1 = load16(a0r + Vp + c) * alpha[1], y1 = load16(a0r + Vp + c + 16) * alpha[1];
            v16 x2 = load16(a0r + 2 * Vp + c) * alpha[2], y2 = load16(a0r + 2 * Vp + c + 16) * alpha[2];
            v16 x3 = load16(a0r + 3 * Vp + c) * alpha[3], y3 = load16(a0r + 3 * Vp + c + 16) * alpha[3];
            for (int64_t t = 0; t < common; ++t) {
              const v16 va = load16(vt + t * Vp + c), vb = load16(vt + t * Vp + c + 16);
              const float p0 = sb[t], p1 = sb[KB + t], p2 = sb[2 * KB + t], p3 = sb[3 * KB + t];
              x0 += p0 * va, y0 += p0 * vb, x1 += p1 * va, y1 += p1 * vb;
              x2 += p2 * va, y2 += p2 * vb, x3 += p3 * va, y3 += p3 * vb;
            }
            v16* xs[4] = {&x0, &x1, &x2, &x3};
            v16* ys[4] = {&y0, &y1, &y2, &y3};
            for (int64_t i = 0; i < 4; ++i) {  // the rows that see more keys than the least of the four
              v16 x = *xs[i], y = *ys[i];
              for (int64_t t = common; t < vis[i]; ++t) {
                const float pt = sb[i * KB + t];
                x += pt * load16(vt + t * Vp + c), y += pt * load16(vt + t * Vp + c + 16);
              }
              if (vis[i] > 0) store16(a0r + i * Vp + c, x), store16(a0r + i * Vp + c + 16, y);
            }
          } else {  // a last 16 columns
            v16 x[4];
            for (int64_t i = 0; i < 4; ++i) x[i] = load16(a0r + i * Vp + c) * alpha[i];
            for (int64_t t = 0; t < common; ++t) {
              const v16 va = load16(vt + t * Vp + c);
              x[0] += sb[t] * va, x[1] += sb[KB + t] * va, x[2] += sb[2 * KB + t] * va, x[3] += sb[3 * KB + t] * va;
            }
            for (int64_t i = 0; i < 4; ++i) {
              for (int64_t t = common; t < vis[i]; ++t) x[i] += sb[i * KB + t] * load16(vt + t * Vp + c);
              if (vis[i] > 0) store16(a0r + i * Vp + c, x[i]);
            }
          }
        }
        continue;
      }
      for (int64_t i = 0; i < nr; ++i) {  // fewer than four rows: one row at a time
        if (vis[i] <= 0) continue;
        const int64_t row = r + i, visible = vis[i];
        const float* sr = sb + i * KB;
        float* ar = acc + row * Vp;
        for (int64_t c = 0; c < Vp; c += 16) {
          v16 a = load16(ar + c) * alpha[i];
          for (int64_t t = 0; t < visible; ++t) a += sr[t] * load16(vt + t * Vp + c);
          store16(ar + c, a);
        }
      }
    }
  }
  for (int64_t j = 0; j < nq; ++j)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = j * G + g;
      const float inv = 1.f / l[r];
      T* o = out + j * os0 + (h * G + g) * os1;
      for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<T>(acc[r * Vp + d] * inv);
    }
}

// q [N, Hq, D] (last dim contiguous): chunk i's queries are rows cu_seqlens_q[i] .. cu_seqlens_q[i + 1] - 1, the
// last ones of its context_lens[i] tokens, whose keys / values are k_cache / v_cache [num_blocks, block_size, Hkv,
// D] through block_tables[i] (int32 [chunks, max_blocks]). Rows past cu_seqlens_q[-1] get zeros.
torch::Tensor paged_prefill(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                            const torch::Tensor& block_tables, const torch::Tensor& cu_seqlens_q,
                            const torch::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 3 && q.stride(2) == 1,
              "q must be a CPU [tokens, heads, head_dim] tensor with a contiguous last dim, got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "k_cache / v_cache must be contiguous [num_blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "q, k_cache and v_cache must share a dtype");
  const int64_t Hkv = k_cache.size(2), Hq = q.size(1), D = q.size(2), Dv = v_cache.size(3);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "query heads (", Hq, ") must be a multiple of kv heads (", Hkv, ")");
  TORCH_CHECK(k_cache.size(3) == D && v_cache.size(2) == Hkv && v_cache.size(0) == k_cache.size(0) &&
              v_cache.size(1) == k_cache.size(1), "k_cache / v_cache shapes do not match q");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.stride(1) == 1,
              "block_tables: int32 [chunks, max_blocks]");
  const int64_t C = block_tables.size(0);
  TORCH_CHECK(cu_seqlens_q.scalar_type() == at::kInt && cu_seqlens_q.is_contiguous() && cu_seqlens_q.numel() == C + 1,
              "cu_seqlens_q: int32 [chunks + 1]");
  TORCH_CHECK(context_lens.scalar_type() == at::kInt && context_lens.is_contiguous() && context_lens.numel() == C,
              "context_lens: int32 [chunks]");
  const int32_t* cu = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int64_t N = q.size(0);
  TORCH_CHECK(cu[0] == 0 && cu[C] <= N, "cu_seqlens_q must start at 0 and end at most at q's ", N, " rows");
  // tasks: (chunk, query tile), times the kv heads
  std::vector<int64_t> tile_chunk, tile_start;
  for (int64_t i = 0; i < C; ++i) {
    const int64_t n = cu[i + 1] - cu[i];
    TORCH_CHECK(n >= 0 && lens[i] >= n, "chunk ", i, ": ", n, " queries need a context of at least as many tokens, "
                "got ", lens[i]);
    for (int64_t a = 0; a < n; a += QT) {
      tile_chunk.push_back(i);
      tile_start.push_back(a);
    }
  }
  auto out = torch::empty({N, Hq, Dv}, q.options());
  if (cu[C] < N) out.narrow(0, cu[C], N - cu[C]).zero_();
  const int64_t tasks = static_cast<int64_t>(tile_chunk.size()) * Hkv, G = Hq / Hkv;
  const int64_t bs = k_cache.size(1), num_blocks = k_cache.size(0), width = block_tables.size(1);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t tab_s = block_tables.stride(0);
  std::atomic<bool> bad{false};
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* qp = q.data_ptr<T>();
    const T* kc = k_cache.data_ptr<T>();
    const T* vc = v_cache.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const int64_t qs0 = q.stride(0), qs1 = q.stride(1), os0 = out.stride(0), os1 = out.stride(1);
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t tile = task / Hkv, h = task % Hkv, i = tile_chunk[tile], a = tile_start[tile];
        const int64_t n = cu[i + 1] - cu[i], nq = std::min(QT, n - a);
        const int64_t first_pos = lens[i] - n + a, row = cu[i] + a;
        attend_tile<T>(qp + row * qs0, qs0, qs1, kc, vc, tables + i * tab_s, width, num_blocks, bs, Hkv, h, G, D, Dv,
                       first_pos, nq, static_cast<float>(scale), op + row * os0, os0, os1, buf, bad);
      }
    });
  };
  switch (q.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK(false, "paged prefill attention: dtype ", q.scalar_type(), " is not fp32, bf16 or fp16");
  }
  TORCH_CHECK(!bad, "paged prefill attention: a block table entry within a chunk's context is outside the block "
              "table / the cache's ", num_blocks, " blocks");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_prefill", &paged_prefill, "causal attention of every prefill chunk over its keys in the paged cache");
}
