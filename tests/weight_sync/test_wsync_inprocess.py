"""A colocated engine in the trainer's process, on the real inference engine: zero copy when the engine
runs on the trainer's own model, verified copies otherwise; rejected updates leave the engine serving
its previous version; the probe rolls a bad update back."""

from __future__ import annotations

import pytest
import torch

from rl_engine.inference import LLM, SamplingParams
from rl_engine.policy import from_pretrained
from rl_engine.weight_sync import (
    EngineLayout,
    InProcessTransport,
    Probe,
    TrainLayout,
    WeightPublisher,
    WeightReceiver,
    WeightSyncError,
    plan_sync,
    probe_logprobs,
)
from wsync_helpers import UNTIED, assert_same_bytes, write_weights

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14, 15, 16, 17]]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_weights(str(tmp_path_factory.mktemp("wsync_inproc") / "untied"), UNTIED, seed=3)


def train_a_little(model, seed: int) -> None:
    """Stands in for an optimizer step: every parameter changes, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))


def greedy(llm: LLM) -> tuple[list[list[int]], set[int]]:
    outs = llm.generate(PROMPTS, GREEDY)
    return [o.outputs[0].token_ids for o in outs], {v for o in outs for v in o.outputs[0].policy_versions}


def fresh_engine_on_copy(model) -> LLM:
    clone = from_pretrained.__globals__["CausalLM"](model.config, dtype=model.dtype)
    clone.load_state_dict(model.state_dict())
    return LLM(clone)


def test_zero_copy_colocated_engine_reads_the_trainer_storage(path):
    trainer_model = from_pretrained(path)
    llm = LLM(trainer_model)  # the engine runs on the trainer's own tensors
    plan = plan_sync(UNTIED, src=TrainLayout(), dst=EngineLayout(), colocated={0: 0})
    transport = InProcessTransport(zero_copy=True)
    receiver = WeightReceiver(llm, plan, transport=transport)
    publisher = WeightPublisher(trainer_model, plan, src_rank=0, transport=transport)
    before, _ = greedy(llm)
    train_a_little(trainer_model, seed=1)
    publisher.publish(1)
    update = receiver.receive()
    assert update.zero_copy and not update.segments  # nothing moved
    assert receiver.apply(update) == 1
    trainer_ptrs = {n: p.data_ptr() for n, p in trainer_model.named_parameters()}
    assert {n: p.data_ptr() for n, p in llm.model.named_parameters()} == trainer_ptrs
    tokens, versions = greedy(llm)
    assert versions == {1} and tokens != before
    assert tokens == greedy(fresh_engine_on_copy(trainer_model))[0]


def test_zero_copy_notices_when_the_trainer_rebinds_its_storage(path):
    """An engine model of its own whose tensors alias the trainer's; then the trainer moves a parameter
    into new memory (as the distributed optimizer does when it builds its flat buffer)."""
    trainer_model = from_pretrained(path)
    engine_model = from_pretrained(path)
    for a, b in zip(engine_model.parameters(), trainer_model.parameters()):
        a.data = b.data
    llm = LLM(engine_model)
    plan = plan_sync(UNTIED, src=TrainLayout(), dst=EngineLayout(), colocated={0: 0})
    transport = InProcessTransport()
    receiver = WeightReceiver(llm, plan, transport=transport)
    publisher = WeightPublisher(trainer_model, plan, src_rank=0, transport=transport)
    publisher.publish(1)
    assert receiver.receive().zero_copy
    trainer_model.norm.weight.data = trainer_model.norm.weight.data.clone()
    with pytest.raises(WeightSyncError, match="no longer the trainer's storage"):
        publisher.publish(2)


def test_copy_mode_matches_a_fresh_engine_and_rejects_a_flipped_byte(path):
    trainer_model = from_pretrained(path)
    llm = LLM(from_pretrained(path))  # its own copy of the weights: the trainer may go on training
    plan = plan_sync(UNTIED, src=TrainLayout(), dst=EngineLayout(), bucket_bytes=8192)
    transport = InProcessTransport()
    receiver = WeightReceiver(llm, plan, transport=transport)
    publisher = WeightPublisher(trainer_model, plan, src_rank=0, transport=transport)
    train_a_little(trainer_model, seed=2)
    publisher.publish(1)
    update = receiver.receive()
    assert not update.zero_copy and len(update.segments) == len(plan.buckets) > 1
    receiver.apply(update)
    assert_same_bytes(llm.model, trainer_model)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(llm.model.parameters(), trainer_model.parameters()))
    v1_tokens, versions = greedy(llm)
    assert versions == {1} and v1_tokens == greedy(fresh_engine_on_copy(trainer_model))[0]

    # One flipped byte in one bucket (a corrupted copy stands in for the wire): the whole update is
    # rejected and the engine keeps answering with version 1.
    train_a_little(trainer_model, seed=3)
    publisher.publish(2)
    update = receiver.transport._mailbox[0]
    k = len(plan.buckets) // 2
    update.segments[k][0].view(-1).view(torch.uint8)[5] ^= 0x10  # in the staging copy
    with pytest.raises(WeightSyncError, match=f"checksum mismatch in bucket {k} .*keeps version 1|"
                                              f"keeps version 1: checksum mismatch in bucket {k} "):
        receiver.receive()
    assert llm.weights_version == 1
    tokens, versions = greedy(llm)
    assert tokens == v1_tokens and versions == {1}

    # The engine gets the weights as published: the trainer may step before the engine applies them.
    publisher.publish(3)
    published = fresh_engine_on_copy(trainer_model).model
    train_a_little(trainer_model, seed=4)
    receiver.sync()
    assert_same_bytes(llm.model, published)
    publisher.publish(4)
    receiver.sync()
    assert_same_bytes(llm.model, trainer_model)
    assert greedy(llm)[1] == {4}


def test_copy_mode_without_staging_catches_a_trainer_step_between_publish_and_apply(path):
    trainer_model = from_pretrained(path)
    llm = LLM(from_pretrained(path))
    plan = plan_sync(UNTIED, src=TrainLayout(), dst=EngineLayout(), bucket_bytes=8192)
    transport = InProcessTransport(staging=False)
    receiver = WeightReceiver(llm, plan, transport=transport)
    publisher = WeightPublisher(trainer_model, plan, src_rank=0, transport=transport)
    ptrs = [p.data_ptr() for p in llm.model.parameters()]
    publisher.publish(1)
    train_a_little(trainer_model, seed=4)
    with pytest.raises(WeightSyncError, match="checksum mismatch"):
        receiver.receive()
    publisher.publish(2)
    receiver.sync()
    assert_same_bytes(llm.model, trainer_model)
    assert [p.data_ptr() for p in llm.model.parameters()] == ptrs  # copied into the engine's own tensors


def test_probe_accepts_equal_logprobs_and_rolls_back_otherwise(path):
    trainer_model = from_pretrained(path)
    llm = LLM(from_pretrained(path))
    plan = plan_sync(UNTIED, src=TrainLayout(), dst=EngineLayout())
    transport = InProcessTransport()
    receiver = WeightReceiver(llm, plan, transport=transport)
    publisher = WeightPublisher(trainer_model, plan, src_rank=0, transport=transport)
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    train_a_little(trainer_model, seed=5)
    publisher.publish(1, probe=Probe(token_ids=ids, logprobs=probe_logprobs(trainer_model, ids)))
    assert receiver.sync() == 1 and receiver.last_probe_error < 1e-6
    before = {n: t.clone() for n, t in llm.model.state_dict().items()}
    train_a_little(trainer_model, seed=6)
    wrong = probe_logprobs(trainer_model, ids) + 0.5  # the trainer "expects" something else
    publisher.publish(2, probe=Probe(token_ids=ids, logprobs=wrong))
    with pytest.raises(WeightSyncError, match="probe failed.*rolled back"):
        receiver.sync()
    assert llm.weights_version == 1
    for n, t in llm.model.state_dict().items():
        assert torch.equal(t, before[n]), n


@pytest.mark.parametrize("recompute_kv", [False, True])
def test_update_between_engine_steps_stamps_tokens_and_kv_versions(path, recompute_kv):
    trainer_model = from_pretrained(path)
    llm = LLM(from_pretrained(path))
    plan = plan_sync(UNTIED, src=TrainLayout(), dst=EngineLayout())
    transport = InProcessTransport()
    receiver = WeightReceiver(llm, plan, transport=transport, recompute_kv=recompute_kv)
    publisher = WeightPublisher(trainer_model, plan, src_rank=0, transport=transport)
    engine = llm.engine
    engine.add_request("r", PROMPTS[2], GREEDY)
    for _ in range(4):
        engine.step()
    train_a_little(trainer_model, seed=7)
    publisher.publish(1)
    receiver.sync()  # between two steps of a running request
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    out = outputs[-1].outputs[0]
    split = out.policy_versions.index(1)
    assert set(out.policy_versions[:split]) == {0} and set(out.policy_versions[split:]) == {1}
    # Tokens after the update attend to KV computed with version 0 unless the engine recomputed it.
    assert set(out.kv_versions[split:]) == ({1} if recompute_kv else {0})
