"""Transformer Engine adapter: config validation and the torch builds on CPU; TE modules on CUDA."""

from __future__ import annotations

import pytest
import torch

from rl_engine.kernels import modules, reference, registry
from rl_engine.kernels.te_adapter import Fp8Config, check_fp8_shapes

needs_te = pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="Transformer Engine needs CUDA (unverified on CPU)")


def test_fp8_config_validation():
    Fp8Config()
    Fp8Config(recipe="current", format="e4m3")
    with pytest.raises(ValueError, match="recipe"):
        Fp8Config(recipe="mx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="amax_history_len"):
        Fp8Config(amax_history_len=0)


def test_fp8_shapes_must_be_multiples_of_16():
    check_fp8_shapes(32, 64)
    with pytest.raises(ValueError, match="out_features \\(40\\)"):
        check_fp8_shapes(32, 40)


def test_torch_builds_resolved_on_cpu():
    make_linear = registry.resolve("linear", "cpu")
    linear = make_linear(8, 4, bias=True)
    assert isinstance(linear, torch.nn.Linear) and linear.weight.shape == (4, 8)
    with pytest.raises(ValueError, match="transformer_engine"):
        make_linear(8, 4, fp8=Fp8Config())
    make_norm_linear = registry.resolve("rms_norm_linear", "cpu")
    block = make_norm_linear(8, 4, eps=1e-6)
    x = torch.randn(3, 8)
    normed, _ = reference.rms_norm(x, block.norm_weight, 1e-6)
    torch.testing.assert_close(block(x), normed @ block.weight.t())
    assert isinstance(block, modules.RMSNormLinear)


@pytest.mark.cuda
@needs_te
def test_te_linear_matches_torch():
    pytest.importorskip("transformer_engine.pytorch", reason="transformer_engine is not installed")
    from rl_engine.kernels.te_adapter import TELinear

    layer = TELinear(64, 32, params_dtype=torch.float32, device="cuda")
    x = torch.randn(16, 64, device="cuda")
    torch.testing.assert_close(layer(x), x @ layer.weight.t(), atol=1e-2, rtol=1e-2)


@pytest.mark.cuda
@needs_te
def test_te_rms_norm_linear_fp8_runs():
    pytest.importorskip("transformer_engine.pytorch", reason="transformer_engine is not installed")
    from rl_engine.kernels.te_adapter import TERMSNormLinear

    layer = TERMSNormLinear(64, 32, eps=1e-6, params_dtype=torch.bfloat16, device="cuda",
                            fp8=Fp8Config())
    x = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    normed, _ = reference.rms_norm(x, layer.norm_weight, 1e-6)
    torch.testing.assert_close(layer(x).float(), (normed @ layer.weight.t()).float(), atol=0.25, rtol=0.1)
