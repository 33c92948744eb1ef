"""Async agentic rollouts (`rollout.fn` with `rollout.mode=async`, colocated or disaggregated).

The sessions of up to `rollout.prompts_in_flight` prompts run all the time in one persistent event
loop of the coordinator's thread, ticked between its waits (while the trainer trains, too); each step
trains on the oldest `prompts_per_step` finished groups whose oldest sampled token is at most
`max_staleness` versions old (older ones are dropped, or their sessions started again, by
`rollout.stale_policy`). A weight update reaches a session between turns (its next turn samples with
the new weights) or inside one (disaggregated: the update interrupts the turns in flight, which are
sent again with their partial output and continue with the new weights; colocated: the trainer group
finishes a batch of turns before it trains). Every token keeps the version that sampled it.

Turns go out as `CoordinatorTurns` sends them; their answers arrive through the coordinator's
`on_stream_result` hook (its current round is left to evaluations), and the turns of a worker that
was retired are sent again to the others.

Not supported yet: resuming an async agentic run from a checkpoint (the sessions in flight are
coroutines, not state a checkpoint holds); it is refused at start.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from rl_engine import protocol as P
from rl_engine.actors.agentic_turns import CoordinatorTurns
from rl_engine.rl_step import Sample, rollout_metrics, rollout_seed

logger = logging.getLogger(__name__)


class AgenticStream:
    def __init__(self, coordinator) -> None:
        c = coordinator
        if c.resume_from is not None:
            raise ValueError(f"train.resume: resuming an async agentic run (rollout.fn with rollout.mode=async) is not "
                             f"supported yet ({c.resume_from}); start a new run or use rollout.mode=sync")
        self.c = c
        self.loop = asyncio.new_event_loop()
        self.turns = CoordinatorTurns(c, max_model_len=c.max_model_len)
        self.running: dict[str, tuple[object, asyncio.Task]] = {}  # uid -> (item, its sessions' task)
        self.finished: deque[tuple[str, list[Sample], int]] = deque()  # (uid, samples, reward failures)
        self.items: dict[str, object] = {}  # uid -> item, of every prompt running or finished
        self.request_ids: dict[str, str] = {}  # uid -> its sessions' ledger request id
        self.counts = {"dropped_stale": 0, "regenerated": 0, "reward_failed": 0, "interrupted_turns": 0}
        c.on_stream_result = self._on_result

    # ---- the coordinator's hooks --------------------------------------------------------------------
    def _on_result(self, sender: str, msg: P.GenerateResult) -> None:
        rnd = self.turns.round
        key = rnd.ledger.complete(msg.request_id, sender)
        if key is None:
            logger.info("stale turn result %s from %s dropped", msg.request_id, sender)
            return
        rnd.results[key] = msg

    def tick(self, step: int) -> None:
        """Start sessions up to prompts_in_flight, send their turns, take answers, let them run."""
        self._feed(step)
        c, rnd = self.c, self.turns.round
        for actor in c.actors.values():  # turns on a retired worker go to the others
            if not actor.alive and rnd.ledger.in_flight(actor.id):
                rnd.pending.extend(rnd.ledger.requeue_worker(actor.id))
        before = self.turns.num_interrupted
        self.turns.poll()
        self.counts["interrupted_turns"] += self.turns.num_interrupted - before
        self.loop.run_until_complete(asyncio.sleep(0.002))
        for uid, (item, task) in list(self.running.items()):
            if task.done():
                del self.running[uid]
                self._finish(uid, item, task.result())

    # ---- one step ---------------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        c, r = self.c, self.c.cfg.rollout
        t0 = time.perf_counter()
        counts_before = dict(self.counts)
        kept: list[tuple[str, list[Sample]]] = []
        while len(kept) < r.prompts_per_step:
            if self.finished:
                uid, samples, _ = self.finished.popleft()
                oldest = min(v for s in samples for v, m in zip(s.policy_versions, s.loss_mask) if m)
                if c.version - oldest > r.max_staleness:
                    self._stale(uid)
                else:
                    kept.append((uid, samples))
                continue
            self.tick(step)
            c.pump(0.002)
        samples = []
        for g, (_, group) in enumerate(kept):
            for s in group:
                s.group = g
                samples.append(s)
        metrics = rollout_metrics(samples, rollout_s=time.perf_counter() - t0,
                                  num_reward_failed=self.counts["reward_failed"] - counts_before["reward_failed"])
        metrics.update(c.agentic.metrics())
        metrics.update(c.train(step, samples, [uid for uid, _ in kept]))
        for uid, _ in kept:
            del self.items[uid]
        metrics.update({f"async/{k}": v - counts_before[k] for k, v in self.counts.items()})
        metrics.update({"async/buffered_groups": len(self.finished), "async/running_prompts": len(self.running)})
        return metrics

    def between(self, step: int):
        """What the coordinator runs while it waits on the trainer (disaggregated: sessions go on)."""
        return lambda: self.tick(step)

    def close(self) -> None:
        for _, task in self.running.values():
            task.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    # ---- internals --------------------------------------------------------------------------------
    def _feed(self, step: int) -> None:
        c, r = self.c, self.c.cfg.rollout
        active = len(self.running) + len(self.finished)
        if active >= r.async_prompts_in_flight:
            return
        seed = rollout_seed(c.cfg, step)
        for item in c.prompts.dataset.take(r.async_prompts_in_flight - active):
            c.ledger.take(item.uid)
            self._start(item, seed)

    def _start(self, item, seed: int) -> None:
        c = self.c
        self.request_ids[item.uid] = c.ledger.dispatch(item.uid, "sessions")
        self.items[item.uid] = item
        coroutine = c.agentic.sessions([item], backend=self.turns, n=c.cfg.rollout.n, step_seed=seed)
        self.running[item.uid] = (item, self.loop.create_task(coroutine))

    def _finish(self, uid: str, item, records) -> None:
        c = self.c
        c.ledger.complete(self.request_ids.pop(uid), "sessions")
        answered, num_failed = c.agentic.groups([item], records)
        self.counts["reward_failed"] += num_failed
        if not answered:
            c.ledger.drop(uid, "empty_sessions")
            del self.items[uid]
            return
        samples = answered[0][1]
        if c.cfg.rollout.dynamic_sampling and len({s.reward for s in samples}) == 1:
            c.ledger.drop(uid, "uniform_rewards")
            del self.items[uid]
            return
        self.finished.append((uid, samples, num_failed))

    def _stale(self, uid: str) -> None:
        c = self.c
        item = self.items.pop(uid)
        if c.cfg.rollout.stale_policy == "drop":
            c.ledger.drop(uid, "stale")
            self.counts["dropped_stale"] += 1
            return
        c.ledger.requeue(uid)
        self._start(item, rollout_seed(c.cfg, c.version))
        self.counts["regenerated"] += 1
