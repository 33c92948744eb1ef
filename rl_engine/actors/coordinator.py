"""The coordinator: the one process that decides. It owns the dataset cursor and the prompt ledger,
hands prompts to the engines, computes rewards and advantages (dynamic sampling with refill), sends
each step's batch to the trainer group, orders the weight updates, and logs metrics and progress.

    python -m rl_engine.actors.coordinator --config RUN.yaml --port P --heartbeat-port Q [--listen-fd F
        --heartbeat-listen-fd G]  (sockets the launcher bound to P and Q)

Topology: the coordinator binds one ROUTER socket (on `placement.host`, loopback by default); every
actor connects a DEALER whose identity is its id ("trainer", "rollout-0", ...) and registers with
`Hello`. Heartbeats go to a `HeartbeatMonitor` socket served by its own thread, so a coordinator busy
with rewards never misses them. A rollout worker declared dead is retired and its in-flight prompts
are requeued on the others; a silent trainer ends the run. Under Ray with `ray.max_worker_restarts`, a
worker whose process died is started again, gets the current weights in full and serves again
(`admit_restarted`). A malformed or unexpected message gets an `ErrorReply` and a log line.

One (synchronous) step: take prompts -> `GenerateRequest`s (disaggregated: spread over the live
workers by load; colocated: one `GenerateBatch` to the trainer group) -> rewards -> drop the groups
whose rewards are all equal and refill them (dynamic sampling) -> advantages -> `TrainBatch` ->
`TrainResult` -> disaggregated: `UpdateWeights` to each live worker, `WeightsPublished` from the
trainer, `WeightsApplied` from each worker.

Main design choice: one thread and one socket; the loop is a pump of messages plus explicit waits,
so all state (ledger, actor table, answers) is touched by one thread and events happen in the order
their messages were handled. The message plumbing lives in `CoordinatorBase` (`coordinator_io.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time

import torch
import zmq

from rl_engine import protocol as P
from rl_engine import run_checkpoint
from rl_engine.actors.coordinator_io import CoordinatorBase
from rl_engine.actors.ledger import PromptLedger
from rl_engine.actors.link import load_actor_config
from rl_engine.actors.rollout_buffer import Prompt, RolloutBuffer, staleness
from rl_engine.actors.wire import samples_of, train_batch, wire_sampling
from rl_engine.auth import RunAuth
from rl_engine.config import to_dict
from rl_engine.metrics import MetricsLogger
from rl_engine.policy import ModelConfig
from rl_engine.rl_step import (PromptSource, Sample, collect_groups, dump_samples, eval_sampling_params,
                               rollout_metrics, prompt_seed, rollout_seed, sampling_params, truncate_dump)
from rl_engine.rollout.advantages import compute_advantages, filter_uniform_groups
from rl_engine.rollout.rewards import RewardComputer
from rl_engine.train_config import RLConfig

logger = logging.getLogger(__name__)


class Coordinator(CoordinatorBase):
    def __init__(self, cfg: RLConfig, *, auth: RunAuth, port: int | None = None,
                 heartbeat_port: int | None = None, listen_fd: int | None = None,
                 heartbeat_listen_fd: int | None = None) -> None:
        super().__init__(cfg, auth=auth, port=port, heartbeat_port=heartbeat_port, listen_fd=listen_fd,
                         heartbeat_listen_fd=heartbeat_listen_fd)
        model_config = ModelConfig.from_pretrained(cfg.model.path)
        self.prompts = PromptSource(cfg, model_path=cfg.model.path, data_path=cfg.data.path,
                                    eval_path=cfg.data.eval_path, eos_token_ids=model_config.eos_token_id)
        self.rewards = RewardComputer(cfg.reward)
        self.agentic = None  # rollout.fn: multi-turn sessions, their turns on the engines (agentic_turns)
        if cfg.rollout.fn is not None:
            from rl_engine.agentic_loop import AgenticRollouts

            self.agentic = AgenticRollouts(cfg, self.prompts, self.rewards)
            self.max_model_len = model_config.max_context_len
        self.ledger = PromptLedger()
        self.version = 0
        self.start_step = 0  # steps already done (a resumed run)
        self.eval_before: float | None = None
        self._stalled = False  # a step had no group to train on (dynamic sampling)
        self.stream: RolloutBuffer | None = None
        if cfg.rollout.mode == "async" and self.agentic is None:
            self.stream = RolloutBuffer()
            self.on_stream_result = self._on_stream_result
            self.on_requeue = lambda uids: self.stream.queue.extend(uids)  # the current buffer, also after a resume
            self.async_counts = {"interrupted": 0, "resumed": 0, "dropped_stale": 0, "regenerated": 0,
                                 "reward_failed": 0}
        self.resume_from = run_checkpoint.resolve_resume(cfg.train.output_dir, cfg.train.resume)
        self.agentic_stream = None  # async agentic rollouts: sessions running across steps
        if cfg.rollout.mode == "async" and self.agentic is not None:
            from rl_engine.actors.agentic_stream import AgenticStream

            self.agentic_stream = AgenticStream(self)
        if self.resume_from is not None:
            try:
                self._load_state(self.resume_from)
            except Exception:
                self.close()
                raise

    # ---- the run ----------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, out = self.cfg, self.cfg.train.output_dir
        t_start = time.perf_counter()
        self.wait_for_actors()
        if self.resume_from is not None:
            self._restore_trainer(self.resume_from)
            print(f"resumed from {self.resume_from} at step {self.start_step} (weights v{self.version})", flush=True)
        else:
            self.eval_before = self.evaluate().get("eval/accuracy")
        before = self.eval_before
        if before is not None and self.resume_from is None:
            print(f"held-out accuracy before RL: {100 * before:.1f}%", flush=True)
        t_rl = time.perf_counter()
        every = cfg.train.checkpoint_every
        resume_step = self.start_step if self.resume_from is not None else None
        if cfg.train.dump_samples:
            truncate_dump(os.path.join(out, "samples.jsonl"), step=self.start_step)
        with MetricsLogger(os.path.join(out, "metrics.jsonl"), total_steps=cfg.train.steps,
                           resume_step=resume_step, plot=cfg.metrics.plot, tensorboard=cfg.metrics.tensorboard,
                           wandb=cfg.metrics.wandb, run_config=to_dict(cfg)) as metrics, \
                MetricsLogger(os.path.join(out, "prompts.jsonl"), resume_step=resume_step, show_progress=False,
                              plot=False, tensorboard=False) as prompt_log:
            for step in range(self.start_step, cfg.train.steps):
                self.served.clear()
                if self.agentic_stream is not None:
                    row = self.agentic_stream.step(step)
                    row.update(self._accounting())
                else:
                    row = self.step_async(step) if self.stream is not None else self.step(step)
                if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
                    row.update(self.evaluate())
                metrics.log(step + 1, row)
                prompt_log.log(step + 1, self._prompt_events())
                if every and (step + 1) % every == 0 and step + 1 < cfg.train.steps:
                    self.save_checkpoint(step + 1)
                    _hold_after_checkpoint(step + 1)
        rl_seconds = time.perf_counter() - t_rl
        after = self.evaluate().get("eval/accuracy")
        if self.resume_from is not None and self.start_step == cfg.train.steps:
            checkpoint = self.resume_from  # nothing new since: never rewrite a committed checkpoint in place
        else:
            checkpoint = self.save_checkpoint(cfg.train.steps)
        summary = {"output_dir": out, "placement": cfg.placement.mode, "rollout_mode": cfg.rollout.mode,
                   "steps": cfg.train.steps, "policy_version": self.version, "rl_seconds": round(rl_seconds, 1),
                   "total_seconds": round(time.perf_counter() - t_start, 1), "checkpoint": checkpoint,
                   "resumed_from": self.resume_from, "prompts": self.ledger.counts(),
                   "unfinished_prompts": self.ledger.unfinished(), "worker_deaths": self.num_worker_deaths,
                   "worker_rejoins": self.num_worker_rejoins,
                   "protocol_errors": self.num_protocol_errors,
                   "rejected_messages": {"coordinator": self.auth.rejected, **self.worker_rejections}}
        if self.stream is not None:
            summary["async"] = dict(self.async_counts)
        if before is not None and after is not None:
            print(f"held-out accuracy after RL:  {100 * after:.1f}% ({100 * (after - before):+.1f} points, "
                  f"RL phase {rl_seconds:.0f}s)", flush=True)
            summary.update({"eval_accuracy_before": before, "eval_accuracy_after": after})
        run_checkpoint.write_json_atomic(os.path.join(out, "summary.json"), summary)
        self.shutdown_actors("run finished")
        return summary

    def _prompt_events(self) -> dict:
        """This step's prompt outcomes (prompts.jsonl): which uids were trained, which dropped and why."""
        row: dict = {"trained": []}
        for uid, outcome in self.ledger.pop_events():
            if outcome == "trained":
                row["trained"].append(uid)
            else:
                row.setdefault(outcome.replace(":", "_"), []).append(uid)
        return row

    # ---- one step ---------------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        kept, generated, stats = self.collect(step)
        metrics = rollout_metrics(generated, num_reward_failed=stats["reward_failed"],
                                  rollout_s=time.perf_counter() - t0, speculative=self.cfg.rollout.counted_speculative)
        metrics.update({"rollout/kept_groups": len(kept), "rollout/dropped_groups": stats["dropped"],
                        "rollout/refill_rounds": stats["rounds"], "rollout/refused": stats["refused"]})
        if self.agentic is not None:
            metrics.update(self.agentic.metrics())
        if kept:
            metrics.update(self.train(step, [s for grp in kept for s in grp], [grp[0].uid for grp in kept]))
        else:  # said once; `rollout/kept_groups` = 0 in the metrics says it every time
            log = logger.info if self._stalled else logger.warning
            log("step %d: no group with varied rewards after %d refill round(s); no update", step + 1, stats["rounds"])
            self._stalled = True
        metrics.update(self._accounting())
        return metrics

    def _accounting(self) -> dict[str, float]:
        """Every step's closing metrics: the prompt ledger (checked), the version, the live workers, and
        (compile_decode) the engines' decode-step compile seconds reported since the previous row."""
        counts = self.ledger.counts()
        self.ledger.check()
        out = {f"prompts/{k}": v for k, v in counts.items()}
        out["policy_version"] = self.version
        if self.cfg.rollout.compile_decode:  # the engines' compile seconds reported with this step's results
            out["rollout/decode_compile_s"], self.decode_compile_s = self.decode_compile_s, 0.0
        if self.disaggregated:
            out.update({"workers/alive": len(self.live_workers()), "workers/deaths": self.num_worker_deaths,
                        "workers/served": {name: self.served[name] for name in sorted(self.served)}})
            if self.rejoin:
                out["workers/rejoins"] = self.num_worker_rejoins
        return out

    def collect(self, step: int) -> tuple[list[list[Sample]], list[Sample], dict[str, int]]:
        """Generate and score until `prompts_per_step` groups are kept (`rl_step.collect_groups`:
        the same refill rule as the single-process trainer)."""
        r = self.cfg.rollout
        sampling = wire_sampling(sampling_params(self.cfg, step=step, eos_token_ids=self.prompts.eos_token_ids))
        refused = 0

        def take(k: int) -> list:
            items = self.prompts.dataset.take(k)
            for item in items:
                self.ledger.take(item.uid)
            return items

        def generate(items: list) -> tuple[list, int]:
            nonlocal refused
            if self.agentic is not None:
                return self._run_sessions(items, step_seed=sampling.seed)
            prompt_ids = {it.uid: self.prompts.encode(it.text) for it in items}
            results = self.generate(self.ledger, prompt_ids, sampling, n=r.n)
            answered = []
            for item in items:
                if results[item.uid].error:
                    logger.warning("prompt %s refused by the engine: %s", item.uid, results[item.uid].error)
                    self.ledger.drop(item.uid, "refused")
                    refused += 1
                else:
                    answered.append(item)
            texts = [self.prompts.decode(s.token_ids.tolist()) for it in answered for s in results[it.uid].samples]
            answers = [it.answer for it in answered for _ in results[it.uid].samples]
            outcomes, reward_stats = self.rewards.compute(texts, answers)
            scores = iter(o.score for o in outcomes)
            return [(it, samples_of(results[it.uid], prompt_ids=prompt_ids[it.uid], group=g, uid=it.uid,
                                    rewards=[next(scores) for _ in results[it.uid].samples]))
                    for g, it in enumerate(answered)], reward_stats.num_failed

        kept, generated, stats = collect_groups(self.cfg, take=take, generate=generate,
                                                drop=lambda item, reason: self.ledger.drop(item.uid, reason))
        return kept, generated, {**stats, "refused": refused}

    def _run_sessions(self, items: list, *, step_seed: int | None) -> tuple[list, int]:
        """rollout.fn: `n` sessions per item, their turns on the engines; (item, samples) per item with a
        trainable session (the others are dropped: "empty_sessions") and the number of reward failures."""
        from rl_engine.actors.agentic_turns import CoordinatorTurns

        for item in items:  # the sessions are one unit of work for the ledger
            self.ledger.complete(self.ledger.dispatch(item.uid, "sessions"), "sessions")
        turns = CoordinatorTurns(self, max_model_len=self.max_model_len)
        records = turns.run(self.agentic.sessions(items, backend=turns, n=self.cfg.rollout.n, step_seed=step_seed))
        answered, num_failed = self.agentic.groups(items, records)
        done = {item.uid for item, _ in answered}
        for item in items:
            if item.uid not in done:
                self.ledger.drop(item.uid, "empty_sessions")
        return answered, num_failed

    # ---- async mode -------------------------------------------------------------------------------
    def step_async(self, step: int) -> dict[str, float]:
        """One async step: keep `prompts_in_flight` prompts generating or buffered; train on the
        oldest `prompts_per_step` finished groups whose oldest token is at most `max_staleness`
        versions old; disaggregated, the engines go on generating while the trainer trains, and the
        weight update interrupts them (partial rollouts, continued with the new weights)."""
        r, stream = self.cfg.rollout, self.stream
        counts_before = dict(self.async_counts)
        t0 = time.perf_counter()
        kept: list[tuple[str, P.GenerateResult, list[float]]] = []
        while len(kept) < r.prompts_per_step:
            if stream.buffer:
                uid, result, rewards = stream.pop_oldest(self.version)
                if staleness(result, self.version) > r.max_staleness:
                    self._stale(uid)
                else:
                    kept.append((uid, result, rewards))
                continue
            if self.disaggregated:
                self.admit_restarted()
            self._feed(step)
            if not self.disaggregated:
                self._colocated_round(min_finished=r.prompts_per_step - len(kept))
            else:
                self.pump(0.05)
        samples = [s for g, (uid, result, rewards) in enumerate(kept)
                   for s in samples_of(result, prompt_ids=stream.prompts[uid].prompt_ids, rewards=rewards,
                                       group=g, uid=uid)]
        metrics = rollout_metrics(samples, rollout_s=time.perf_counter() - t0,
                                  num_reward_failed=self.async_counts["reward_failed"] - counts_before["reward_failed"],
                                  speculative=self.cfg.rollout.counted_speculative)
        metrics.update(self.train(step, samples, [uid for uid, _, _ in kept]))
        for uid, _, _ in kept:
            stream.forget(uid)
        metrics.update({f"async/{k}": v - counts_before[k] for k, v in self.async_counts.items()})
        metrics.update({"async/buffered_groups": len(stream.buffer), "async/partial_rollouts": len(stream.partials)})
        metrics.update(self._accounting())
        return metrics

    def _feed(self, step: int) -> None:
        """Take new prompts up to `prompts_in_flight` and (disaggregated) send everything queued."""
        r, stream = self.cfg.rollout, self.stream
        c = self.ledger.counts()
        active = c["queued"] + c["in_flight"] + c["generated"]
        if active < r.async_prompts_in_flight:
            seed = rollout_seed(self.cfg, step)
            for item in self.prompts.dataset.take(r.async_prompts_in_flight - active):
                self.ledger.take(item.uid)
                stream.add(item.uid, Prompt(self.prompts.encode(item.text), item.answer, prompt_seed(seed, item.uid)))
        if self.disaggregated:
            self._dispatch_stream()

    def _stream_request(self, uid: str, worker: str) -> P.GenerateRequest | None:
        """The request continuing `uid` (from its partial rollout, if any); None when that partial is
        already too stale to be trained and has been dropped or restarted."""
        stream, r = self.stream, self.cfg.rollout
        partial = stream.partials.get(uid)
        if partial is not None and staleness(partial, self.version) > r.max_staleness:
            self._stale(uid, requeue=False)
            if uid not in stream.prompts:  # dropped
                return None
            partial = None  # regenerated: from scratch
        prompt = stream.prompts[uid]
        params = sampling_params(self.cfg, step=0, eos_token_ids=self.prompts.eos_token_ids)
        rid = self.ledger.dispatch(uid, worker)
        if partial is not None:
            self.async_counts["resumed"] += 1
        return P.GenerateRequest(request_id=rid, sample_ids=[f"{rid}/{i}" for i in range(self.cfg.rollout.n)],
                                 prompt_token_ids=prompt.prompt_ids,
                                 sampling=wire_sampling(dataclasses.replace(params, seed=prompt.seed)),
                                 policy_version=self.version, resume=None if partial is None else partial.samples)

    def _dispatch_stream(self) -> None:
        stream = self.stream
        load = {a.id: len(self.ledger.in_flight(a.id)) for a in self.live_workers()}
        while stream.queue and load:
            uid = stream.queue.popleft()
            worker = min(load, key=lambda w: (load[w], w))
            request = self._stream_request(uid, worker)
            if request is None:
                continue
            load[worker] += 1
            try:
                self.send(worker, request)
            except zmq.ZMQError as e:  # gone without a word: the heartbeat monitor will requeue it
                logger.warning("could not send %s to %s: %s", request.request_id, worker, e)

    def _colocated_round(self, *, min_finished: int) -> None:
        """Colocated async: the trainer group's engines take every queued prompt, answer once
        `min_finished` are done, and hand the rest back as partial rollouts."""
        stream = self.stream
        requests = []
        while stream.queue:
            request = self._stream_request(stream.queue.popleft(), "trainer")
            if request is not None:
                requests.append(request)
        if not requests:
            return
        self.send("trainer", P.GenerateBatch(requests=requests, min_finished=min_finished))
        self.wait_until(lambda: not self.ledger.in_flight("trainer"), "the trainer group's generation")

    def _on_stream_result(self, sender: str, msg: P.GenerateResult) -> None:
        stream = self.stream
        uid = self.ledger.complete(msg.request_id, sender)
        if uid is None:
            logger.info("stale result %s from %s dropped", msg.request_id, sender)
            return
        if msg.error is not None:
            logger.warning("prompt %s refused by the engine: %s", uid, msg.error)
            self.ledger.drop(uid, "refused")
            stream.forget(uid)
            return
        if len(msg.samples) != self.cfg.rollout.n:
            raise RuntimeError(f"{sender} answered {msg.request_id} with {len(msg.samples)} samples, "
                               f"expected {self.cfg.rollout.n}")
        if msg.interrupted and any(s.finish_reason == "abort" for s in msg.samples):
            self.ledger.requeue(uid)
            stream.interrupted(uid, msg)
            self.async_counts["interrupted"] += 1
            return
        texts = [self.prompts.decode(s.token_ids.tolist()) for s in msg.samples]
        outcomes, reward_stats = self.rewards.compute(texts, [stream.prompts[uid].answer] * len(texts))
        self.async_counts["reward_failed"] += reward_stats.num_failed
        rewards = [o.score for o in outcomes]
        if self.cfg.rollout.dynamic_sampling and not bool(
                filter_uniform_groups(torch.tensor(rewards), torch.zeros(len(rewards), dtype=torch.long)).keep[0]):
            self.ledger.drop(uid, "uniform_rewards")
            stream.forget(uid)
            return
        stream.partials.pop(uid, None)
        stream.buffer.append((uid, msg, rewards))
        self.served[sender] += 1

    def _stale(self, uid: str, *, requeue: bool = True) -> None:
        """A sample older than `max_staleness`: dropped or generated afresh (`rollout.stale_policy`)."""
        stream = self.stream
        if self.cfg.rollout.stale_policy == "drop":
            self.ledger.drop(uid, "stale")
            stream.forget(uid)
            self.async_counts["dropped_stale"] += 1
            return
        if self.ledger.state_of(uid) == "generated":
            self.ledger.requeue(uid)
        if requeue:
            stream.regenerate(uid)
        else:  # about to be sent: only its partial rollout goes
            stream.partials.pop(uid, None)
        self.async_counts["regenerated"] += 1

    def _staleness_metrics(self, samples: list[Sample]) -> dict:
        sampled = [[v for v, m in zip(s.policy_versions, s.loss_mask) if m] for s in samples]  # not observations
        versions = torch.tensor([v for vs in sampled for v in vs], dtype=torch.int64)
        if not versions.numel():
            return {}
        ages = self.version - versions
        hist = {str(int(a)): int((ages == a).sum()) / ages.numel() for a in torch.unique(ages)}
        mixed = sum(len(set(vs)) > 1 for vs in sampled)
        return {"rollout/max_staleness": int(ages.max()), "rollout/mean_staleness": float(ages.float().mean()),
                "rollout/staleness_hist": hist,
                "rollout/tokens_per_version": {str(int(v)): int((versions == v).sum()) for v in torch.unique(versions)},
                "rollout/mixed_version_samples": mixed}

    def train(self, step: int, samples: list[Sample], uids: list[str]) -> dict[str, float]:
        """One optimizer step on `samples` (the groups of prompts `uids`), then the weight update.
        Async and disaggregated, the engines keep generating with the previous weights meanwhile and
        the update interrupts them (partial rollouts)."""
        advantages = compute_advantages(torch.tensor([s.reward for s in samples], dtype=torch.float32),
                                        torch.tensor([s.group for s in samples]), config=self.cfg.advantage)
        version = self.version + 1
        targets = {a.id: str(a.capabilities["weights_address"]) for a in self.live_workers()}
        self.send("trainer", train_batch(samples, advantages, step=step + 1, policy_version=version,
                                         weight_targets=targets))
        overlap = (self.stream is not None or self.agentic_stream is not None) and self.disaggregated
        between = None
        if overlap:  # the engines go on generating while the trainer trains
            between = self.agentic_stream.between(step) if self.agentic_stream is not None else lambda: self._feed(step)
        _, result = self.take(lambda s, m: isinstance(m, P.TrainResult) and m.policy_version == version,
                              "the trainer's TrainResult", between=between)
        metrics = dict(result.metrics)
        if self.disaggregated:
            metrics.update(self.update_workers(version, targets, interrupt=overlap))
        metrics.update(self._staleness_metrics(samples))  # all 0 in sync mode
        self.version = version
        self.ledger.trained(uids)
        if self.cfg.train.dump_samples:
            dump_samples(os.path.join(self.cfg.train.output_dir, "samples.jsonl"), samples, step=step + 1)
        return metrics

    def admit_restarted(self) -> None:
        """Restarted workers that registered again: the trainer sends them the current weights in full
        (a fresh engine holds the initial ones, which are version 0), then they take requests. Called
        between rounds of requests, never inside `train`, so the trainer is idle and publishes at once."""
        pending = {a.id: str(a.capabilities["weights_address"]) for a in self.pending_workers()}
        if not pending:
            return
        if self.version > 0:
            self.send("trainer", P.PublishWeights(version=self.version, weight_targets=pending))
            self.update_workers(self.version, pending)
        for name in pending:
            actor = self.actors[name]
            if actor.alive:
                actor.ready = True
                print(f"rollout worker {name} rejoined with weights v{self.version}", flush=True)
        self._write_actors()

    def update_workers(self, version: int, targets: dict[str, str], *, interrupt: bool = False) -> dict[str, float]:
        """Tell each target to take `version` from the trainer; wait for both sides. A worker that
        fails to take it is retired (it cannot serve the new policy). `interrupt` (async): the
        workers first hand back their partial rollouts, which arrive before their WeightsApplied."""
        for name in targets:
            if self.actors[name].alive:
                try:
                    self.send(name, P.UpdateWeights(version=version, interrupt=interrupt))
                except zmq.ZMQError as e:  # gone without a word: the heartbeat monitor will retire it
                    logger.warning("could not send UpdateWeights v%d to %s: %s", version, name, e)
        _, published = self.take(lambda s, m: isinstance(m, P.WeightsPublished) and m.version == version,
                                 "the trainer's WeightsPublished")
        for name in published.failed:
            self.retire(name, f"the trainer could not send it weights v{version}")
        applied: dict[str, P.WeightsApplied] = {}
        while True:
            waiting = [n for n in targets if self.actors[n].alive and n not in applied]
            if not waiting:
                break
            name, msg = self.take(
                lambda s, m: isinstance(m, P.WeightsApplied) and m.version == version and s in waiting,
                f"WeightsApplied v{version} from {waiting}",
                until=lambda: not any(self.actors[n].alive for n in waiting))
            if msg is None:
                continue
            applied[name] = msg
            self.worker_rejections[name] = msg.rejected_messages
            if not msg.ok:
                self.retire(name, f"it refused weights v{version}: {msg.error}")
        probes = [m.probe_error for m in applied.values() if m.probe_error is not None]
        out = {"perf/weight_sync_s": published.seconds,
               "perf/weight_apply_s": max((m.seconds for m in applied.values()), default=0.0)}
        if probes:
            out["weight_sync/probe_error_max"] = max(probes)
        return out

    # ---- evaluation and checkpoints ---------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Greedy accuracy (mean reward) on the held-out prompts, generated by the engines."""
        items = self.prompts.eval_items
        if not items:
            return {}
        if self.agentic is not None:
            from rl_engine.actors.agentic_turns import CoordinatorTurns

            turns = CoordinatorTurns(self, max_model_len=self.max_model_len)
            return {"eval/accuracy": self.agentic.accuracy(items, backend=turns, run=turns.run)}
        ledger = PromptLedger()
        prompts = {}
        for i, item in enumerate(items):
            ledger.take(f"eval:{i}")
            prompts[f"eval:{i}"] = self.prompts.encode(item.text)
        sampling = wire_sampling(eval_sampling_params(self.cfg, eos_token_ids=self.prompts.eos_token_ids))
        results = self.generate(ledger, prompts, sampling, n=1)
        texts = [self.prompts.decode(res.samples[0].token_ids.tolist()) if res.samples else ""
                 for res in (results[f"eval:{i}"] for i in range(len(items)))]
        outcomes, _ = self.rewards.compute(texts, [it.answer for it in items])
        return {"eval/accuracy": sum(o.score for o in outcomes) / len(outcomes)}

    def save_checkpoint(self, step: int) -> str:
        """`checkpoints/step_<k>/`: the trainer's sharded checkpoint (model, optimizer, RNG), this
        coordinator's state (dataset cursor, ledger, version) and, in async mode, the rollout buffer
        with its partial rollouts; committed (`run_checkpoint.commit`) once every part is on disk."""
        out = self.cfg.train.output_dir
        path = run_checkpoint.step_dir(out, step)
        trainer_path = os.path.join(path, "trainer")
        self.send("trainer", P.SaveCheckpoint(path=trainer_path, step=step))
        self.take(lambda s, m: isinstance(m, P.Ack) and m.ref == f"checkpoint:{trainer_path}",
                  "the trainer's checkpoint")
        if self.stream is not None:
            run_checkpoint.write_bytes_atomic(os.path.join(path, "rollout_buffer.msgpack"), self.stream.to_bytes())
        run_checkpoint.write_json_atomic(os.path.join(path, "coordinator_state.json"), {
            "step": step, "policy_version": self.version, "rollout_mode": self.cfg.rollout.mode,
            "dataset": self.prompts.dataset.state_dict(), "ledger": self.ledger.state_dict(),
            "eval_before": self.eval_before, "async_counts": getattr(self, "async_counts", None)})
        return run_checkpoint.commit(out, step, keep=self.cfg.train.keep_checkpoints)

    def _load_state(self, path: str) -> None:
        state_file = os.path.join(path, "coordinator_state.json")
        if not os.path.isfile(state_file):
            raise FileNotFoundError(f"{path} has no coordinator_state.json: not a checkpoint of an actors run")
        with open(state_file) as f:
            state = json.load(f)
        if state["rollout_mode"] != self.cfg.rollout.mode:
            raise ValueError(f"{path} was written by a rollout.mode={state['rollout_mode']} run; resume it with that "
                             f"mode (got rollout.mode={self.cfg.rollout.mode})")
        if state["step"] > self.cfg.train.steps:
            raise ValueError(f"{path} is at step {state['step']}, past train.steps={self.cfg.train.steps}")
        self.start_step, self.version = int(state["step"]), int(state["policy_version"])
        self.prompts.dataset.load_state_dict(state["dataset"])
        self.ledger.load_state_dict(state["ledger"])
        self.eval_before = state["eval_before"]
        if self.stream is not None:
            buffer_file = os.path.join(path, "rollout_buffer.msgpack")
            with open(buffer_file, "rb") as f:
                self.stream = RolloutBuffer.from_bytes(f.read(), source=buffer_file)
            self.async_counts = dict(state["async_counts"])
        # The engines that had these are gone: send them again (continued from their partial rollout).
        requeued = self.ledger.requeue_in_flight()
        if self.stream is not None:
            self.stream.queue.extend(u for u in requeued if u not in self.stream.queue)
        elif requeued:
            raise ValueError(f"{path}: a sync checkpoint with prompts in flight ({requeued[:3]}...)")

    def _restore_trainer(self, path: str) -> None:
        """Load the trainer's half of the checkpoint; put the weights into the rollout workers."""
        trainer_path = os.path.join(path, "trainer")
        targets = {a.id: str(a.capabilities["weights_address"]) for a in self.live_workers()}
        publish = self.disaggregated and self.version > 0
        self.send("trainer", P.LoadCheckpoint(path=trainer_path, policy_version=self.version,
                                              weight_targets=targets if publish else {}))
        self.take(lambda s, m: isinstance(m, P.Ack) and m.ref == f"load:{trainer_path}", "the trainer's resume")
        if publish:
            self.update_workers(self.version, targets)

    def close(self) -> None:
        if getattr(self, "agentic_stream", None) is not None:
            self.agentic_stream.close()
        self.rewards.close()
        super().close()


