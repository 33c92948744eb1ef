"""Top-k / top-p sampling: the torch reference's truncation, and the FlashInfer path on CUDA."""

from __future__ import annotations

import pytest
import torch

from rl_engine.kernels import reference


def _draw(probs, top_k, top_p, n=400, seed=0):
    gen = torch.Generator(device=probs.device).manual_seed(seed)
    return torch.stack([reference.top_k_top_p_sampling(probs, top_k, top_p, generator=gen)
                        for _ in range(n)])


def test_top_k_limits_support():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    samples = _draw(probs, torch.tensor([2]), torch.tensor([1.0]))
    assert set(samples.unique().tolist()) == {1, 3}


def test_top_p_limits_support_and_keeps_the_top_token():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.1, 0.4, 0.2, 0.3]])
    samples = _draw(probs, 0, torch.tensor([0.65, 1e-6]))
    assert set(samples[:, 0].unique().tolist()) == {1, 3}  # 0.4 + 0.3 >= 0.65
    assert set(samples[:, 1].unique().tolist()) == {1}  # the most likely token always survives


def test_no_truncation_samples_the_distribution():
    probs = torch.tensor([[0.5, 0.25, 0.25]])
    samples = _draw(probs, 0, 1.0, n=4000)
    freq = torch.bincount(samples[:, 0], minlength=3).float() / 4000
    torch.testing.assert_close(freq, probs[0], atol=0.04, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashInfer sampling needs CUDA")
def test_flashinfer_sampling_support_matches_reference():
    pytest.importorskip("flashinfer", reason="flashinfer is not installed")
    from rl_engine.kernels.flashinfer_adapter import top_k_top_p_sampling

    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3]], device="cuda").expand(64, 4).contiguous()
    samples = top_k_top_p_sampling(probs, 2, 1.0)
    assert set(samples.unique().tolist()) <= {1, 3}
