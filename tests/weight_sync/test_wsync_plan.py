"""Layouts, the planner and the checksum, in one process: every layout pair is checked byte for byte
against models loaded by the Hugging Face loader (an independent slicing implementation)."""

from __future__ import annotations

import pytest
import torch

from rl_engine.weight_sync import (
    EngineLayout,
    InProcessTransport,
    TrainLayout,
    WeightPublisher,
    WeightReceiver,
    WeightSyncError,
    checksum,
    plan_sync,
)
from wsync_helpers import MODELS, FakeEngine, assert_same_bytes, engine_model, source_chunks, write_weights

CASES = [
    # (model, source layout, destination layout)
    ("dense", TrainLayout(tp=2, pp=2), EngineLayout(tp=1)),
    ("dense", TrainLayout(tp=1, pp=2, virtual_stages=2), EngineLayout(tp=2)),
    ("dense", TrainLayout(tp=2, dp=2), EngineLayout(tp=4, replicas=2)),
    ("dense", TrainLayout(tp=4), EngineLayout(tp=2, dtype=torch.bfloat16)),
    ("untied", TrainLayout(tp=2, pp=2), EngineLayout(tp=2)),
    ("moe", TrainLayout(tp=2, dp=2, ep=2), EngineLayout(tp=1)),
    ("moe", TrainLayout(tp=1, dp=4, ep=4), EngineLayout(tp=2, ep=2)),
]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("wsync_plan")
    return {k: write_weights(str(root / k), cfg, seed=i) for i, (k, cfg) in enumerate(MODELS.items())}


def run_in_process(config, src, dst, path, *, bucket_bytes=2048):
    """Sync every source rank (loaded from `path`) into zeroed engine models, all in this process."""
    plan = plan_sync(config, src=src, dst=dst, bucket_bytes=bucket_bytes)
    transport = InProcessTransport(zero_copy=False)
    sources = {r: source_chunks(config, src, r, path) for r in range(src.world_size)}
    for chunks in sources.values():  # buffers are not in HF checkpoints: give them distinct values
        for c in chunks:
            for name, b in c.named_buffers():
                if name.endswith("expert_bias"):
                    b.copy_(torch.arange(b.numel(), dtype=b.dtype) * 0.25 - 0.5)
    engines = {d: FakeEngine(engine_model(config, dst, d, None)) for d in range(dst.world_size)}
    receivers = {d: WeightReceiver(e, plan, dst_rank=d, transport=transport) for d, e in engines.items()}
    for r, chunks in sources.items():
        WeightPublisher(chunks, plan, src_rank=r, transport=transport).publish(1)
    for d, rec in receivers.items():
        assert rec.sync() == 1
    return plan, engines


@pytest.mark.parametrize("kind,src,dst", CASES, ids=lambda x: repr(x) if not isinstance(x, str) else x)
def test_reshard_is_byte_identical_to_the_hf_loader(weights, kind, src, dst):
    config = MODELS[kind]
    plan, engines = run_in_process(config, src, dst, weights[kind])
    for d, engine in engines.items():
        reference = engine_model(config, dst, d, weights[kind])
        for name, b in reference.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(torch.arange(b.numel(), dtype=b.dtype) * 0.25 - 0.5)
        assert_same_bytes(engine.model, reference, what=f"{kind} {src} -> {dst} rank {d}")
    # Buckets respect the size, and nobody sends or receives more than its own shards.
    assert all(b.nbytes <= plan.bucket_bytes or len(b.transfers) == 1 for b in plan.buckets)
    model_bytes = plan.model_bytes()
    if src.world_size > 1:
        assert max(plan.bytes_sent(r) for r in range(src.world_size)) < model_bytes
    if dst.tp * dst.ep > 1:
        assert max(plan.bytes_received(d) for d in range(dst.world_size)) < model_bytes
    else:
        assert plan.bytes_received(0) == model_bytes


def test_replicas_spread_the_load_and_colocated_ranks_feed_their_engine():
    config = MODELS["dense"]
    src, dst = TrainLayout(tp=2, dp=2), EngineLayout(tp=2, replicas=2)
    plan = plan_sync(config, src=src, dst=dst)
    sent = [plan.bytes_sent(r) for r in range(4)]
    assert min(sent) > 0 and max(sent) < 1.5 * min(sent)  # the dp replicas share the work
    colo = plan_sync(config, src=src, dst=dst, colocated={d: d for d in range(4)})
    assert all(b.src_rank == b.dst_rank for b in colo.buckets)
    assert colo.fingerprint != plan.fingerprint
    assert plan_sync(config, src=src, dst=dst).fingerprint == plan.fingerprint


