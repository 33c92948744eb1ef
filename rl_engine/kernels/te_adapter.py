"""Transformer Engine adapter: linear and RMSNorm+linear modules with optional FP8, by composition.

UNVERIFIED ON CPU: the modules and the recipe construction need CUDA and `transformer_engine` and
have never run in this repository's CI (no GPU there); only `Fp8Config` validation and
`check_fp8_shapes` are tested on CPU. Transformer Engine is imported through `backends` only.

Design: each module holds a TE module (`self.te`) instead of subclassing it, and exposes `weight`
(and `norm_weight`) so callers address parameters the same way as the torch builds; state-dict keys
carry the `te.` prefix (`te.weight`, `te.layer_norm_weight`), which checkpoint mapping must know.
The TE modules are built for one rank's local shard with no TE-side tensor parallelism: our
parallel layers own communication. With `fp8` set, each forward runs under TE's fp8 autocast with
the configured recipe; a model may instead build with fp8=None and wrap its whole forward in
`fp8_autocast(config)`, which is what TE recommends for fewer amax reductions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from rl_engine.kernels import backends

Fp8Recipe = Literal["delayed", "current"]
Fp8Format = Literal["hybrid", "e4m3"]


@dataclass(frozen=True, kw_only=True)
class Fp8Config:
    """FP8 recipe setting. `hybrid`: E4M3 forward, E5M2 gradients; `e4m3` for both.

    `recipe="delayed"` scales from an amax history (`amax_history_len`, `amax_compute_algo`);
    `"current"` scales from each tensor's current amax. `amax_group` reduces amaxes across ranks
    that must agree (the tensor-parallel group, usually).
    """

    recipe: Fp8Recipe = "delayed"
    format: Fp8Format = "hybrid"
    margin: int = 0
    amax_history_len: int = 1024
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    amax_group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if self.recipe not in ("delayed", "current"):
            raise ValueError(f"fp8 recipe {self.recipe!r} must be 'delayed' or 'current'")
        if self.format not in ("hybrid", "e4m3"):
            raise ValueError(f"fp8 format {self.format!r} must be 'hybrid' or 'e4m3'")
        if self.amax_compute_algo not in ("max", "most_recent"):
            raise ValueError(f"amax_compute_algo {self.amax_compute_algo!r} must be 'max' or 'most_recent'")
        if self.amax_history_len < 1 or self.margin < 0:
            raise ValueError(f"amax_history_len ({self.amax_history_len}) must be >= 1 and margin"
                             f" ({self.margin}) >= 0")


def check_fp8_shapes(in_features: int, out_features: int) -> None:
    """FP8 GEMMs in TE need both dims divisible by 16; raise a ValueError naming the bad one."""
    for name, size in (("in_features", in_features), ("out_features", out_features)):
        if size % 16:
            raise ValueError(f"fp8 linear: {name} ({size}) must be divisible by 16; pad it or"
                             " build this layer without fp8")


def make_fp8_recipe(config: Fp8Config) -> Any:
    """The TE recipe object for `config`. UNVERIFIED ON CPU."""
    recipe = backends.import_transformer_engine_recipe()
    fp8_format = recipe.Format.HYBRID if config.format == "hybrid" else recipe.Format.E4M3
    if config.recipe == "current":
        return recipe.Float8CurrentScaling(fp8_format=fp8_format)
    return recipe.DelayedScaling(margin=config.margin, fp8_format=fp8_format,
                                 amax_history_len=config.amax_history_len,
                                 amax_compute_algo=config.amax_compute_algo)


@contextlib.contextmanager
def fp8_autocast(config: Fp8Config | None) -> Iterator[None]:
    """Run the enclosed TE modules in FP8 with `config`'s recipe (no-op for None). UNVERIFIED ON CPU."""
    if config is None:
        yield
        return
    te = backends.import_transformer_engine()
    with te.fp8_autocast(enabled=True, fp8_recipe=make_fp8_recipe(config), fp8_group=config.amax_group):
        yield


class TELinear(nn.Module):
    """y = x W^T (+ b) through `transformer_engine.pytorch.Linear`. UNVERIFIED ON CPU."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 params_dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 fp8: Fp8Config | None = None) -> None:
        super().__init__()
        if fp8 is not None:
            check_fp8_shapes(in_features, out_features)
        te = backends.import_transformer_engine()
        self.fp8 = fp8
        self.te = te.Linear(in_features, out_features, bias=bias, params_dtype=params_dtype,
                            device=device if device is not None else "cuda")

    @property
    def weight(self) -> nn.Parameter:
        return self.te.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fp8_autocast(self.fp8):
            return self.te(x)


class TERMSNormLinear(nn.Module):
    """linear(rms_norm(x)) fused through `transformer_engine.pytorch.LayerNormLinear`.
    UNVERIFIED ON CPU."""

    def __init__(self, in_features: int, out_features: int, *, eps: float, bias: bool = False,
                 params_dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 fp8: Fp8Config | None = None) -> None:
        super().__init__()
        if fp8 is not None:
            check_fp8_shapes(in_features, out_features)
        te = backends.import_transformer_engine()
        self.fp8 = fp8
        self.te = te.LayerNormLinear(in_features, out_features, eps=eps, bias=bias,
                                     normalization="RMSNorm", params_dtype=params_dtype,
                                     device=device if device is not None else "cuda")

    @property
    def weight(self) -> nn.Parameter:
        return self.te.weight

    @property
    def norm_weight(self) -> nn.Parameter:
        return self.te.layer_norm_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fp8_autocast(self.fp8):
            return self.te(x)


def make_te_linear(in_features: int, out_features: int, *, bias: bool = False,
                   params_dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                   fp8: Fp8Config | None = None) -> nn.Module:
    """Factory of the `linear` op's transformer_engine backend (same signature as the torch one)."""
    return TELinear(in_features, out_features, bias=bias, params_dtype=params_dtype, device=device, fp8=fp8)


def make_te_rms_norm_linear(in_features: int, out_features: int, *, eps: float, bias: bool = False,
                            params_dtype: torch.dtype | None = None,
                            device: torch.device | str | None = None,
                            fp8: Fp8Config | None = None) -> nn.Module:
    """Factory of the `rms_norm_linear` op's transformer_engine backend."""
    return TERMSNormLinear(in_features, out_features, eps=eps, bias=bias, params_dtype=params_dtype,
                           device=device, fp8=fp8)
