"""The trainer group: torch.distributed ranks training the policy with `ParallelTrainer` (tp/pp/dp/ep
from the config). Rank 0 talks to the coordinator; every command it takes is broadcast to the group
(protocol-encoded, no pickle), so all ranks run the same sequence of collectives.

    python -m rl_engine.actors.trainer_group --config RUN.yaml --coordinator ADDR --heartbeat ADDR
    (one process per rank; RANK, WORLD_SIZE, MASTER_ADDR/PORT come from the launcher)

Commands: `TrainBatch` (pack this dp rank's micro-batches, `train_step` with the shared `StepLoss`,
publish the new weights), `GenerateBatch` (colocated; in async mode with `min_finished`, the rest
answered as interrupted partial rollouts), `SaveCheckpoint`, `LoadCheckpoint` (resume: load, then
put the weights in the engines or publish them), `Shutdown`.

Colocated, the choice made here: every tp rank of a data-parallel group runs an engine over its own
shards, in lockstep on the same requests and seeds (requests are split over the dp groups). The
engines' tensor-parallel collectives then pair up as in training and nothing is gathered or copied;
weight_sync's in-process transport checks every step that each engine still reads the trainer's
storage (zero copy). Lockstep needs the engine to be deterministic across the tp ranks: it is (the
scheduler decides from identical inputs, logits are all-gathered so every rank samples from identical
bytes with the same per-request seeds), and every generation ends with a digest of the outputs
all-gathered over the tp group, so a divergence stops the run instead of silently desynchronising
the collectives. The alternative, gathering full weights onto tp rank 0 for a tp=1 engine, copies the
model every step, holds a second copy and leaves the other tp ranks idle while it generates.

Disaggregated: after a step every rank publishes its own shards to each live rollout worker (one
plan for tp=1 engines, `WeightPublisher` over `ZmqSenderTransport`), with a log-prob probe when
`placement.verify_probe`; failures are agreed over the world and reported in `WeightsPublished`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from rl_engine import protocol as P
from rl_engine.actors.group_comm import broadcast_message, recv_messages, reduce_metrics_over, send_messages
from rl_engine.actors.link import CoordinatorLink, load_actor_config, max_message_bytes
from rl_engine.auth import RunAuth
from rl_engine.frozen_models import reference_path
from rl_engine.launch.rendezvous import init_process_group_from_env
from rl_engine.actors.wire import add_to_engine, engine_sampling, generate_result, samples_from_batch
from rl_engine.losses import PolicyLoss
from rl_engine.policy import OptimizerConfig, ParallelGroups, ParallelTrainer
from rl_engine.policy.frozen import FrozenPolicy
from rl_engine.rl_step import (DecodeCompileSeconds, StepLoss, aggregate_updates, apply_distillation,
                               apply_kl_reward_penalty, attach_logprobs, beyond_target_kl, build_micro_batches,
                               micro_batch_count, mini_batch_normalizer, shared_prefix_min_group,
                               split_mini_batches, step_lr)
from rl_engine.serve.host import start_run_server
from rl_engine.train_config import RLConfig
from rl_engine.weight_sync import (EngineLayout, InProcessTransport, SharedMemorySenderTransport, TrainLayout,
                                   WeightPublisher, WeightReceiver, WeightSyncError, ZmqSenderTransport, plan_sync,
                                   trainer_probe)

logger = logging.getLogger(__name__)
PROBE_TOKENS = 64


class TrainerGroup:
    def __init__(self, cfg: RLConfig, *, auth: RunAuth, coordinator: str, heartbeat: str) -> None:
        self.cfg = cfg
        self.weights_signer = auth.signer("weights")
        p, t, o = cfg.placement, cfg.train, cfg.optim
        self.colocated = p.mode == "colocated"
        self.groups = g = ParallelGroups.build(tp=t.tp, cp=t.cp, pp=t.pp, ep=t.ep, dp=t.dp)
        self.dtype = getattr(torch, cfg.model.dtype)
        self.trainer = ParallelTrainer.from_pretrained(
            cfg.model.path, groups=g, dtype=self.dtype, seed=t.seed,
            optim=OptimizerConfig(lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                  clip_grad=o.grad_clip or None),
            cp_comm=t.cp_comm, cp_min_tokens=t.cp_min_tokens)
        config = self.trainer.config
        # The frozen reference, sharded like the trainer. Its default, the initial policy, is model.path:
        # the launcher points that at the warm-started weights (train_cli checked ref.path's tokenizer).
        ref_path = reference_path(cfg, initial_policy_path=cfg.model.path)
        self.ref = None if ref_path is None else FrozenPolicy.from_pretrained(
            ref_path, groups=g, dtype=self.dtype, offload=cfg.ref.offload == "cpu")
        teacher = cfg.distill.teacher_path
        self.teacher = None if teacher is None else FrozenPolicy.from_pretrained(
            teacher, groups=g, dtype=self.dtype, offload=cfg.distill.offload == "cpu")
        self.policy_loss = PolicyLoss(cfg.loss)
        self.lr = step_lr(cfg)  # optim.lr_scheduler / warmup / KL-adaptive scale, per RL step (as GRPOTrainer)
        self.moe_layers = sorted(config.moe_layers) if cfg.rollout.routing_replay else None
        self.version = 0
        src = TrainLayout.of(g, dtype=self.dtype)
        bucket_bytes = p.weight_bucket_mb << 20
        if self.colocated:
            from rl_engine.inference import LLM

            r = cfg.rollout
            tokenizer = None
            if p.serve_port is not None:  # served text needs it; built as the single-process run's (same EOS ids)
                from rl_engine.policy.tokenizer import Tokenizer

                tokenizer = Tokenizer.from_pretrained(cfg.model.path, eos_token_ids=config.eos_token_id or None)
            # cpu_threads fixed: the engine shares this process with training, and a thread count that followed
            # the machine's load would be left to training too, making a run's numbers depend on the load
            self.llm = LLM(self.trainer.chunks[0], tokenizer=tokenizer, kv_cache_memory=r.kv_cache_memory_mb << 20,
                           max_num_batched_tokens=r.max_num_batched_tokens, seed=t.seed,
                           record_routing=r.routing_replay, speculative_config=r.speculative,
                           cpu_threads="fixed", cpu_prepack_weights=False,  # the fp32 log-prob contract (config.py)
                           cpu_decode_kernel=r.cpu_decode_kernel, compile_decode=r.compile_decode,
                           fork_copy_partial_block=r.fork_copy_partial_block)
            self.decode_compile = DecodeCompileSeconds(self.llm.engine)  # reported on the results (compile_decode)
            # Engine rank = replica * tp + tp_rank = this training rank (pp = 1): each reads its own shards.
            # Under context parallelism every cp rank holds a whole replica: dp x cp engines, none using cp.
            plan = plan_sync(config, src=src, dst=EngineLayout(tp=t.tp, replicas=t.dp * t.cp, dtype=self.dtype),
                             bucket_bytes=bucket_bytes, colocated={rank: rank for rank in range(g.world_size)})
            inproc = InProcessTransport(zero_copy=True)
            self.receiver = WeightReceiver(self.llm.engine, plan, dst_rank=g.world_rank, transport=inproc,
                                           engine_group=g.tp_group)
            self.publisher = WeightPublisher(self.trainer.chunks, plan, src_rank=g.world_rank, transport=inproc)
        else:
            self.worker_plan = plan_sync(config, src=src, dst=EngineLayout(tp=1, replicas=1, dtype=self.dtype),
                                         bucket_bytes=bucket_bytes)
            self.publishers: dict[str, WeightPublisher] = {}
            self.publisher_addresses: dict[str, str] = {}  # the weights address each publisher sends to
        if cfg.model.batch_invariant and g.world_size > 1:
            agree_on_kernels(g.world_size)  # the colocated engines run in these processes: same choice
        pids = torch.tensor([os.getpid()], dtype=torch.int64)
        if g.world_size > 1:
            every = [torch.zeros_like(pids) for _ in range(g.world_size)]
            dist.all_gather(every, pids)
            pids = torch.cat(every)
        self.link = None
        if g.world_rank == 0:
            self.link = CoordinatorLink(coordinator, auth=auth, actor_id="trainer", role="trainer",
                                        heartbeat_address=heartbeat, heartbeat_interval_s=p.heartbeat_interval_s,
                                        max_frame_bytes=max_message_bytes(cfg),
                                        capabilities={"world_size": g.world_size, "placement": p.mode,
                                                      "rank_pids": ",".join(str(x) for x in pids.tolist()),
                                                      "engines": t.dp if self.colocated else 0})
        self.commands = ((P.GenerateBatch,) if self.colocated else (P.PublishWeights,)) + (
            P.TrainBatch, P.SaveCheckpoint, P.LoadCheckpoint, P.Shutdown)

    # ---- the command loop -------------------------------------------------------------------------
    def serve(self) -> None:
        # placement.serve_port (colocated, tp = 1): rank 0's engine answers the OpenAI API; every command
        # (generation, training that changes the weights it reads, weight updates) holds the engine's lock.
        server = None
        if self.colocated and self.groups.world_rank == 0:
            server = start_run_server(self.cfg, self.llm.engine, name="trainer-0")
        try:
            while True:
                msg = self._next_command()
                if isinstance(msg, P.Shutdown):
                    logger.info("trainer rank %d: shutdown (%s)", self.groups.world_rank, msg.reason)
                    return
                with server.lock if server is not None else contextlib.nullcontext():
                    self._run_command(msg)
        finally:
            if server is not None:
                server.close()

    def _run_command(self, msg: P.Message) -> None:
        if isinstance(msg, P.TrainBatch):
            self._train(msg)
        elif isinstance(msg, P.GenerateBatch):
            self._generate(msg)
        elif isinstance(msg, P.SaveCheckpoint):
            self.trainer.save_checkpoint(msg.path, extra={"policy_version": self.version, "step": msg.step,
                                                          "lr": self.lr.state_dict()})
            self._send(P.Ack(ref=f"checkpoint:{msg.path}"))
        elif isinstance(msg, P.LoadCheckpoint):
            self._load(msg)
        elif isinstance(msg, P.PublishWeights):  # a restarted rollout worker rejoins
            if msg.version != self.version:
                raise RuntimeError(f"asked to publish weights v{msg.version}, the trainer holds v{self.version}")
            self._publish(dict(msg.weight_targets),
                          torch.arange(min(PROBE_TOKENS, self.trainer.config.vocab_size)))

    def _load(self, msg: P.LoadCheckpoint) -> None:
        extra = self.trainer.load_checkpoint(msg.path).get("extra", {})
        saved = int(extra.get("policy_version", -1))
        if saved != msg.policy_version:
            raise RuntimeError(f"checkpoint {msg.path} holds weights v{saved}, the coordinator's state says "
                               f"v{msg.policy_version}: the two halves of the checkpoint disagree")
        self.version = saved
        self.lr.load_state_dict(extra["lr"] if "lr" in extra else {})  # absent: a checkpoint from before schedules
        if self.colocated:
            self.publisher.publish(self.version)
            self.receiver.sync()
        self._send(P.Ack(ref=f"load:{msg.path}"))
        if not self.colocated and msg.weight_targets:
            self._publish(dict(msg.weight_targets), torch.arange(min(PROBE_TOKENS, self.trainer.config.vocab_size)))

    def _next_command(self) -> P.Message:
        msg = None
        if self.link is not None:
            while msg is None:
                msg = self.link.receive(200, expected=self.commands)
        return broadcast_message(msg, src=0)

    def _send(self, msg: P.Message) -> None:
        if self.link is not None:
            self.link.send(msg)

    # ---- training ---------------------------------------------------------------------------------
    def _train(self, batch: P.TrainBatch) -> None:
        """`train.mini_batches_per_step` updates per epoch, `train.epochs_per_step` epochs (as
        `GRPOTrainer.train_on`); the proximal log-probs are computed once, before the first update."""
        cfg, g = self.cfg, self.groups
        samples, advantages = samples_from_batch(batch)
        pack = cfg.train.pack_sequences
        share = shared_prefix_min_group(cfg)
        if g.cp_size > 1:  # shared-prefix micro-batches have no context-parallel form: samples whole
            share = None
        plans, sizes = [], []
        for mini_samples, mini_advantages in split_mini_batches(samples, advantages,
                                                                count=cfg.train.mini_batches_per_step):
            sizes.append(len(mini_samples))
            pad = None
            if g.ep_size > 1:  # expert parallelism: every rank of an ep group runs the same number of passes
                pad = micro_batch_count(mini_samples, micro_batch_tokens=cfg.train.micro_batch_tokens * g.cp_size,
                                        dp_size=g.dp_size, pack=pack, shared_prefix_min_group=share)
            # train.micro_batch_tokens is the budget per cp rank: a micro-batch's tokens are split over cp
            micro_batches = build_micro_batches(mini_samples, mini_advantages,
                                                micro_batch_tokens=cfg.train.micro_batch_tokens * g.cp_size,
                                                temperature=cfg.rollout.temperature, dp_size=g.dp_size,
                                                dp_rank=g.dp_rank, pack=pack, moe_layers=self.moe_layers,
                                                pad_to_count=pad, shared_prefix_min_group=share)
            plans.append((micro_batches, mini_batch_normalizer(mini_samples, cfg)))
        t0 = time.perf_counter()
        if self.ref is not None:  # the reference's log-probs, in the same micro-batches (on the last stage)
            for micro_batches, _ in plans:
                attach_logprobs(micro_batches, self.ref.forward_logprobs(micro_batches), key="ref")
        decoupled = len(plans) * cfg.train.epochs_per_step > 1
        if decoupled or cfg.loss.kl_in_reward:  # the proximal policy, once per step (last stage only)
            for micro_batches, _ in plans:
                attach_logprobs(micro_batches, [lp for lp, _ in self.trainer.forward_logprobs(micro_batches)],
                                key="proximal")
        penalty = None
        if cfg.loss.kl_in_reward:  # as GRPOTrainer.train_on, each sample's KL summed over the ranks
            if batch.rewards is None or batch.groups is None:
                raise P.ProtocolError("loss.kl_in_reward needs the TrainBatch's rewards and groups; this one has none")
            # every cp rank scores whole micro-batches (gathered log-probs): cp rank 0 counts them
            contributes = g.is_last_stage and g.tp_rank == 0 and g.cp_rank == 0

            def over_ranks(kl: torch.Tensor) -> torch.Tensor:
                kl = kl if contributes else torch.zeros_like(kl)
                if dist.is_initialized() and dist.get_world_size(g.world_group) > 1:
                    dist.all_reduce(kl, group=g.world_group)
                return kl

            penalty = apply_kl_reward_penalty([m for m, _ in plans], sizes, batch.rewards,
                                              batch.groups, cfg, reduce=over_ranks)
        if self.teacher is not None:  # as GRPOTrainer.train_on
            for micro_batches, _ in plans:
                attach_logprobs(micro_batches, self.teacher.forward_logprobs(micro_batches), key="teacher")
            apply_distillation([m for m, _ in plans], coef=cfg.distill.coef,
                               with_reward=cfg.distill.mode == "reverse_kl+reward")
        keys = StepLoss.metric_keys(self.policy_loss, proximal=decoupled or cfg.loss.kl_in_reward,
                                    ref=self.ref is not None, distill=self.teacher is not None)
        per_update = []
        # The lr of this step (batch.step counts from 1); every rank computes the same, the KL it adapts
        # to being reduced over the world.
        lr = self.trainer.optimizer.lr = self.lr.lr(batch.step - 1)
        last_kl = None
        updates = [plan for _ in range(cfg.train.epochs_per_step) for plan in plans]
        for k, (micro_batches, normalizer) in enumerate(updates):
            loss = StepLoss(self.policy_loss, normalizer)
            reduced: dict[str, float] = {}

            def apply() -> bool:  # PPO's KL early stop, decided on the metrics summed over the ranks
                reduced.update(reduce_metrics_over(loss.metrics(), keys, group=g.world_group,
                                                   contributes=g.is_last_stage and g.tp_rank == 0 and g.cp_rank == 0))
                return not beyond_target_kl(k, reduced, cfg.train.target_kl)

            stats = self.trainer.train_step(micro_batches, loss, apply=apply)
            if k > 0:
                last_kl = float(reduced["approx_kl"])
            if not stats["applied"]:
                break
            per_update.append({**reduced, "grad_norm": stats["grad_norm"], "micro_batches": stats["num_micro_batches"]})
        train_s = time.perf_counter() - t0
        self.version = batch.policy_version
        out = {f"train/{k}": v for k, v in aggregate_updates(per_update, mini_batches=len(plans)).items()}
        if penalty is not None:
            out["train/kl_reward_penalty"] = penalty
        if cfg.train.target_kl is not None:
            out["train/skipped_updates"] = float(len(updates) - len(per_update))
        if self.lr.varies:
            out["train/lr"] = lr
        self.lr.observe(last_kl)
        out.update({"perf/train_s": train_s,
                    "perf/train_tokens_per_s": sum(len(s.input_ids) for s in samples) / max(train_s, 1e-9)})
        if self.colocated:
            t1 = time.perf_counter()
            self.publisher.publish(self.version)  # zero copy: checks the engine still reads our tensors
            self.receiver.sync()
            out["perf/weight_sync_s"] = time.perf_counter() - t1
        self._send(P.TrainResult(step=batch.step, policy_version=self.version, metrics=out))
        if not self.colocated:
            tokens = samples[0].input_ids + samples[0].targets[-1:]
            self._publish(dict(batch.weight_targets), torch.tensor(tokens[:PROBE_TOKENS]))

    def _publish(self, targets: dict[str, str], probe_ids: torch.Tensor) -> None:
        """Every rank sends its shards to every target worker; the failures are agreed over the world."""
        t0 = time.perf_counter()
        probe = None
        if self.cfg.placement.verify_probe:
            probe = trainer_probe(self.trainer, probe_ids, temperature=self.cfg.rollout.temperature)
        names = sorted(targets)
        failed = torch.zeros(len(names), dtype=torch.int64)
        for i, name in enumerate(names):
            publisher = self.publishers.get(name)
            if publisher is not None and self.publisher_addresses.get(name) != targets[name]:  # a restarted worker
                self.publishers.pop(name).transport.close()
                publisher = None
            if publisher is None:
                address = targets[name]  # "shm+tcp://..." from a worker staging in shared memory
                shm = address.startswith("shm+")
                sender_cls = SharedMemorySenderTransport if shm else ZmqSenderTransport
                transport = sender_cls({0: address[4:] if shm else address}, signer=self.weights_signer,
                                       timeout_s=self.cfg.placement.weight_sync_timeout_s)
                publisher = self.publishers[name] = WeightPublisher(self.trainer.chunks, self.worker_plan,
                                                                    src_rank=self.groups.world_rank,
                                                                    transport=transport)
                self.publisher_addresses[name] = targets[name]
            try:
                publisher.publish(self.version, probe=probe)
            except (WeightSyncError, ValueError) as e:
                logger.warning("weights v%d to %s failed: %s", self.version, name, e)
                failed[i] = 1
        if dist.is_initialized() and self.groups.world_size > 1:
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        for name, bad in zip(names, failed.tolist()):
            if bad:  # that worker is gone or refused: forget it (a new publisher would start afresh)
                self.publishers.pop(name).transport.close()
        self._send(P.WeightsPublished(version=self.version, failed=[n for n, b in zip(names, failed.tolist()) if b],
                                      seconds=time.perf_counter() - t0))

    # ---- colocated generation ---------------------------------------------------------------------
    def _generate(self, batch: P.GenerateBatch) -> None:
        g = self.groups
        mine = batch.requests[g.dp_cp_rank::g.dp_cp_size]  # every cp rank is an engine replica too
        if batch.min_finished or any(req.resume is not None for req in mine):
            results = self._generate_partial(mine, -(-batch.min_finished // g.dp_cp_size))
        else:
            results, prompts, params, accepted = [], [], [], []
            for req in mine:
                try:
                    params.append(engine_sampling(req.sampling, n=len(req.sample_ids)))
                except ValueError as e:
                    results.append(P.GenerateResult(request_id=req.request_id, samples=[], error=str(e)))
                    continue
                prompts.append(list(req.prompt_token_ids))
                accepted.append(req)
            outs = self.llm.generate(prompts, params) if prompts else []
            results += [generate_result(req, out) for req, out in zip(accepted, outs)]
        self._check_lockstep(results)
        if g.tp_rank != 0:
            return
        if results:  # this engine's compile seconds ride on its first result (after the lockstep check: the
            # tp ranks' clocks differ); with no result they wait for the next round's
            results[0].decode_compile_s = self.decode_compile.take()
        if g.dp_cp_rank != 0:
            send_messages(results, dst=0)
            return
        for d in range(1, g.dp_cp_size):
            results += recv_messages(src=d * g.tp_size)  # the leader of dp group d (pp = 1)
        for result in results:
            self._send(result)

    def _generate_partial(self, requests: list[P.GenerateRequest], min_finished: int) -> list[P.GenerateResult]:
        """Async: step this engine until `min_finished` of `requests` are finished (0: all) and so is
        every request continued from an earlier round, then interrupt the others (partial rollouts,
        continued after the next update). A request is thus interrupted at most once: waiting only
        for the first `min_finished` would favour short completions round after round and leave the
        long ones to age past the staleness bound and be dropped, biasing what is trained."""
        engine = self.llm.engine
        results, pending, resumed = [], {}, set()
        for req in requests:
            try:
                add_to_engine(engine, req)
            except ValueError as e:
                results.append(P.GenerateResult(request_id=req.request_id, samples=[], error=str(e)))
                continue
            pending[req.request_id] = req
            if req.resume is not None:
                resumed.add(req.request_id)
        target = min(min_finished or len(pending), len(pending))
        done = 0
        while engine.has_unfinished_requests() and (done < target or resumed):
            for out in engine.step():
                if out.finished:
                    results.append(generate_result(pending.pop(out.request_id), out))
                    resumed.discard(out.request_id)
                    done += 1
        results += [generate_result(pending.pop(out.request_id), out, interrupted=True) for out in engine.interrupt()]
        return results

    def _check_lockstep(self, results: list[P.GenerateResult]) -> None:
        """The tp ranks of one engine must have produced identical outputs (see the module docstring)."""
        g = self.groups
        if g.tp_size == 1:
            return
        h = hashlib.blake2b(digest_size=8)
        for r in results:
            h.update(r.request_id.encode())
            for s in r.samples:
                h.update(s.token_ids.numpy().tobytes())
                h.update(s.behavior_logprobs.numpy().tobytes())
        mine = torch.tensor([int.from_bytes(h.digest(), "little", signed=True)], dtype=torch.int64)
        every = [torch.zeros_like(mine) for _ in range(g.tp_size)]
        dist.all_gather(every, mine, group=g.tp_group)
        if any(int(x) != int(mine) for x in every):
            raise RuntimeError("the tensor-parallel ranks of a colocated engine generated different outputs; "
                               "their engines are no longer in lockstep (nondeterministic kernels?)")

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
        for publisher in getattr(self, "publishers", {}).values():
            publisher.transport.close()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup short
    raise SystemExit(128 + signum)


def agree_on_kernels(world_size: int) -> None:
    """Every rank's batch-invariant kernel choice, gathered over the default group; `KernelMismatch` on
    every rank unless they agree (a rank that could not build the C++ kernels would compute other bits)."""
    from rl_engine.kernels.invariant import check_same_kernels, kernel_choice

    size = 2048  # bytes of one rank's JSON choice, zero-padded (a fixed shape for all_gather)
    identity, reason = kernel_choice()
    mine = json.dumps([identity, reason]).encode()
    while len(mine) > size:  # a long reason is cut (by bytes: a non-ASCII character takes up to 6 escaped)
        reason = reason[:len(reason) // 2]
        mine = json.dumps([identity, reason]).encode()
    every = [torch.zeros(size, dtype=torch.uint8) for _ in range(world_size)]
    dist.all_gather(every, torch.frombuffer(bytearray(mine.ljust(size, b"\0")), dtype=torch.uint8))
    check_same_kernels({f"trainer rank {rank}": tuple(json.loads(bytes(t.tolist()).rstrip(b"\0")))
                        for rank, t in enumerate(every)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rl_engine.actors.trainer_group")
    parser.add_argument("--config", required=True)
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--heartbeat", required=True)
    args = parser.parse_args(argv)
    # The launcher stops the ranks with SIGTERM: exit through the `finally` below (sockets, mappings of
    # the workers' staging regions, the process group) rather than die where the signal lands.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s trainer{rank} %(levelname)s %(name)s: %(message)s")
    auth = RunAuth.from_env()
    cfg = load_actor_config(args.config)
    init_process_group_from_env("gloo", timeout=timedelta(seconds=cfg.placement.dist_timeout_s))
    group = None
    try:
        group = TrainerGroup(cfg, auth=auth, coordinator=args.coordinator, heartbeat=args.heartbeat)
        group.serve()
    finally:
        if group is not None:
            group.close()
        dist.destroy_process_group()
    # A clean shutdown leaves without the interpreter's teardown: in fresh-clone CI runs, colocated tp2
    # ranks that had shut down cleanly were aborted there ("terminate called without an active
    # exception", a C++ thread still joinable at exit; root cause not found). Errors above still raise.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
