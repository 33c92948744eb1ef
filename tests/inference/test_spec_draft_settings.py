"""The draft-model proposer's runner takes the target engine's CPU settings (an RL engine keeps prepacked
linears off for the log-prob contract and its thread count fixed beside a trainer; its draft must not turn them
back on), and a self-draft (a draft holding the target's tensors) computes with the target's current weights
after any weight update, a write through `.data` included."""

from __future__ import annotations

import pytest
import torch

from rl_engine import LLM, SamplingParams
from rl_engine.kernels.cpu import packed_linear
from rl_engine.policy import from_pretrained

PROMPTS = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _self_draft(path: str, **settings) -> tuple[torch.nn.Module, LLM]:
    target = from_pretrained(path, dtype=torch.float32)
    llm = LLM(target, speculative_config={"method": "draft_model", "model": target, "num_speculative_tokens": 3},
              **settings)
    assert llm.engine.speculator.proposer.shares_target_weights
    return target, llm


@pytest.mark.parametrize("prepack,threads", [(False, "fixed"), (True, "auto")])
def test_the_draft_runner_takes_the_targets_cpu_settings(char_model, prepack, threads):
    _, llm = _self_draft(char_model, cpu_prepack_weights=prepack, cpu_threads=threads, cpu_decode_kernel=prepack)
    target_runner, draft_runner = llm.engine.runner, llm.engine.speculator.proposer.runner
    assert bool(draft_runner.packed_weights) == bool(target_runner.packed_weights) == (
        prepack and packed_linear.available()[0])
    assert (draft_runner.threads is None) == (target_runner.threads is None) == (threads == "fixed")
    assert draft_runner.config.cpu_decode_kernel is target_runner.config.cpu_decode_kernel is prepack
    assert draft_runner.attn.cpu_decode == target_runner.attn.cpu_decode


def _scramble(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for layer in model.layers:
        for p in layer.parameters():
            if p.dim() == 2:  # through .data: no version bump, so only update_weights can tell the runners
                p.data.copy_(torch.randn(p.shape, generator=gen) * p.data.std())


@pytest.mark.parametrize("prepack", [False, True])
def test_a_self_draft_drafts_with_the_updated_weights(char_model, prepack):
    """Greedy drafts of a draft that is the target are all accepted; after a weight update written through
    `.data` they still are, which fails if the draft reads copies of the old weights (before: 94% accepted,
    the draft's runner had packed the target's weights though the target engine packs nothing)."""
    _, llm = _self_draft(char_model, cpu_prepack_weights=prepack, cpu_threads="fixed")

    def run() -> tuple[list[list[int]], int, int]:
        outs = [c for o in llm.generate(PROMPTS, GREEDY) for c in o.outputs]
        return ([list(c.token_ids) for c in outs], sum(c.spec_draft_tokens for c in outs),
                sum(c.spec_accepted_tokens for c in outs))

    before, drafted, accepted = run()
    assert drafted > 0 and accepted == drafted
    llm.update_weights(_scramble)
    after, drafted, accepted = run()
    assert after != before  # the update changed what the target generates
    assert drafted > 0 and accepted == drafted
