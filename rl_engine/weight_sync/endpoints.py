"""The two ends of a weight sync: `WeightPublisher` on each trainer rank, `WeightReceiver` per engine rank.

A publisher checks its live model chunks against the plan's source layout once, then `publish(version)`
hands this rank's buckets to its transport. A receiver checks the engine's model against the plan's
destination layout once; `receive()` collects one update, verifies every bucket (plan shape, checksum,
version, completeness) and agrees with the other destination ranks; `apply(update)` swaps it into the
engine between steps through the engine's public `update_weights` (which bumps `weights_version`,
resets the prefix cache and stamps the version on every later token and each request's KV).

Main design choice: the update is transactional. Nothing touches the engine's tensors until every
bucket of every destination rank has been verified; any failure raises `WeightSyncError` and the engine
keeps serving the previous version. With a probe, the old blocks are kept while the probe runs and put
back if the engine's log-probs of the probe sequence differ from the trainer's.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed as dist

from rl_engine.policy.model import CausalLM
from rl_engine.weight_sync.buckets import (
    Probe,
    Update,
    WeightSyncError,
    apply_segments,
    check_segments,
    restore_segments,
)
from rl_engine.weight_sync.layout import check_matches
from rl_engine.weight_sync.plan import SyncPlan

if TYPE_CHECKING:
    from rl_engine.policy.parallel_trainer import ParallelTrainer

logger = logging.getLogger(__name__)


class SenderTransport(Protocol):
    def send(self, publisher: "WeightPublisher", version: int, probe: Probe | None) -> None: ...


class ReceiverTransport(Protocol):
    def receive(self, receiver: "WeightReceiver") -> Update: ...

    def verdict(self, receiver: "WeightReceiver", update: Update, problem: str | None) -> str | None: ...


class Engine(Protocol):
    """What the receiver needs from the inference engine (`LLM` or `LLMEngine`)."""

    model: CausalLM
    weights_version: int

    def update_weights(self, apply=None, *, version: int | None = None, recompute_kv: bool = False) -> int: ...


class WeightPublisher:
    """Trainer side, one per training rank: `publish(version)` sends this rank's shards."""

    def __init__(self, chunks: CausalLM | list[CausalLM], plan: SyncPlan, *, src_rank: int,
                 transport: SenderTransport, verify: bool = True) -> None:
        chunks = [chunks] if isinstance(chunks, CausalLM) else list(chunks)
        if src_rank not in plan.src_layouts:
            raise ValueError(f"src_rank {src_rank} is not a rank of the plan's training layout "
                             f"({plan.src.world_size} ranks)")
        self.plan, self.src_rank, self.transport, self.verify = plan, src_rank, transport, verify
        self.tensors = check_matches(plan.src_layouts[src_rank], chunks, side="source")
        self.buckets = plan.buckets_from(src_rank)
        self.version: int | None = None
        self.last_stats: dict = {}

    @property
    def is_probe_source(self) -> bool:
        return self.src_rank == probe_source_rank(self.plan)

    def publish(self, version: int, *, probe: Probe | None = None) -> None:
        """Send this rank's part of weights `version` (every training rank calls it with the same version).
        Returns when the destinations have verified the update; raises `WeightSyncError` if they refused it."""
        if not isinstance(version, int) or (self.version is not None and version <= self.version):
            raise ValueError(f"weights version must increase: last published {self.version}, got {version!r}")
        if probe is not None and not self.is_probe_source:
            raise ValueError(f"pass the probe on source rank {probe_source_rank(self.plan)} (last pipeline stage, "
                             f"tp rank 0, dp rank 0), not on rank {self.src_rank}")
        start = time.perf_counter()
        self.transport.send(self, version, probe)
        self.version = version
        self.last_stats = {"seconds": time.perf_counter() - start, "buckets": len(self.buckets),
                           "bytes": sum(t.nbytes for b in self.buckets for t in b.transfers)}


