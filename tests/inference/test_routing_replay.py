"""MoE routing replay: the engine returns the experts it chose for every processed token, and they
are the experts the trainer picks for the same sequence."""

from __future__ import annotations

import pytest
import torch

from inference_helpers import PARITY_OVERRIDES, mixed_prompts
from rl_engine import LLM, SamplingParams
from rl_engine.policy import RoutingRecord, from_pretrained


def test_recorded_routing_matches_trainer_routing(checkpoints):
    _, path = checkpoints.get("qwen3_moe", **PARITY_OVERRIDES["qwen3_moe"])
    model = from_pretrained(path, dtype=torch.float32)
    llm = LLM(model, record_routing=True, block_size=4, num_kv_blocks=30, max_num_batched_tokens=32)
    prompts = mixed_prompts(6, seed=40, max_len=40)
    outs = llm.generate(prompts, SamplingParams(temperature=1.0, n=2, max_tokens=10, seed=2, ignore_eos=True))
    assert llm.engine.stats()["preemptions"] > 0  # recomputed tokens replace their routing
    moe_layers = sorted(model.config.moe_layers)
    for prompt, out in zip(prompts, outs):
        for c in out.outputs:
            seq = prompt + c.token_ids[:-1]  # the last token was sampled, never fed
            routing = RoutingRecord(mode="record")
            with torch.no_grad():
                model.hidden_states(torch.tensor(seq), positions=torch.arange(len(seq)), routing=routing)
            expected = torch.stack([routing.topk_ids[layer] for layer in moe_layers], dim=1)  # [T, L, k]
            got = torch.tensor(c.routed_experts)
            assert got.shape == expected.shape
            # top-k order may differ for equal weights; compare the chosen sets
            assert torch.equal(got.sort(-1).values, expected.sort(-1).values)


def test_record_routing_needs_moe(qwen2):
    with pytest.raises(ValueError, match="needs an MoE model"):
        LLM(qwen2[1], record_routing=True)
