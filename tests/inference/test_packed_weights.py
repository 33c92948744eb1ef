"""cpu_prepack_weights: the engine's CPU steps read prepacked weights (fp32 products of 2+ rows the small-M
GEMM's panels where its AVX-512 micro-kernel is compiled in, else oneDNN's copies; within the log-prob contract
on this tiny model; the ~40M model measured 1.2e-5..2.1e-5, which is why RL engines keep it off), a
weight update that bypasses the parameters' version counters (a write through `.data`, as staging
regions do) is seen after `update_weights`, an engine with the switch off never reads another engine's
copies, and the copies go with the last engine that made them."""

from __future__ import annotations

import gc

import pytest
import torch

from inference_helpers import mixed_prompts
from rl_engine import LLM, SamplingParams
from rl_engine.kernels.cpu import packed_linear
from rl_engine.policy import from_pretrained
from test_logprobs import trainer_logprobs

pytestmark = pytest.mark.skipif(not packed_linear.available()[0], reason=packed_linear.available()[1])


def _worst_gap(policy, prompts, outputs, temperature) -> float:
    worst = 0.0
    for prompt, out in zip(prompts, outputs):
        expected = trainer_logprobs(policy, prompt, out.outputs[0].token_ids, temperature)
        worst = max(worst, (torch.tensor(out.outputs[0].logprobs) - expected).abs().max().item())
    return worst


def test_packed_engine_keeps_the_logprob_contract_and_sees_data_writes(qwen2):
    policy = from_pretrained(qwen2[1], dtype=torch.float32)
    plain = from_pretrained(qwen2[1], dtype=torch.float32)
    llm = LLM(policy, block_size=8, cpu_threads="fixed")
    reference = LLM(plain, block_size=8, cpu_threads="fixed", cpu_prepack_weights=False)
    assert llm.engine.runner.packed_weights and not reference.engine.runner.packed_weights
    prompts = mixed_prompts(4, seed=11)
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=3, ignore_eos=True)
    before = llm.generate(prompts, params)
    weight = policy.layers[0].mlp.down_proj.weight
    assert weight._rl_packed.packed is not None  # the step read a packed copy
    assert not hasattr(plain.layers[0].mlp.down_proj.weight, "_rl_packed")
    assert _worst_gap(policy, prompts, before, 1.0) <= 1e-5
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    assert ([o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
            == [o.outputs[0].token_ids for o in reference.generate(prompts, greedy)])

    saved = weight.detach().clone()
    llm.update_weights(lambda m: m.layers[0].mlp.down_proj.weight.data.mul_(4.0))  # no version bump
    after = llm.generate(prompts, params)
    assert [o.outputs[0].logprobs for o in after] != [o.outputs[0].logprobs for o in before]
    assert _worst_gap(policy, prompts, after, 1.0) <= 1e-5
    with torch.no_grad():
        weight.copy_(saved)

    unpacked = LLM(policy, block_size=8, cpu_threads="fixed", cpu_prepack_weights=False)  # same parameters
    packed_linear.invalidate([weight])
    unpacked.generate(prompts, greedy)
    assert weight._rl_packed.packed is None  # its steps read the parameters, so nothing was repacked
    del llm
    gc.collect()
    assert not hasattr(weight, "_rl_packed")
