// The row kernels' shared pieces (train_elementwise.cpp, bf16_rms_norm.cpp): how many rows a thread takes, and the
// check of a [rows, width] argument. A header included by name, so each source still builds alone (a failed build of
// one leaves the other's kernels running); kernels/cpu/__init__.py's extension_name hashes every header of csrc/ into
// each build's cache name, so editing this rebuilds them.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

namespace rl_engine_cpu {

// rows a thread takes at least: ~16k elements of work, so a small batch (a decode-sized call) runs on one thread
inline int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

// t is a CPU tensor of `dtype` with `dim` dims whose last dim is contiguous: rows at any row stride, as
// kernels/cpu/train_elementwise.as_rows passes them (a last dim of one element is never stepped along: any stride).
inline void check_rows(const torch::Tensor& t, const char* name, int64_t dim, at::ScalarType dtype = at::kFloat) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype, name, " must be a CPU ",
              dtype == at::kFloat ? "fp32" : (dtype == at::kBFloat16 ? "bf16" : c10::toString(dtype)),
              " tensor, got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got shape ", t.sizes());
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name, ": the last dim must be contiguous, got strides ",
              t.strides());
}

}  // namespace rl_engine_cpu
