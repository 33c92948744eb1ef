"""Host offload of a frozen model (`ref.offload: cpu`, `distill.offload: cpu`): between uses its weights
hold no device storage; in use they score exactly as the resident model does; the single-process and
trainer-group runs with an offloaded reference equal the runs without it."""

import copy

import pytest
import torch

from rl_engine.config import ConfigError, load_config
from rl_engine.policy import ModelConfig
from rl_engine.policy.model import CausalLM
from rl_engine.policy.offload import HostOffload
from rl_engine.train_config import RLConfig


def _model() -> CausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, tie_word_embeddings=True)
    return CausalLM(cfg).requires_grad_(False)


def _logits(model: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    h = model.hidden_states(ids, positions=torch.arange(len(ids)), cu_seqlens=torch.tensor([0, len(ids)]))
    return model.compute_logits(h)


def test_offloaded_weights_hold_no_device_storage_between_uses_and_score_the_same():
    model = _model()
    resident = copy.deepcopy(model)
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    offload = HostOffload(model, device="cpu")
    assert offload.resident_bytes == 0 and all(p.numel() == 0 for p in model.parameters())
    ids = torch.randint(0, 64, (11,))
    for _ in range(2):  # and again: the host copies survive a use
        with offload.in_use():
            assert offload.resident_bytes >= before
            assert torch.equal(_logits(model, ids), _logits(resident, ids))
        assert offload.resident_bytes == 0
    assert len(offload.tensors) == len({id(t) for t in [*model.parameters(), *model.buffers()]})  # tied: once


def test_write_back_keeps_a_load_state_dict():
    model, other = _model(), _model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    offload = HostOffload(model, device="cpu")
    with offload.in_use(write_back=True):
        model.load_state_dict(other.state_dict())
    with offload.in_use():
        for (name, p), q in zip(model.named_parameters(), other.parameters()):
            assert torch.equal(p, q), name


def test_offload_key_is_validated():
    with pytest.raises(ConfigError, match="ref.offload"):
        load_config(RLConfig, None, ["ref.offload=gpu"])
