"""Small-M GEMM on panel-packed weights (`csrc/small_gemm.cpp`): y = x W^T (+ bias) (+ residual), made for the
2..64-row products of batched decode steps (the engine's fp32 products of 2+ rows read it, prefill's included).

The weight is packed once into panels of `panel` output columns, each [K][panel] contiguous, and an
AVX-512 micro-kernel keeps a `row_block` x `panel` tile of fp32 accumulators in registers (broadcast x,
FMA over the panel's k-th row). Every output accumulates its K products in order (k = 0..K-1, one fp32 FMA
each), then adds the bias and the residual: the result of a row does not depend on the other rows, the row
block or the thread count (batch-invariant by construction). bf16 panels hold k in pairs for avx512_bf16's
dot product (twice the fp32 FMA's work an instruction): each pair's two exact products join the fp32 sum one
after the other, then one rounding to bf16 (without avx512_bf16: the widened products in order). Threads
(torch's intra-op pool) split the panels.

`python benchmarks/small_gemm.py --threads T [--dtype bfloat16]` through the team's lock (2-core AMD EPYC,
Zen 4 AVX-512, 64 rows, one decode step's linears, load 3.6-4.3), best panel x row block against
oneDNN-prepacked: fp32 1 thread 1.12x on the ~3.5M, ~40M and ~50M models (~105-109 GFLOP/s a
core, near the FMA peak; oneDNN ~95-98), 2 threads 1.13-1.20x; bf16 1 thread 1.01-1.06x, 2 threads
0.99-1.07x. Panels of 48 (`PANEL`) x 8 rows measured best or level at 2-2048 rows (1 thread, load ~2-3.5).
The engine's fp32 linears of 2+ rows read it where its AVX-512 micro-kernel is compiled in (the extension's
`has_avx512()`; `packed_linear.py`, where the figures in the engine are): the panels are then the weight's one
packed copy. bf16, and builds without AVX-512 (the portable loop, one row at a time, is slower than oneDNN), stay
on oneDNN.

`greedy_screen` (C++; Python: `packed_linear.greedy_pick`): each row's first maximum of an fp32 product without
every logit, for the engine's all-greedy decode steps without log-probs (the LM head): the bf16 product of x and
the weight rounded to bf16 (fp32 outputs) with a proven error bound per logit screens the vocabulary, and the few
candidates' logits are computed as this kernel's lane computes them (one fma chain over k in order), so the ids
are argmax_rows' of `linear`'s logits. The bf16 product by AMX tiles (TDPBF16PS; `amx_pack`, `has_amx`: AMX-BF16
compiled in by -march=native and the tile state permitted by the kernel) where the CPU has them, else by the
VDPBF16PS panels; `screen_estimates` gives the estimates either way (for the tests). 1 thread, [64 x 256] x
[256 x 2048] (the ~3.5M model's head): on an AVX-512 CPU without AMX (session 22) 354 us against 598 for the fp32
product + argmax_rows (load ~1.6); on an Intel Xeon with AMX (session 25) 754 us by the panels, 132 by AMX, against
446 (`packed_linear.screen_pays` measures which pays per process).

Log-prob contract (the reason RL engines keep prepacked linears off): on the ~40M model (3 x 64 tokens,
sampled targets, every linear swapped, niced), log-probs moved from F.linear's by up to 1.62e-5 with this
kernel and 1.34e-5 with oneDNN's: a sequential sum is no closer to MKL's blocked order than oneDNN's is.
Only the same kernel on both sides (this one's rows do not depend on the batch) would meet the 1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rl_engine.kernels import cpu

SOURCE = Path(__file__).parent / "csrc" / "small_gemm.cpp"
PANEL = 48  # output columns a panel (16, 32, 48 or 64)
ROW_BLOCK = 8  # rows of a register tile (row_block * panel / 16 accumulators, at most 28)
MIN_MACS_PER_THREAD = 1 << 17  # smaller products stay on fewer threads (a parallel region costs ~us)


def available() -> tuple[bool, str]:
    """(usable, reason): the extension builds (a C++ compiler, `RL_ENGINE_CPU_KERNELS` not 0)."""
    return cpu.extension_status(SOURCE)


@dataclass(frozen=True, kw_only=True)
class PackedWeight:
    """A [out_features, in_features] weight in panels of `panel` columns (a 1-D tensor, same dtype)."""

    data: torch.Tensor
    out_features: int
    in_features: int
    panel: int


def pack(weight: torch.Tensor, *, panel: int = PANEL) -> PackedWeight:
    """Pack a 2-D CPU fp32/bf16 weight [N, K] (once; repack after the weight changes)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if panel not in (16, 32, 48, 64):
        raise ValueError(f"panel ({panel}) must be 16, 32, 48 or 64 columns")
    data = cpu.extension(SOURCE).pack(weight.detach(), panel)
    return PackedWeight(data=data, out_features=weight.shape[0], in_features=weight.shape[1], panel=panel)


def linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None, *,
           residual: torch.Tensor | None = None, row_block: int = ROW_BLOCK,
           min_macs_per_thread: int = MIN_MACS_PER_THREAD) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias [N]) (+ residual [..., N]) -> [..., N], W the packed weight (F.linear's
    contract up to fp32 summation order; `addmm(residual, x, W^T)` with a residual; in_features 0: the bias
    and the residual alone)."""
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x's last dim ({x.shape[-1]}) must equal the packed weight's in_features "
                         f"({weight.in_features})")
    if row_block * weight.panel // 16 > 28 or not 1 <= row_block <= 12:
        raise ValueError(f"row_block ({row_block}) must be in 1..12 with row_block * panel / 16 <= 28 "
                         f"(panel {weight.panel}): the accumulators must fit in the 32 vector registers")
    return cpu.extension(SOURCE).linear(x, weight.data, weight.out_features, weight.panel, row_block, bias,
                                        residual, min_macs_per_thread)
