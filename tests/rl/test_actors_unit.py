"""The actors' pure pieces, no processes: prompt accounting, messages inside the trainer group, the
sample <-> TrainBatch conversion, micro-batch building, the placement rules of the config, and the
coordinator's registration against deaths its heartbeat monitor declares."""

import glob
import os
import time

import pytest
import torch

from rl_engine import protocol as P
from rl_engine.actors.group_comm import pack_message, reduce_metrics_over, unpack_message
from rl_engine.actors.ledger import PromptLedger
from rl_engine.actors.wire import samples_from_batch, train_batch
from rl_engine.config import ConfigError, load_config
from rl_engine.rl_step import build_micro_batches, make_sample, micro_batch_count
from rl_engine.train_config import RLConfig

EXAMPLES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "*.yaml")))


def test_ledger_requeues_a_dead_workers_prompts_and_drops_stale_answers():
    ledger = PromptLedger()
    for uid in ("0:1", "0:2", "0:3"):
        ledger.take(uid)
    r1, r2, r3 = ledger.dispatch("0:1", "w0"), ledger.dispatch("0:2", "w1"), ledger.dispatch("0:3", "w1")
    assert ledger.complete(r1, "w0") == "0:1"
    assert ledger.requeue_worker("w1") == ["0:2", "0:3"]
    assert ledger.counts()["queued"] == 2 and ledger.num_requeued == 2
    assert ledger.complete(r2, "w1") is None  # the dead worker's late answer is stale
    r2b = ledger.dispatch("0:2", "w0")
    assert r2b != r2 and ledger.complete(r2b, "w1") is None  # answered by the wrong worker: stale too
    assert ledger.complete(r2b, "w0") == "0:2"
    assert ledger.complete(r2b, "w0") is None  # a duplicate answer is not counted twice
    ledger.dispatch("0:3", "w0")
    ledger.check()
    ledger.trained(["0:1"])
    ledger.drop("0:2", "uniform_rewards")
    c = ledger.counts()
    assert (c["taken"], c["trained"], c["dropped"], c["in_flight"], c["dropped_uniform_rewards"]) == (3, 1, 1, 1, 1)
    ledger.check()
    restored = PromptLedger()
    restored.load_state_dict(ledger.state_dict())
    assert restored.counts() == c and restored.in_flight("w0") == ["0:3"]
    with pytest.raises(ValueError, match="is in_flight, expected generated"):
        ledger.trained(["0:3"])
    ledger._entries.pop("0:3")  # simulate a lost prompt: the invariant must catch it
    with pytest.raises(AssertionError, match="accounting broken"):
        ledger.check()


def _samples(num: int = 5, seed: int = 0, routed: bool = False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num):
        p, r = int(torch.randint(2, 9, (1,), generator=gen)), int(torch.randint(1, 7, (1,), generator=gen))
        tokens = torch.randint(3, 50, (p + r,), generator=gen).tolist()
        experts = torch.randint(0, 4, (p + r - 1, 2, 2), dtype=torch.int16) if routed else None
        out.append(make_sample(prompt_ids=tokens[:p], response_ids=tokens[p:], reward=float(i % 2), group=i // 2,
                               logprobs=(-torch.rand(r, generator=gen)).tolist(), policy_versions=[2] * r,
                               kv_versions=[1] * r, routed_experts=experts))
    return out


def test_train_batch_round_trip_keeps_every_sample():
    samples = _samples(routed=True)
    adv = torch.randn(len(samples))
    msg = P.decode(P.encode(train_batch(samples, adv, step=1, policy_version=3, weight_targets={"w": "tcp://x:1"})))
    back, adv_back = samples_from_batch(msg)
    assert torch.equal(adv_back, adv) and msg.weight_targets == {"w": "tcp://x:1"}
    for a, b in zip(samples, back):
        assert (a.input_ids, a.targets, a.loss_mask, a.policy_versions, a.kv_versions) == \
               (b.input_ids, b.targets, b.loss_mask, b.policy_versions, b.kv_versions)
        assert torch.allclose(torch.tensor(a.behavior_logprobs), torch.tensor(b.behavior_logprobs))
        assert torch.equal(a.routed_experts, b.routed_experts)


def test_inconsistent_train_batch_is_a_protocol_error():
    batch = train_batch(_samples(), torch.zeros(5), step=1, policy_version=1)
    assert isinstance(P.decode(P.encode(batch)), P.TrainBatch)
    batch.token_ids = batch.token_ids[:-1].clone()  # as a buggy or hostile peer would send it
    with pytest.raises(P.ProtocolError, match="token_ids has"):
        P.decode(P.encode(batch))
    with pytest.raises(ValueError, match="one entry per sample"):
        P.TrainBatch(step=1, policy_version=1, prompt_lens=torch.ones(2), response_lens=torch.ones(1),
                     token_ids=torch.ones(3), behavior_logprobs=torch.ones(1), policy_versions=torch.ones(1),
                     kv_versions=torch.ones(1), advantages=torch.ones(2))


