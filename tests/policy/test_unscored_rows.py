"""train.skip_unscored_rows: the rows no loss term reads (loss_mask 0, the prompt) feed the attention of
later rows but skip the last layer's attention output and MLP, the final norm and the LM head.
`hidden_states(rows=...)` gives `hidden_states()[rows]`, and a step over micro-batches the same scored
log-probs, loss and gradients, for dense, MLA and MoE-last-layer models, shared-prefix and unshared."""

import pytest
import torch

from rl_engine.losses import PolicyLoss, compute_loss_normalizer
from rl_engine.policy.config import ModelConfig
from rl_engine.policy.model import CausalLM
from rl_engine.policy.presets import preset_config, preset_hf_config
from rl_engine.rl_step import StepLoss, build_micro_batches, forward_logprobs, run_micro_batches, scored_rows
from test_shared_prefix import LOSS, grpo_batch

# The kept rows go through the same row-wise operations either way, but a matmul over fewer rows may sum a
# row in another order (MKL at 1-3 rows of a [3668, 256] x [256, 64] product: a few ulp off the whole
# product's rows): forward values agree to fp32 rounding of one product order at most. The weight gradients
# sum over rows, the skipped rows' exact zeros no longer among them: fp32 reordering, ~sqrt(T) ulp of the
# largest gradient; 1e-5 of it as in the shared-prefix tests.
VALUE_TOL = 1e-6
GRAD_TOL = 1e-5


def model_of(kind: str) -> CausalLM:
    """"tiny" dense; "tiny_dsv3" MLA with an MoE last layer (computed whole, then its rows taken);
    "mla_dense": MLA with every layer dense (the last layer's attention output skips rows)."""
    torch.manual_seed(0)
    if kind == "mla_dense":
        return CausalLM(ModelConfig.from_hf_dict({**preset_hf_config("tiny_dsv3"), "first_k_dense_replace": 2}))
    return CausalLM(preset_config(kind))


def grads(model: CausalLM) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    scale = max(g.abs().max().item() for g in want.values())
    assert scale > 0
    assert max((got[n] - want[n]).abs().max().item() for n in want) <= GRAD_TOL * scale


@pytest.mark.parametrize("as_slice", [False, True], ids=["indices", "slice"])
@pytest.mark.parametrize("kind", ["tiny", "tiny_dsv3", "mla_dense"])
def test_hidden_states_of_rows_are_those_rows_of_the_whole(kind, as_slice):
    model = model_of(kind)
    assert model.layers[-1].is_moe == (kind == "tiny_dsv3")
    gen = torch.Generator().manual_seed(1)
    lengths = [7, 19, 12]
    ids = torch.randint(5, model.config.vocab_size, (sum(lengths),), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, 7, 26, 38], dtype=torch.int32)
    rows = slice(9, 29) if as_slice else torch.randperm(len(ids), generator=gen)[:20].sort().values
    weight = torch.randn(20, model.config.hidden_size, generator=gen)
    out = {}
    for kept in (None, rows):
        model.zero_grad(set_to_none=True)
        h = model.hidden_states(ids, positions=positions, cu_seqlens=cu, rows=kept)
        h = h[rows] if kept is None else h
        (h * weight).sum().backward()
        out[kept is None] = (h.detach(), grads(model))
    (h_rows, g_rows), (h_whole, g_whole) = out[False], out[True]
    assert h_rows.shape == (20, model.config.hidden_size)
    assert (h_rows - h_whole).abs().max() <= VALUE_TOL
    assert_grads_close(g_rows, g_whole)


def test_rows_are_refused_on_a_stage_without_the_last_layer():
    model = CausalLM(preset_config("tiny"), layer_range=(0, 1))
    with pytest.raises(ValueError, match="last stage"):
        model.hidden_states(torch.ones(4, dtype=torch.long), positions=torch.arange(4), rows=torch.tensor([3]))


@pytest.mark.parametrize("kind", ["tiny", "tiny_dsv3"])
@pytest.mark.parametrize("share", [None, 1], ids=["unshared", "shared_prefix"])
def test_a_step_skipping_unscored_rows_gives_the_same_loss_and_gradients(kind, share):
    model = model_of(kind)
    samples, advantages = grpo_batch(model.config.vocab_size, [8, 1, 3], max_prompt=20, max_response=12)
    normalizer = compute_loss_normalizer([s.response_len for s in samples], token_sum_constant=12)
    out = {}
    for skip in (False, True):
        model.zero_grad(set_to_none=True)
        mbs = build_micro_batches(samples, advantages, micro_batch_tokens=120, temperature=0.9,
                                  shared_prefix_min_group=share)
        loss = StepLoss(PolicyLoss(LOSS), normalizer)
        run_micro_batches(model, mbs, loss, skip_unscored=skip)
        out[skip] = (loss.metrics(), grads(model), forward_logprobs(model, mbs, skip_unscored=skip), mbs)
    (m_all, g_all, lp_all, mbs), (m_skip, g_skip, lp_skip, _) = out[False], out[True]
    assert len(mbs) > 1 and all(scored_rows(mb) is not None for mb in mbs)  # every micro-batch has prompt rows
    # shared prefixes: the prompts come first, the completions' rows are one run (a slice)
    assert any(isinstance(scored_rows(mb), slice) for mb in mbs) == (share == 1)
    assert abs(m_all["loss"]) > 1e-4
    for key in m_all:  # every metric reads the scored rows only
        assert abs(m_skip[key] - m_all[key]) <= VALUE_TOL * max(1.0, abs(m_all[key])), key
    assert_grads_close(g_skip, g_all)
    for mb, a, b in zip(mbs, lp_all, lp_skip):
        mask = mb.loss_inputs["loss_mask"]
        assert (a[mask] - b[mask]).abs().max() <= VALUE_TOL and not b[~mask].any()
