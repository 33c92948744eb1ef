"""Weight sync: reshard the training layout into the inference layout, shard to shard, verified.

The RL trainer's view, for one training rank and the engines it feeds::

    from rl_engine.weight_sync import (EngineLayout, TrainLayout, WeightPublisher, WeightReceiver,
                                       plan_sync, ZmqSenderTransport, ZmqReceiverTransport)

    # Every process computes the same plan (a pure function of config, layouts and bucket size).
    plan = plan_sync(config, src=TrainLayout.of(trainer.groups, dtype=torch.bfloat16),
                     dst=EngineLayout(tp=1, replicas=2, dtype=torch.bfloat16), bucket_bytes=64 << 20)

    # Engine process, destination rank d (its LLM / LLMEngine holds the model):
    rx = ZmqReceiverTransport()                      # binds loopback; send rx.address to the trainer
    receiver = WeightReceiver(llm, plan, dst_rank=d, transport=rx)
    update = receiver.receive()                      # blocks; verifies every bucket; WeightSyncError if bad
    receiver.apply(update)                           # between engine steps: copy in, bump weights_version,
                                                     # reset the prefix cache (or receiver.sync() for both)
    # Trainer rank r (every training rank publishes its own shards, nothing is gathered):
    publisher = WeightPublisher(trainer.chunks, plan, src_rank=r,
                                transport=ZmqSenderTransport({d: address_of_d for d in ...}))
    publisher.publish(step)                          # returns once the engines verified it, else raises

Transports: `InProcessTransport` (a colocated engine: zero copy when the engine was built on the
trainer's own model with the same layout, `data_ptr` checked every sync; copies otherwise),
`TorchDistTransport` over a `sync_group(...)` of trainer and engine ranks (gloo here, NCCL on CUDA),
`ZmqSenderTransport` / `ZmqReceiverTransport` (multipart, raw frames, any host),
`SharedMemorySenderTransport` / `SharedMemoryReceiverTransport` (same host: sources write into the
engine's double-buffered staging in /dev/shm, the engine swaps to it without a copy). Verification is on by default: a
checksum per bucket on both ends (`checksum.py`); any mismatch, missing bucket, version that does not
increase or layout that cannot be mapped raises `WeightSyncError` / `ValueError` and the engine keeps
serving its previous version. Optional probe: `publish(v, probe=trainer_probe(trainer, ids))` makes
each engine compare its log-probs of `ids` with the trainer's after the swap and roll back on mismatch.

Modules: `layout` (per-parameter descriptors), `plan` (the reshard planner and buckets), `checksum`,
`buckets` (segments, verification, apply), `staging` (shared-memory regions), `endpoints` (publisher /
receiver), `transport_*`.
"""

from rl_engine.weight_sync.buckets import Probe, Update, WeightSyncError
from rl_engine.weight_sync.checksum import checksum
from rl_engine.weight_sync.endpoints import (
    WeightPublisher,
    WeightReceiver,
    probe_logprobs,
    probe_source_rank,
    trainer_probe,
)
from rl_engine.weight_sync.layout import EngineLayout, Piece, RankLayout, TensorLayout, TrainLayout, model_layout
from rl_engine.weight_sync.plan import Bucket, SyncPlan, Transfer, plan_message_bytes, plan_sync
from rl_engine.weight_sync.transport_dist import SyncGroup, TorchDistTransport, sync_group
from rl_engine.weight_sync.transport_inprocess import InProcessTransport
from rl_engine.weight_sync.transport_shm import SharedMemoryReceiverTransport, SharedMemorySenderTransport
from rl_engine.weight_sync.transport_zmq import ZmqReceiverTransport, ZmqSenderTransport

__all__ = [
    "Bucket", "EngineLayout", "InProcessTransport", "Piece", "Probe", "RankLayout", "SharedMemoryReceiverTransport",
    "SharedMemorySenderTransport", "SyncPlan", "TensorLayout",
    "SyncGroup", "TorchDistTransport", "TrainLayout", "Transfer", "Update", "WeightPublisher", "WeightReceiver",
    "WeightSyncError", "ZmqReceiverTransport", "ZmqSenderTransport", "checksum", "model_layout", "plan_message_bytes",
    "plan_sync",
    "probe_logprobs", "probe_source_rank", "sync_group", "trainer_probe",
]
