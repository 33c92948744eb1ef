"""The inference engine's RMSNorm and SwiGLU on CPU: the registry's "cpu" `rms_norm` and `silu_and_mul`, the CPU
defaults (the forwards autograd does not record: the engine's eager steps, prefill and decode, and no-grad passes
outside `kernels.grad_mode.trainer_pass`).

fp32 takes the training kernels' forwards (`csrc/train_elementwise.cpp`, what the trainer's recorded pass runs), so
the engine's norms and SwiGLU round as the trainer's do; bf16 RMSNorm takes `csrc/bf16_rms_norm.cpp`. Each is one
pass over a row where torch takes ~6-7 elementwise passes (RMSNorm) or two (SwiGLU) with their dispatches and
allocations. Per call at generate.py's shapes (1 thread, interleaved, /tmp/pfel_micro2.py): RMSNorm with residual
fp32 ~2-5x faster at 1-256 rows, ~1.5x at 1,500; bf16 1.2-7x; SwiGLU fp32 level at 64-256 rows, 1.1-1.4x at 1,500,
~3-4x at 1 row. bf16 SwiGLU stays torch's (a one-pass C++ SwiGLU measured 0.46-0.71x of torch's silu then mul_).

Everything else runs the torch reference: other dtypes, inputs that need a gradient, traced calls (the compiled
decode step: inductor fuses the reference), non-CPU tensors, and every call when an extension cannot be built (no
compiler, a failed build, `RL_ENGINE_CPU_KERNELS=0`; the reason is logged once). A row's result depends on that
row alone (threads split rows, never a row), whatever the batch. Numerics (tests/kernels/
test_cpu_engine_elementwise.py): fp32 as the training kernels (RMSNorm within a few ulp of the reference, another
summation order; SwiGLU within fast_exp's ~2 ulp); bf16 RMSNorm rounds where the reference rounds, from fp32 values
within a few fp32 ulp of the reference's, so outputs equal the reference's or sit one or two bf16 ulps from it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rl_engine.kernels import cpu, reference
from rl_engine.kernels.cpu import train_elementwise
from rl_engine.kernels.cpu.train_elementwise import as_rows  # the [rows, last dim] view of both sources' kernels
from rl_engine.kernels.grad_mode import records_autograd

SOURCE = Path(__file__).parent / "csrc" / "bf16_rms_norm.cpp"

bf16_kernel = cpu.source_kernel(SOURCE, "the engine's bf16 RMSNorm")


def _plain(*tensors: torch.Tensor | None) -> bool:
    """CPU tensors no gradient flows through, outside a trace."""
    return (all(t is None or t.device.type == "cpu" for t in tensors)
            and not records_autograd(*tensors)
            and not torch.compiler.is_compiling())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`reference.rms_norm`'s contract."""
    dtype = x.dtype
    if (dtype not in (torch.float32, torch.bfloat16) or weight.dtype != dtype or weight.shape != x.shape[-1:]
            or (residual is not None and (residual.dtype != dtype or residual.shape != x.shape))
            or x.numel() == 0 or not _plain(x, weight, residual)):
        return reference.rms_norm(x, weight, eps, residual)
    if dtype == torch.bfloat16:
        kernel = bf16_kernel()
        if kernel is None:
            return reference.rms_norm(x, weight, eps, residual)
        out, total = kernel.rms_norm(as_rows(x), weight.contiguous(), float(eps),
                                     None if residual is None else as_rows(residual))
        return out.view(x.shape), (None if residual is None else total.view(x.shape))
    kernel = train_elementwise.kernel()
    if kernel is None:
        return reference.rms_norm(x, weight, eps, residual)
    out, total, _ = kernel.rms_norm_forward(as_rows(x), weight.contiguous(), float(eps),
                                            None if residual is None else as_rows(residual))
    return out.view(x.shape), (None if residual is None else total.view(x.shape))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`reference.silu_and_mul`'s contract."""
    if x.dtype != torch.float32 or x.numel() == 0 or x.shape[-1] % 2 or not _plain(x):
        return reference.silu_and_mul(x)
    kernel = train_elementwise.kernel()
    if kernel is None:
        return reference.silu_and_mul(x)
    return kernel.silu_and_mul_forward(as_rows(x)).view(*x.shape[:-1], x.shape[-1] // 2)
