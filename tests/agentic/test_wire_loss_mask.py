"""TrainBatch.loss_mask: an agentic sample's mask (observation tokens inside the response) crosses the
wire and comes back as the same samples; single-turn batches send none; a mask of the wrong length is
refused."""

from __future__ import annotations

import pytest
import torch

from rl_engine import protocol as P
from rl_engine.actors.wire import samples_from_batch, train_batch
from rl_engine.rl_step import make_sample


def test_loss_mask_round_trips_through_the_wire():
    agentic = make_sample(prompt_ids=[1, 2, 3], response_ids=[4, 5, 6, 7, 8], logprobs=[-0.5, -0.25, 0.0, 0.0, -1.0],
                          policy_versions=[2, 2, -1, -1, 3], kv_versions=[2, 2, -1, -1, 3],
                          response_mask=[1, 1, 0, 0, 1], reward=1.0, group=0, num_turns=2)
    plain = make_sample(prompt_ids=[1, 2], response_ids=[9, 10], logprobs=[-0.1, -0.2], policy_versions=[3, 3],
                        kv_versions=[3, 3], reward=0.0, group=0)
    batch = train_batch([agentic, plain], torch.tensor([0.5, -0.5]), step=1, policy_version=4)
    assert batch.loss_mask.tolist() == [True, True, False, False, True, True, True]
    back, advantages = samples_from_batch(P.decode(P.encode(batch)))
    for got, sent in zip(back, [agentic, plain]):
        assert (got.input_ids, got.targets, got.loss_mask, got.policy_versions) == \
            (sent.input_ids, sent.targets, sent.loss_mask, sent.policy_versions)
        assert got.behavior_logprobs == pytest.approx(sent.behavior_logprobs, abs=1e-7)  # float32 on the wire
    assert back[0].num_loss_tokens == 3 and advantages.tolist() == [0.5, -0.5]
    assert train_batch([plain], torch.zeros(1), step=1, policy_version=4).loss_mask is None
    with pytest.raises(ValueError, match="loss_mask has 4 entries"):
        P.TrainBatch(**{**{f: getattr(batch, f) for f in batch.__struct_fields__}, "loss_mask": torch.ones(4).bool()})
