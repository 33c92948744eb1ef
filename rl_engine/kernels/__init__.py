"""The hot ops. Callers use these names; which implementation runs is the backend's business."""

from rl_engine.kernels.reference import (
    apply_rotary,
    rms_norm,
    rotary_cos_sin,
    silu_and_mul,
    varlen_causal_attention,
)

__all__ = ["apply_rotary", "rms_norm", "rotary_cos_sin", "silu_and_mul", "varlen_causal_attention"]