HOLD_AFTER_CHECKPOINT_ENV = "RL_ENGINE_TEST_HOLD_AFTER_CHECKPOINT"


def _hold_after_checkpoint(step: int) -> None:
    """Fault injection (tests): with RL_ENGINE_TEST_HOLD_AFTER_CHECKPOINT=k in its environment (under Ray:
    `ray.runtime_env={env_vars: {...}}`), the coordinator stops for good once checkpoint k is committed,
    until its process is ended: a test that kills the run after checkpoint k then finds exactly k
    committed, however long the kill and the processes' end take (a resumed run never commits k again)."""
    if os.environ.get(HOLD_AFTER_CHECKPOINT_ENV) != str(step):
        return
    logger.warning("fault injection: %s=%d: holding after the checkpoint until this process is ended",
                   HOLD_AFTER_CHECKPOINT_ENV, step)
    while True:
        time.sleep(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rl_engine.actors.coordinator")
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--heartbeat-port", type=int, required=True)
    # Listening sockets the launcher bound to those ports and passed down (rl_engine.launch.ports).
    parser.add_argument("--listen-fd", type=int)
    parser.add_argument("--heartbeat-listen-fd", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s coordinator %(levelname)s %(name)s: %(message)s")
    auth = RunAuth.from_env()
    cfg = load_actor_config(args.config)
    coordinator = Coordinator(cfg, auth=auth, port=args.port, heartbeat_port=args.heartbeat_port,
                              listen_fd=args.listen_fd, heartbeat_listen_fd=args.heartbeat_listen_fd)
    try:
        coordinator.run()
    finally:
        coordinator.close()


if __name__ == "__main__":
    main()
