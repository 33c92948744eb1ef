"""The registry's "cpu" implementations: thin wrappers over the C++ kernels of `csrc/cpu_ops.cpp`.

Signatures are the torch references' (`reference.py`). The C++ kernels have no backward, so a call
that autograd must record (grad mode on and an input that requires grad: the trainer's forward)
runs the torch reference instead, as does any input the kernels do not take (a dtype other than
fp32/bf16/fp16, mixed dtypes, a non-CPU tensor). Results equal the reference's up to fp32 summation
order (tests/kernels/test_cpu_ops.py).
"""

from __future__ import annotations

import torch

from rl_engine.kernels import op_inputs, reference
from rl_engine.kernels.cpu import extension

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _needs_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if (_needs_autograd(x, weight, residual) or x.dtype not in _DTYPES or weight.dtype != x.dtype
            or x.device.type != "cpu" or (residual is not None and residual.dtype != x.dtype)):
        return reference.rms_norm(x, weight, eps, residual)
    outs = extension().rms_norm(x.contiguous(), weight.contiguous(), eps,
                                None if residual is None else residual.contiguous())
    return outs[0], (outs[1] if residual is not None else None)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _needs_autograd(x) or x.dtype not in _DTYPES or x.device.type != "cpu":
        return reference.silu_and_mul(x)
    return extension().silu_and_mul(x.contiguous())


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           max_context_len: int | None = None) -> torch.Tensor:
    """The reference's contract; `max_context_len` (the longest of `context_lens`, when the caller
    knows it) saves reading it back from the tensor."""
    op_inputs.check_paged_decode(q, k_cache, v_cache, block_tables, context_lens)
    if (_needs_autograd(q) or q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype
            or q.device.type != "cpu"):
        return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    if max_context_len is None:
        max_context_len = int(context_lens.max()) if context_lens.numel() else 0
        if max_context_len:
            op_inputs.check_block_capacity(block_tables, context_lens, k_cache.shape[1])
    if q.stride(-1) != 1:
        q = q.contiguous()
    return extension().paged_decode_attention(
        q, k_cache.contiguous(), v_cache.contiguous(), block_tables.to(torch.int32),
        context_lens.to(torch.int32).contiguous(), scale, max_context_len)
