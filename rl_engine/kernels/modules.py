"""Torch module factories for the `linear` and `rms_norm_linear` registry ops.

These are the default (and CPU) builds; `te_adapter` provides the Transformer Engine builds with
the same factory signature. A parallel layer of the policy calls the factory chosen by the registry
for its local shard (sizes are per rank; communication stays in the parallel layer).
"""

from __future__ import annotations

import torch
from torch import nn

from rl_engine.kernels import registry
from rl_engine.kernels.grad_mode import training_kernels


class RMSNormLinear(nn.Module):
    """linear(rms_norm(x)): `norm_weight` [in_features], `linear.weight` [out, in].

    Its norm picks as `policy.layers.RMSNorm` does: `rms_norm_train` in the trainer's passes
    (`grad_mode.training_kernels`), `rms_norm` in the engine's, so a trainer's recorded and no-grad passes run one
    kernel (`grad_mode.trainer_pass`'s bit-equality)."""

    def __init__(self, in_features: int, out_features: int, *, eps: float, bias: bool,
                 params_dtype: torch.dtype | None, device: torch.device | str | None) -> None:
        super().__init__()
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.ones(in_features, dtype=params_dtype, device=device))
        self.linear = nn.Linear(in_features, out_features, bias=bias, dtype=params_dtype, device=device)
        # chosen once at build time, for the device the parameters live on
        self._rms_norm = registry.resolve("rms_norm", self.norm_weight.device)
        self._rms_norm_train = registry.resolve("rms_norm_train", self.norm_weight.device)

    @property
    def weight(self) -> nn.Parameter:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms_norm = self._rms_norm_train if training_kernels() else self._rms_norm
        normed, _ = rms_norm(x, self.norm_weight, self.eps)
        return self.linear(normed)


def make_linear(in_features: int, out_features: int, *, bias: bool = False,
                params_dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                fp8: object | None = None) -> nn.Module:
    """A plain `nn.Linear`; `fp8` must be None (FP8 needs the transformer_engine backend)."""
    if fp8 is not None:
        raise ValueError("fp8 linears need the transformer_engine backend: override"
                         " linear=transformer_engine (CUDA only)")
    return nn.Linear(in_features, out_features, bias=bias, dtype=params_dtype, device=device)


def make_rms_norm_linear(in_features: int, out_features: int, *, eps: float, bias: bool = False,
                         params_dtype: torch.dtype | None = None,
                         device: torch.device | str | None = None,
                         fp8: object | None = None) -> nn.Module:
    """An `RMSNormLinear`; `fp8` must be None (FP8 needs the transformer_engine backend)."""
    if fp8 is not None:
        raise ValueError("fp8 linears need the transformer_engine backend: override"
                         " rms_norm_linear=transformer_engine (CUDA only)")
    return RMSNormLinear(in_features, out_features, eps=eps, bias=bias, params_dtype=params_dtype,
                         device=device)
