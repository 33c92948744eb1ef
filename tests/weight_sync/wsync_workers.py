"""Worker processes of the multi-process weight-sync tests. Ranks 0-3 are a training world (gloo); rank 4
is an inference engine; all five share a separate sync group. Each scenario trains a step, saves a
sharded checkpoint (the reference), publishes, and the engine records facts for the test to assert."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from rl_engine.inference import LLM, SamplingParams
from rl_engine.policy import CausalLM, OptimizerConfig, ParallelGroups, ParallelTrainer, from_pretrained
from rl_engine.policy.dist_checkpoint import load_checkpoint
from rl_engine.weight_sync import (
    EngineLayout,
    InProcessTransport,
    TorchDistTransport,
    TrainLayout,
    WeightPublisher,
    WeightReceiver,
    WeightSyncError,
    ZmqReceiverTransport,
    ZmqSenderTransport,
    plan_sync,
    sync_group,
    trainer_probe,
)
from rl_engine.weight_sync import transport_zmq
from rl_engine.launch.gloo import join_store
from wsync_helpers import DENSE, MOE, WAIT_S, finish_rank, lookup, loss_fn, micro_batches, publish, state_bytes

TRAIN_WORLD = 4
ENGINE = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14, 15, 16, 17]]
PROBE_IDS = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])


class FlipOneByte:
    """A process group whose send of one bucket (by tag) has a byte flipped after the checksum was
    computed: wire corruption."""

    def __init__(self, group, tag: int) -> None:
        self.group, self.tag = group, tag

    def send(self, tensors, dst, tag):
        if tag == self.tag:
            t = tensors[0].clone()
            t[t.numel() // 3] ^= 0x20
            tensors = [t]
        return self.group.send(tensors, dst, tag)

    def __getattr__(self, name):
        return getattr(self.group, name)


def greedy(llm: LLM) -> tuple[list[list[int]], list[int]]:
    outs = llm.generate(PROMPTS, GREEDY)
    return [o.outputs[0].token_ids for o in outs], sorted({v for o in outs for v in o.outputs[0].policy_versions})


def reference_model(config, ckpt: str, dtype) -> CausalLM:
    model = CausalLM(config, dtype=dtype)
    load_checkpoint(ckpt, [model])
    return model


def same_bytes(a: CausalLM, b: CausalLM) -> list[str]:
    sa, sb = state_bytes(a), state_bytes(b)
    return sorted(n for n in set(sa) | set(sb) if n not in sa or n not in sb or not torch.equal(sa[n], sb[n]))


def engine_checks(facts: dict, name: str, llm: LLM, config, ckpt: str, dtype) -> None:
    ref = reference_model(config, ckpt, dtype)
    facts[f"{name}/differing_tensors"] = same_bytes(llm.model, ref)
    tokens, versions = greedy(llm)
    facts[f"{name}/greedy_equal_fresh"] = tokens == greedy(LLM(ref))[0]
    facts[f"{name}/versions"] = versions
    facts[f"{name}/weights_version"] = llm.weights_version
    facts[f"{name}/tokens"] = tokens


def run(rank: int, out_dir: str, paths: dict, store_port: int) -> None:
    torch.set_num_threads(1)
    timeout = timedelta(seconds=WAIT_S)
    store = join_store(store_port, TRAIN_WORLD + 1)
    if rank < TRAIN_WORLD:
        dist.init_process_group("gloo", store=dist.PrefixStore("train", store), rank=rank,
                                world_size=TRAIN_WORLD, timeout=timeout)
    group = sync_group(dist.PrefixStore("sync", store), rank=rank, world_size=TRAIN_WORLD + 1, timeout_s=WAIT_S)
    facts: dict = {}
    try:
        if rank < TRAIN_WORLD:
            trainer_side(rank, group, facts, out_dir, paths, store)
        else:
            engine_side(group, facts, out_dir, paths, store)
    finally:
        finish_rank(out_dir, rank, facts, in_train_world=rank < TRAIN_WORLD)


def _trainer(config, path, *, tp, pp=1, ep=1, dtype=torch.float32) -> ParallelTrainer:
    groups = ParallelGroups.build(tp=tp, pp=pp, ep=ep)
    return ParallelTrainer(config, groups=groups, optim=OptimizerConfig(lr=1e-2, clip_grad=None), hf_path=path,
                           dtype=dtype)


def _step_and_save(trainer: ParallelTrainer, config, ckpt: str, seed: int) -> None:
    g = trainer.groups
    trainer.train_step(micro_batches(config, seed=seed)[g.dp_rank::g.dp_size] if g.dp_size > 1 else
                       micro_batches(config, seed=seed), loss_fn)
    trainer.save_checkpoint(ckpt)


def _plans():
    return {
        "A": plan_sync(DENSE, src=TrainLayout(tp=2, pp=2), dst=EngineLayout(), bucket_bytes=16 << 10),
        "B": plan_sync(MOE, src=TrainLayout(tp=2, dp=2, ep=2), dst=EngineLayout(), bucket_bytes=16 << 10),
        "C": plan_sync(DENSE, src=TrainLayout(tp=2, dp=2, dtype=torch.bfloat16),
                       dst=EngineLayout(dtype=torch.bfloat16), bucket_bytes=8 << 10),
    }


def _victim(plan) -> int:
    """The bucket to corrupt: the middle one of those the engine receives."""
    mine = plan.buckets_to(0)
    return mine[len(mine) // 2].index


def trainer_side(rank: int, group, facts: dict, out_dir: str, paths: dict, store) -> None:
    plans = _plans()
    zmq_tx = ZmqSenderTransport({0: lookup(store, "zmq")}, timeout_s=WAIT_S)
    # ---- A: dense tp2 x pp2, fp32 -> engine tp1, over torch.distributed then over ZMQ -----------------
    plan = plans["A"]
    trainer = _trainer(DENSE, paths["dense"], tp=2, pp=2)
    dist_tx = TorchDistTransport(group, num_src=4, num_dst=1)
    pub = WeightPublisher(trainer.chunks, plan, src_rank=rank, transport=dist_tx)
    _step_and_save(trainer, DENSE, os.path.join(out_dir, "A1"), seed=1)
    pub.publish(1)
    victim = _victim(plan)  # a flipped byte on the wire in one bucket: every rank learns of the rejection
    tampering = plan.buckets[victim].src_rank == rank
    pub_bad = WeightPublisher(trainer.chunks, plan, src_rank=rank,
                              transport=TorchDistTransport(FlipOneByte(group, victim) if tampering else group,
                                                           num_src=4, num_dst=1))
    try:
        pub_bad.publish(2)
        facts["A/flip_dist_error"] = None
    except WeightSyncError as e:
        facts["A/flip_dist_error"] = str(e)
    probe = trainer_probe(trainer, PROBE_IDS)  # collective; the probe source gets it
    pub.publish(3, probe=probe)
    zpub = WeightPublisher(trainer.chunks, plan, src_rank=rank, transport=zmq_tx)
    _step_and_save(trainer, DENSE, os.path.join(out_dir, "A2"), seed=2)
    zpub.publish(4)
    real_send = transport_zmq.send_msg

    def flip_send(sock, msg, **kw):
        if getattr(msg, "bucket_index", None) == victim:
            t = msg.tensors["0"].clone()
            t.view(-1).view(torch.uint8)[1] ^= 0x01
            msg.tensors["0"] = t
        return real_send(sock, msg, **kw)

    if tampering:
        transport_zmq.send_msg = flip_send
    try:
        zpub.publish(5)
        facts["A/flip_zmq_error"] = None
    except WeightSyncError as e:
        facts["A/flip_zmq_error"] = str(e)
    finally:
        transport_zmq.send_msg = real_send
    # ---- B: MoE tp2 x dp2 with ep2 -> engine tp1 over torch.distributed -------------------------------
    trainer = _trainer(MOE, paths["moe"], tp=2, ep=2)
    _step_and_save(trainer, MOE, os.path.join(out_dir, "B"), seed=3)
    WeightPublisher(trainer.chunks, plans["B"], src_rank=rank, transport=dist_tx).publish(1)
    try:  # a fresh publisher (e.g. a restarted trainer) sending an old version: refused before any bytes move
        WeightPublisher(trainer.chunks, plans["B"], src_rank=rank, transport=dist_tx).publish(1)
        facts["B/stale_error"] = None
    except WeightSyncError as e:
        facts["B/stale_error"] = str(e)
    # ---- C: dense tp2 x dp2, bf16 params + distributed optimizer -> bf16 engine over ZMQ ---------------
    trainer = _trainer(DENSE, paths["dense"], tp=2, dtype=torch.bfloat16)
    _step_and_save(trainer, DENSE, os.path.join(out_dir, "C"), seed=4)
    WeightPublisher(trainer.chunks, plans["C"], src_rank=rank, transport=zmq_tx).publish(1)
    zmq_tx.close()
    # ---- D: colocated tp2 -> tp2 engines on the trainer ranks, zero copy ------------------------------
    trainer = _trainer(DENSE, paths["dense"], tp=2)
    g = trainer.groups
    llm = LLM(trainer.chunks[0])  # each tp pair runs one tp2 engine on the trainer's own shards
    plan = plan_sync(DENSE, src=TrainLayout(tp=2, dp=2), dst=EngineLayout(tp=2, replicas=2),
                     colocated={r: r for r in range(4)})
    transport = InProcessTransport(zero_copy=True)
    receiver = WeightReceiver(llm, plan, dst_rank=rank, transport=transport, engine_group=g.tp_group)
    pub = WeightPublisher(trainer.chunks, plan, src_rank=rank, transport=transport)
    before = greedy(llm)[0]
    trainer.train_step(micro_batches(DENSE, seed=5)[g.dp_rank::g.dp_size], loss_fn)
    pub.publish(1)
    update = receiver.receive()
    facts["D/zero_copy"] = update.zero_copy
    receiver.apply(update)
    engine_ptrs = {n: p.data_ptr() for n, p in llm.model.named_parameters()}
    facts["D/same_storage"] = engine_ptrs == {n: p.data_ptr() for n, p in trainer.chunks[0].named_parameters()}
    tokens, versions = greedy(llm)
    clone = CausalLM(DENSE, groups=g)
    clone.load_state_dict(trainer.chunks[0].state_dict())
    facts["D/greedy_equal_fresh"] = tokens == greedy(LLM(clone))[0]
    facts["D/changed"] = tokens != before
    facts["D/versions"] = versions


def engine_side(group, facts: dict, out_dir: str, paths: dict, store) -> None:
    plans = _plans()
    zmq_rx = ZmqReceiverTransport(timeout_s=WAIT_S)  # a port bound now, published to the sources
    publish(store, "zmq", zmq_rx.address)
    dist_rx = TorchDistTransport(group, num_src=4, num_dst=1)
    # ---- A ----
    llm = LLM(from_pretrained(paths["dense"]))
    receiver = WeightReceiver(llm, plans["A"], transport=dist_rx)
    facts["A/initial_tokens"] = greedy(llm)[0]
    receiver.sync()
    engine_checks(facts, "A/dist", llm, DENSE, os.path.join(out_dir, "A1"), torch.float32)
    try:
        receiver.sync()
        facts["A/flip_dist_engine_error"] = None
    except WeightSyncError as e:
        facts["A/flip_dist_engine_error"] = str(e)
    tokens, versions = greedy(llm)
    facts["A/after_flip_dist"] = {"version": llm.weights_version, "same_tokens": tokens == facts["A/dist/tokens"],
                                  "versions": versions}
    receiver.sync()  # v3 with the probe
    facts["A/probe"] = {"version": llm.weights_version, "error": receiver.last_probe_error}
    zreceiver = WeightReceiver(llm, plans["A"], transport=zmq_rx)
    zreceiver.sync()
    engine_checks(facts, "A/zmq", llm, DENSE, os.path.join(out_dir, "A2"), torch.float32)
    try:
        zreceiver.sync()
        facts["A/flip_zmq_engine_error"] = None
    except WeightSyncError as e:
        facts["A/flip_zmq_engine_error"] = str(e)
    tokens, versions = greedy(llm)
    facts["A/after_flip_zmq"] = {"version": llm.weights_version, "same_tokens": tokens == facts["A/zmq/tokens"],
                                 "versions": versions}
    # ---- B ----
    # router_bias_update_rate and the expert_bias buffers come back from the export's side file.
    llm = LLM(from_pretrained(paths["moe"]))
    receiver = WeightReceiver(llm, plans["B"], transport=dist_rx)
    receiver.sync()
    engine_checks(facts, "B", llm, MOE, os.path.join(out_dir, "B"), torch.float32)
    try:
        receiver.sync()
        facts["B/stale_engine_error"] = None
    except WeightSyncError as e:
        facts["B/stale_engine_error"] = str(e)
    facts["B/after_stale"] = {"version": llm.weights_version, "same_tokens": greedy(llm)[0] == facts["B/tokens"]}
    # ---- C ----
    llm = LLM(from_pretrained(paths["dense"], dtype=torch.bfloat16))
    WeightReceiver(llm, plans["C"], transport=zmq_rx).sync()
    engine_checks(facts, "C", llm, DENSE, os.path.join(out_dir, "C"), torch.bfloat16)
    zmq_rx.close()
