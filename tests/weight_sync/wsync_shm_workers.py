"""Worker processes of the shared-memory transport tests: ranks 0-1 are a training world (gloo), rank 2 an
inference engine on the same host. The trainers train a step, save a sharded checkpoint (the reference)
and publish through /dev/shm; the engine records facts for the test to assert."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from rl_engine.inference import LLM
from rl_engine.policy import from_pretrained
from rl_engine.weight_sync import (
    EngineLayout,
    SharedMemoryReceiverTransport,
    SharedMemorySenderTransport,
    TrainLayout,
    WeightPublisher,
    WeightReceiver,
    WeightSyncError,
    plan_sync,
    trainer_probe,
)
from rl_engine.launch.gloo import join_store
from wsync_helpers import DENSE, MOE, WAIT_S, finish_rank, lookup, publish
from wsync_workers import PROBE_IDS, _step_and_save, _trainer, _victim, engine_checks, greedy

TRAIN_WORLD = 2
ENGINE = 2


def _plans():
    return {"dense": plan_sync(DENSE, src=TrainLayout(tp=2), dst=EngineLayout(), bucket_bytes=8 << 10),
            "moe": plan_sync(MOE, src=TrainLayout(ep=2, dp=2), dst=EngineLayout(), bucket_bytes=8 << 10)}


def run(rank: int, out_dir: str, paths: dict, store_port: int) -> None:
    torch.set_num_threads(1)
    facts: dict = {"pid": os.getpid()}
    store = join_store(store_port, TRAIN_WORLD + 1)
    if rank < TRAIN_WORLD:
        dist.init_process_group("gloo", store=dist.PrefixStore("train", store), rank=rank,
                                world_size=TRAIN_WORLD, timeout=timedelta(seconds=WAIT_S))
    try:
        if rank < TRAIN_WORLD:
            trainer_side(rank, facts, out_dir, paths, store)
        else:
            engine_side(facts, out_dir, paths, store)
    finally:
        finish_rank(out_dir, rank, facts, in_train_world=rank < TRAIN_WORLD)


def _publish(pub: WeightPublisher, facts: dict, key: str, version: int, **kw) -> None:
    try:
        pub.publish(version, **kw)
        facts[key] = None
    except WeightSyncError as e:
        facts[key] = str(e)


def trainer_side(rank: int, facts: dict, out_dir: str, paths: dict, store) -> None:
    plans = _plans()
    # ---- dense tp2 -> engine tp1 ----------------------------------------------------------------------
    plan = plans["dense"]
    trainer = _trainer(DENSE, paths["dense"], tp=2)
    tx = SharedMemorySenderTransport({0: lookup(store, "shm")}, timeout_s=WAIT_S)
    pub = WeightPublisher(trainer.chunks, plan, src_rank=rank, transport=tx)
    _step_and_save(trainer, DENSE, os.path.join(out_dir, "S1"), seed=1)
    _publish(pub, facts, "v1", 1)
    # A byte flipped in the staging memory after the source checksummed the bucket.
    victim = _victim(plan)
    tampering = plan.buckets[victim].src_rank == rank
    if tampering:
        write = tx._bucket_message

        def flip_after_write(publisher, version, b):
            msg = write(publisher, version, b)
            if b.index == victim:
                t = b.transfers[-1]
                block = tx._target[b.dst_rank][t.dst_local][t.dst_index()]
                first = block[(0,) * (block.dim() - 1)][:1] if block.dim() else block.view(1)
                first.view(torch.uint8)[0] ^= 0x10
            return msg

        tx._bucket_message = flip_after_write
    _step_and_save(trainer, DENSE, os.path.join(out_dir, "S2"), seed=2)
    _publish(pub, facts, "flip", 2)
    if tampering:
        del tx._bucket_message  # back to the transport's own method
    _publish(pub, facts, "v3", 3)  # the same weights (step S2), into the same staging region
    _step_and_save(trainer, DENSE, os.path.join(out_dir, "S4"), seed=4)
    probe = trainer_probe(trainer, PROBE_IDS)
    _publish(pub, facts, "v4", 4, probe=probe)  # the other region, with the probe
    # A fresh publisher (a restarted trainer) sending an old version: refused before any bytes move.
    _publish(WeightPublisher(trainer.chunks, plan, src_rank=rank, transport=tx), facts, "stale", 4)
    tx.close()
    # ---- MoE ep2 (x dp2) -> engine tp1 -------------------------------------------------------------------
    trainer = _trainer(MOE, paths["moe"], tp=1, ep=2)
    _step_and_save(trainer, MOE, os.path.join(out_dir, "M"), seed=3)
    tx = SharedMemorySenderTransport({0: lookup(store, "shm_moe")}, timeout_s=WAIT_S)
    _publish(WeightPublisher(trainer.chunks, plans["moe"], src_rank=rank, transport=tx), facts, "moe", 1)
    tx.close()


def _sync(receiver: WeightReceiver, facts: dict, key: str) -> None:
    try:
        receiver.sync()
        facts[key] = None
    except WeightSyncError as e:
        facts[key] = str(e)


def engine_side(facts: dict, out_dir: str, paths: dict, store) -> None:
    plans = _plans()
    # Bound now: the sources publish the MoE update as soon as their dense part is done, and a source finds
    # nothing listening an error (a gone destination), so it must not come before this rank's dense checks
    # end (it did, while this rank built its first C++ kernels).
    rx_moe = SharedMemoryReceiverTransport(timeout_s=WAIT_S)
    publish(store, "shm_moe", rx_moe.address)
    llm = LLM(from_pretrained(paths["dense"]))
    rx = SharedMemoryReceiverTransport(timeout_s=WAIT_S)
    publish(store, "shm", rx.address)
    receiver = WeightReceiver(llm, plans["dense"], transport=rx)
    facts["regions"] = [os.path.basename(p) for p in rx.staging.paths]
    facts["initial_tokens"] = greedy(llm)[0]
    _sync(receiver, facts, "v1")
    engine_checks(facts, "S1", llm, DENSE, os.path.join(out_dir, "S1"), torch.float32)
    facts["S1/live"] = rx.staging.live
    facts["S1/serves_from_shm"] = all(
        t.untyped_storage().data_ptr() == rx.staging.regions[rx.staging.live].untyped_storage().data_ptr()
        for t in rx.staging.tensors.values())
    _sync(receiver, facts, "flip")
    tokens, versions = greedy(llm)
    facts["after_flip"] = {"version": llm.weights_version, "same_tokens": tokens == facts["S1/tokens"],
                           "versions": versions, "live": rx.staging.live}
    _sync(receiver, facts, "v3")
    engine_checks(facts, "S2", llm, DENSE, os.path.join(out_dir, "S2"), torch.float32)
    facts["S2/live"] = rx.staging.live
    _sync(receiver, facts, "v4")
    engine_checks(facts, "S4", llm, DENSE, os.path.join(out_dir, "S4"), torch.float32)
    facts["S4/live"] = rx.staging.live
    facts["S4/probe_error"] = receiver.last_probe_error
    _sync(receiver, facts, "stale")
    facts["after_stale"] = {"version": llm.weights_version, "same_tokens": greedy(llm)[0] == facts["S4/tokens"]}
    rx.close()
    facts["regions_after_close"] = sorted(set(os.listdir(rx.directory)) & set(facts["regions"]))
    facts["after_close_same_tokens"] = greedy(llm)[0] == facts["S4/tokens"]  # the mapping outlives the file
    # ---- MoE ----
    llm = LLM(from_pretrained(paths["moe"]))  # router_bias_update_rate and expert_bias from the side file
    _sync(WeightReceiver(llm, plans["moe"], transport=rx_moe), facts, "moe")
    engine_checks(facts, "M", llm, MOE, os.path.join(out_dir, "M"), torch.float32)
    rx_moe.close()
