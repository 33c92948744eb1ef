"""The engine's prefill attention on CPU (`csrc/prefill_attention.cpp`): the registry's `paged_prefill_attention`.

Every prefill chunk of a step in one call, keys and values read in place in the paged cache. The kernel is tiled
(16 query positions x the GQA group's heads against key tiles of 16, each key tile widened and transposed once
for all of them, online softmax in fp32): at a 64-prompt 40M prefill it replaced the per-query batch-invariant
kernel (`csrc/invariant_attention.cpp`, which sums every score across vector lanes). `kernels/cpu/ops.py`'s
`paged_prefill_attention` calls it, and runs the torch reference where it does not build.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

from rl_engine.kernels import cpu

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "prefill_attention.cpp"


@functools.cache
def kernel() -> ModuleType | None:
    """The built extension, or None (its reason logged once) when it cannot be built."""
    module, reason = cpu.load_source(SOURCE)
    if module is None:
        logger.warning("paged prefill attention: the tiled C++ kernel is unavailable (%s); using the torch reference",
                       reason)
    return module
