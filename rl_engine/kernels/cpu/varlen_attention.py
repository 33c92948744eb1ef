"""Packed causal attention for the training forward on CPU (`csrc/varlen_attention.cpp`): forward and backward.

The registry's "cpu" implementations of `varlen_causal_attention` (each sequence attends causally to itself)
and `shared_prefix_attention` (a segment may also attend in full to its prompt's keys: a GRPO group's
completions to their shared prompt). Sequences of a training micro-batch are short (a prompt, a completion),
so the torch path spends its time on padding, masks and glue around one masked SDPA call, or on one call per
sequence; this kernel takes the packed rows in place and computes each (segment, KV head) as a tile in cache,
over torch's intra-op threads (see the C++ file for the algorithm). An autograd Function wraps it: the forward
saves the log-sum-exp of each (row, head), the backward recomputes the probabilities from it.

fp32 and bf16 (q, k and v of one dtype): every product and sum in fp32, the output and the gradients rounded once
to the inputs' dtype (the backward's rowsum(dO * O) reads the output as stored: bf16 for bf16 inputs, as
FlashAttention's does). Other dtypes, non-CPU tensors and traced calls (torch.compile) run the torch reference,
as does every call when the extension cannot be built (no compiler, a failed build, `RL_ENGINE_CPU_KERNELS=0`; the
reason is logged once). fp32 results equal torch's SDPA up to fp32 summation order and the kernel's exp (within
~2 ulp); bf16 results are within the bound of those roundings of the float64 attention of the same bf16 inputs:
tests/kernels/test_cpu_varlen_attention.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from rl_engine.kernels import cpu, reference


SOURCE = Path(__file__).parent / "csrc" / "varlen_attention.cpp"
_NO_PREFIX = torch.empty(0, dtype=torch.int64)
_DTYPES = (torch.float32, torch.bfloat16)


kernel = cpu.source_kernel(SOURCE, "packed training attention")


class _PackedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, prefix_of, scale):
        o, lse = kernel().forward(q, k, v, cu_seqlens, prefix_of, scale)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, prefix_of)
        ctx.scale = scale
        return o

    @staticmethod
    @once_differentiable  # the C++ gradients carry no graph: a double backward is refused, not silently wrong
    def backward(ctx, grad_out):
        q, k, v, o, lse, cu_seqlens, prefix_of = ctx.saved_tensors
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        dq, dk, dv = kernel().backward(grad_out, q, k, v, o, lse, cu_seqlens, prefix_of, ctx.scale)
        return dq, dk, dv, None, None, None


def _takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel runs these inputs (else the torch reference)."""
    return (q.dtype in _DTYPES
            and all(x.dtype == q.dtype and x.device.type == "cpu" and x.dim() == 3 for x in (q, k, v))
            and not torch.compiler.is_compiling() and kernel() is not None)


def _row_view(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _bounds(cu_seqlens: torch.Tensor | list[int]) -> torch.Tensor:
    if isinstance(cu_seqlens, torch.Tensor):
        return cu_seqlens.detach().to(device="cpu", dtype=torch.int64)
    return torch.tensor(list(cu_seqlens), dtype=torch.int64)


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | list[int],
                            scale: float) -> torch.Tensor:
    """The reference's contract (`reference.varlen_causal_attention`)."""
    if not _takes(q, k, v):
        return reference.varlen_causal_attention(q, k, v, cu_seqlens, scale)
    return _PackedAttention.apply(_row_view(q), _row_view(k), _row_view(v), _bounds(cu_seqlens), _NO_PREFIX,
                                  float(scale))


def shared_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            prefix_of: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference's contract (`reference.shared_prefix_attention`)."""
    if not _takes(q, k, v):
        return reference.shared_prefix_attention(q, k, v, cu_seqlens, prefix_of, scale)
    return _PackedAttention.apply(_row_view(q), _row_view(k), _row_view(v), _bounds(cu_seqlens),
                                  prefix_of.detach().to(device="cpu", dtype=torch.int64), float(scale))