def test_group_messages_round_trip_without_pickle():
    msg = P.GenerateResult(request_id="0:1#1", samples=[], error="too long")
    assert unpack_message(pack_message(msg)) == msg
    batch = train_batch(_samples(), torch.ones(5), step=2, policy_version=2)
    back = unpack_message(pack_message(batch))
    assert torch.equal(back.token_ids, batch.token_ids)
    # one process (no torch.distributed): the local values, max keys untouched
    assert reduce_metrics_over({"loss": 1.5, "is_ratio_max": 2.0}, ["is_ratio_max", "loss"], contributes=True) == \
        {"is_ratio_max": 2.0, "loss": 1.5}
    assert reduce_metrics_over({"loss": 1.5}, ["loss"], contributes=False) == {"loss": 0.0}


def test_micro_batches_cover_each_sample_once_per_layout():
    samples = _samples(num=9, routed=True)
    adv = torch.arange(9, dtype=torch.float32)
    for dp, pack in ((1, True), (2, True), (2, False)):
        seen = []
        for rank in range(dp):
            mbs = build_micro_batches(samples, adv, micro_batch_tokens=24, temperature=0.7, dp_size=dp, dp_rank=rank,
                                      pack=pack, moe_layers=[0, 1])
            for mb in mbs:
                assert mb.num_tokens <= 24 and mb.temperature == 0.7
                assert mb.routing.mode == "replay" and mb.routing.topk_ids[1].shape == (mb.num_tokens, 2)
                if not pack:
                    assert mb.cu_seqlens.numel() == 2
                seen += sorted(set(mb.loss_inputs["advantages"].tolist()))
        assert sorted(seen) == list(range(9))
    count = micro_batch_count(samples, micro_batch_tokens=24, dp_size=2, pack=False)
    padded = build_micro_batches(samples, adv, micro_batch_tokens=24, temperature=1.0, dp_size=2, dp_rank=1,
                                 pack=False, pad_to_count=count + 1)
    assert len(padded) == count + 1 and not padded[-1].loss_inputs["loss_mask"].any()


@pytest.mark.parametrize(("overrides", "needle"), [
    (["train.tp=2"], "needs several trainer ranks"),
    (["placement.mode=colocated", "train.pp=2"], "needs train.pp=1"),
    (["placement.mode=disaggregated", "train.device=cuda"], "run on CPU in this build"),
    (["train.dp=2", "train.ep=3", "placement.mode=disaggregated"], "must divide train.dp"),
    (["placement.mode=teleport"], "is not one of"),
    (["placement.heartbeat_timeout_s=0.5"], "must exceed heartbeat_interval_s"),
    (["ref.path=''"], "ref.path='' must be a non-empty string"),
    (["rollout.temperature=0"], "must be > 0"),
    (["placement.num_rollout_worker=2"], "did you mean 'placement.num_rollout_workers'"),
])
def test_placement_rules_are_validated(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(RLConfig, None, overrides)


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_configs_load(path):
    cfg = load_config(RLConfig, path)
    if os.path.basename(path) == "agentic_calc.yaml":  # the agentic demo runs in one process by default
        assert cfg.placement.mode == "single_process" and cfg.rollout.fn is not None
    elif os.path.basename(path) == "smollm2_arith.yaml":  # the 2-core real-model recipe: one process
        assert cfg.placement.mode == "single_process" and cfg.model.path == "builtin:smollm2-135m-instruct"
    elif os.path.basename(path) == "tiny_dsv3.yaml":  # the DeepSeek-V3-style demo: one process, routing replay
        assert cfg.placement.mode == "single_process" and cfg.model.path == "builtin:tiny_dsv3"
        assert cfg.rollout.routing_replay
    else:
        assert cfg.placement.mode in ("colocated", "disaggregated")
    assert len(EXAMPLES) == 6


def test_a_death_declared_as_a_worker_registers_is_of_its_earlier_silence(tmp_path):
    """The heartbeat monitor's thread may declare a peer dead (the silence of an earlier process of that
    name, e.g. before a restart) while the coordinator registers it: the coordinator watches the peer,
    then records the registration, so such a death is older than the registration and ignored. The
    death is put on the coordinator's queue at the last moment before the watch resets the peer's
    clock; in the old order (registration time taken first) it retired the new process."""
    from rl_engine.actors.coordinator_io import CoordinatorBase
    from rl_engine.auth import RunAuth

    cfg = load_config(RLConfig, None, [f"train.output_dir={tmp_path}", "placement.mode=disaggregated",
                                       "placement.num_rollout_workers=2"])
    coordinator = CoordinatorBase(cfg, auth=RunAuth.generate(), port=None, heartbeat_port=None)
    try:
        watch = coordinator.monitor.watch

        def watch_after_a_death(peer: str) -> None:
            coordinator._dead.put((peer, time.monotonic()))  # what the monitor thread's on_dead does
            watch(peer)

        coordinator.monitor.watch = watch_after_a_death
        for name in ("rollout-0", "rollout-1"):
            coordinator._register([name.encode()], name, P.Hello(worker_id=name, role="rollout",
                                                                 capabilities={"weights_address": "tcp://x:1"}))
        coordinator._handle_dead()
        assert [a.id for a in coordinator.live_workers()] == ["rollout-0", "rollout-1"]
        assert coordinator.num_worker_deaths == 0
        # a death declared after the registration is the registered process's: it is retired
        coordinator._dead.put(("rollout-1", time.monotonic()))
        coordinator._handle_dead()
        assert [a.id for a in coordinator.live_workers()] == ["rollout-0"] and coordinator.num_worker_deaths == 1
    finally:
        coordinator.close()