def test_unmappable_layouts_are_clear_errors():
    with pytest.raises(ValueError, match=r"layout cannot be mapped.*num_attention_heads \(4\).*tp \(3\)"):
        plan_sync(MODELS["dense"], src=TrainLayout(tp=2), dst=EngineLayout(tp=3))
    with pytest.raises(ValueError, match=r"layout cannot be mapped.*num_experts \(4\).*ep \(8\)"):
        plan_sync(MODELS["moe"], src=TrainLayout(ep=8, dp=8), dst=EngineLayout())
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_sync(MODELS["dense"], src=TrainLayout(), dst=EngineLayout(), bucket_bytes=8)


def test_model_that_does_not_match_the_plan_is_refused(weights):
    config = MODELS["dense"]
    plan = plan_sync(config, src=TrainLayout(tp=2), dst=EngineLayout())
    wrong = source_chunks(config, TrainLayout(tp=1), 0, None)  # built for tp 1, plan says tp 2
    with pytest.raises(ValueError, match=r"source rank 0: tensor '0\..*' is .* but the plan expects"):
        WeightPublisher(wrong, plan, src_rank=0, transport=InProcessTransport())
    engine = FakeEngine(engine_model(MODELS["untied"], EngineLayout(), 0, None))
    with pytest.raises(ValueError, match="destination rank 0: the model (lacks|has) tensor"):
        WeightReceiver(engine, plan, dst_rank=0, transport=InProcessTransport())


def test_version_going_backwards_and_missing_buckets_keep_the_previous_weights(weights):
    config = MODELS["dense"]
    src, dst = TrainLayout(tp=2), EngineLayout()
    plan = plan_sync(config, src=src, dst=dst, bucket_bytes=4096)
    transport = InProcessTransport()
    engine = FakeEngine(engine_model(config, dst, 0, None))
    receiver = WeightReceiver(engine, plan, transport=transport)
    pubs = [WeightPublisher(source_chunks(config, src, r, weights["dense"]), plan, src_rank=r, transport=transport)
            for r in range(2)]
    for p in pubs:
        p.publish(3)
    receiver.sync()
    assert engine.weights_version == 3
    with pytest.raises(ValueError, match="must increase"):
        pubs[0].publish(2)
    before = {n: t.clone() for n, t in engine.model.state_dict().items()}
    for r in range(2):  # fresh publishers, a stale version: refused by the receiver
        WeightPublisher(source_chunks(config, src, r, weights["dense"]), plan, src_rank=r,
                        transport=transport).publish(2)
    with pytest.raises(WeightSyncError, match="version must increase: the engine is at 3, the update is 2"):
        receiver.sync()
    pubs[0].publish(4)  # rank 1 never publishes: its buckets are missing
    with pytest.raises(WeightSyncError, match=r"missing \d+ bucket"):
        receiver.sync()
    assert engine.weights_version == 3
    for n, t in engine.model.state_dict().items():
        assert torch.equal(t, before[n]), n


def test_checksum_detects_every_single_flipped_byte_and_moved_blocks():
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (8192 + 13,), dtype=torch.uint8, generator=g)
    base = checksum([data])
    for i in range(0, data.numel(), 7):
        for delta in (1, 128, 255):
            flipped = data.clone()
            flipped[i] = (int(flipped[i]) + delta) % 256
            assert checksum([flipped]) != base, (i, delta)
    swapped = data.clone()
    swapped[:4096], swapped[4096:8192] = data[4096:8192].clone(), data[:4096].clone()
    assert checksum([swapped]) != base
    # The digest depends on the bytes only, not on their alignment or dtype view.
    buf = torch.zeros(data.numel() + 3, dtype=torch.uint8)
    buf[3:] = data
    assert checksum([buf[3:]]) == base
    assert checksum([data[:8192].view(torch.float32)]) == checksum([data[:8192]])
    assert checksum([data[:100], data[100:]]) != base  # segmentation is part of the digest