class WeightReceiver:
    """Engine side, one per engine rank: `receive()` then `apply(update)` between engine steps."""

    def __init__(self, engine: Engine, plan: SyncPlan, *, dst_rank: int = 0, transport: ReceiverTransport,
                 verify: bool = True, engine_group: dist.ProcessGroup | None = None, recompute_kv: bool = False,
                 probe_atol: float | None = None) -> None:
        if dst_rank not in plan.dst_layouts:
            raise ValueError(f"dst_rank {dst_rank} is not a rank of the plan's engine layout "
                             f"({plan.dst.world_size} ranks)")
        self.engine, self.plan, self.dst_rank, self.transport = engine, plan, dst_rank, transport
        self.verify, self.engine_group, self.recompute_kv = verify, engine_group, recompute_kv
        self.tensors = check_matches(plan.dst_layouts[dst_rank], [engine.model], side="destination")
        self.incoming = plan.buckets_to(dst_rank)
        default_atol = 1e-4 if plan.dst.dtype == torch.float32 else 5e-2
        self.probe_atol = default_atol if probe_atol is None else probe_atol
        self.last_stats: dict = {}
        self.last_probe_error: float | None = None
        self.failed_bucket: int | None = None  # index of the bucket that failed the last check
        register = getattr(transport, "register", None)
        if register is not None:
            register(self)

    def receive(self) -> Update:
        """Collect and verify one update (blocking). Raises `WeightSyncError`, engine untouched, on any problem."""
        start = time.perf_counter()
        update = self.transport.receive(self)
        received = time.perf_counter()
        problem = self._check(update)
        checked = time.perf_counter()
        problem = self._agree(problem)
        problem = self.transport.verdict(self, update, problem)
        self.last_stats = {"receive_s": received - start, "verify_s": checked - received,
                           "verdict_s": time.perf_counter() - checked,
                           "bytes": sum(t.nbytes for b in self.incoming for t in b.transfers)}
        if problem is not None:
            logger.warning("weight update v%s rejected on destination rank %d: %s", update.version, self.dst_rank,
                           problem)
            raise WeightSyncError(f"weight update v{update.version} rejected; the engine keeps version "
                                  f"{self.engine.weights_version}: {problem}")
        return update

    def _check(self, update: Update) -> str | None:
        self.failed_bucket: int | None = None
        current = self.engine.weights_version
        if update.problem is not None:
            self.failed_bucket = update.problem_bucket
            return update.problem
        if update.version <= current:
            return f"weights version must increase: the engine is at {current}, the update is {update.version}"
        if update.zero_copy:
            return None  # the transport checked that the engine's tensors are the trainer's storage
        missing = [b.index for b in self.incoming if b.index not in update.segments]
        if missing:
            keys = sorted({t.key for b in self.incoming if b.index in missing for t in b.transfers})
            return f"missing {len(missing)} bucket(s) {missing[:8]} holding tensor(s) {keys[:5]}"
        for b in self.incoming:
            checked = self.verify and b.index not in update.tagged
            sent = update.checksums.get(b.index) if checked else None
            if checked and not sent:
                return (f"bucket {b.index} came without a checksum (verify=False on the publisher?) while this "
                        "receiver verifies")
            problem = check_segments(b, update.segments[b.index], sent, update.received.get(b.index))
            if problem is not None:
                self.failed_bucket = b.index
                return problem
        return None

    def _agree(self, problem: str | None) -> str | None:
        """Every rank of a multi-rank engine must accept, or none applies."""
        if self.engine_group is None:
            return problem
        flag = torch.tensor([0 if problem is None else 1], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.engine_group)
        if problem is None and int(flag) != 0:
            return "another rank of this engine rejected the update"
        return problem

    def apply(self, update: Update) -> int:
        """Between engine steps: swap the verified update in. Returns the engine's new weights version."""
        start = time.perf_counter()

        def swap(model: torch.nn.Module) -> None:
            if update.zero_copy:
                return
            undo = update.install() if update.install is not None else self._copy_in(update)
            if update.probe is not None:
                try:
                    self._run_probe(update.probe)
                except BaseException:
                    undo()
                    raise

        try:
            version = self.engine.update_weights(None if update.zero_copy else swap, version=update.version,
                                                 recompute_kv=self.recompute_kv)
        except WeightSyncError:
            raise
        except ValueError as e:
            raise WeightSyncError(f"weight update v{update.version} refused by the engine: {e}") from None
        self.last_stats["apply_s"] = time.perf_counter() - start
        update.segments.clear()  # drop references to staged buffers and frames
        return version

    def _copy_in(self, update: Update):
        """Copy the segments into the engine's tensors; returns the undo (the old blocks are kept only when
        a probe may need them)."""
        backup: list[torch.Tensor] | None = [] if update.probe is not None else None
        try:
            for b in self.incoming:
                apply_segments(b, update.segments[b.index], self.tensors, backup)
        except BaseException:
            if backup is not None:
                restore_segments(self.incoming, backup, self.tensors)
            raise
        return lambda: restore_segments(self.incoming, backup, self.tensors) if backup is not None else None

    def sync(self) -> int:
        """receive() then apply(): one whole update, blocking."""
        return self.apply(self.receive())

    def _run_probe(self, probe: Probe) -> None:
        got = probe_logprobs(self.engine.model, probe.token_ids, temperature=probe.temperature)
        err = float((got - probe.logprobs.to(got.dtype)).abs().max())
        self.last_probe_error = err
        if not err <= self.probe_atol:
            raise WeightSyncError(f"probe failed: the engine's log-probs of the probe sequence differ from the "
                                  f"trainer's by up to {err:.3g} (tolerance {self.probe_atol:g}); update rolled back")


def probe_source_rank(plan: SyncPlan) -> int:
    """The training rank that sends the probe: last pipeline stage, tp rank 0, dp rank 0."""
    s = plan.src
    return s.tp * s.dp * (s.pp - 1)


@torch.no_grad()
def probe_logprobs(model: CausalLM, token_ids: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs [T - 1] of tokens 1..T-1 of one sequence, on a model that holds every layer."""
    ids = token_ids.to(torch.int64)
    positions = torch.arange(ids.numel() - 1)
    hidden = model.hidden_states(ids[:-1], positions=positions)
    logprobs, _ = model.token_logprobs(hidden, ids[1:], temperature=temperature)
    return logprobs.float()


def trainer_probe(trainer: "ParallelTrainer", token_ids: torch.Tensor, *, temperature: float = 1.0) -> Probe | None:
    """Collective over the training world: the trainer's probe log-probs, returned on the probe source rank
    (None elsewhere). Pass the result to `publish(version, probe=...)` on every rank."""
    from rl_engine.policy.pipeline import MicroBatch

    ids = token_ids.to(torch.int64)
    T = ids.numel() - 1
    mb = MicroBatch(input_ids=ids[:-1], positions=torch.arange(T), cu_seqlens=torch.tensor([0, T], dtype=torch.int32),
                    targets=ids[1:], temperature=temperature)
    out = trainer.forward_logprobs([mb])
    g = trainer.groups
    if g.is_last_stage and g.tp_rank == 0 and g.dp_rank == 0 and g.cp_rank == 0:
        return Probe(token_ids=ids, logprobs=out[0][0].float(), temperature=temperature)
    return None
