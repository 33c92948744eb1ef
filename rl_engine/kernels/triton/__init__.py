"""Triton kernels, each a drop-in for its torch reference in `rl_engine.kernels.reference`.

The registry imports this package only when `backends` says Triton can run (a CUDA device, or the
Triton interpreter on CPU tensors). Triton decides interpreter mode when a kernel is decorated, so
`INTERPRETED` records the mode this package was built in; `backends.triton_interpreter_active`
reads it. All kernels compute in fp32 and load/store the tensors' own dtypes.

Verified only in the Triton interpreter on CPU (tests/kernels, against the torch references): the
compiled GPU path has not run in this repository's CI (no GPU there), so GPU correctness and speed
are unverified until `TRITON_INTERPRET=0 pytest tests/kernels` runs on a CUDA machine.
"""

from triton import knobs

INTERPRETED: bool = bool(knobs.runtime.interpret)

from rl_engine.kernels.triton import (  # noqa: E402  (after INTERPRETED: decoration reads the mode)
    logprob,
    moe_permute,
    paged_attention,
    rms_norm,
    rotary,
    swiglu,
)

__all__ = ["INTERPRETED", "logprob", "moe_permute", "paged_attention", "rms_norm", "rotary", "swiglu"]
