"""The engine's prefill attention on CPU (`csrc/prefill_attention.cpp`): the registry's `paged_prefill_attention`.

Every prefill chunk of a step in one call, keys and values read in place in the paged cache. The kernel is tiled
(32 query positions x the GQA group's heads against key tiles of 16, each key tile widened and transposed once
for all of them, online softmax in fp32): at a 64-prompt 40M prefill it replaced the per-query batch-invariant
kernel (`csrc/invariant_attention.cpp`, which sums every score across vector lanes). `kernels/cpu/ops.py`'s
`paged_prefill_attention` calls it, and runs the torch reference where it does not build.
"""

from __future__ import annotations

from pathlib import Path

from rl_engine.kernels import cpu


SOURCE = Path(__file__).parent / "csrc" / "prefill_attention.cpp"


kernel = cpu.source_kernel(SOURCE, "paged prefill attention (tiled)")
