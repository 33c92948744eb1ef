"""The coordinator: the one process that decides. It owns the dataset cursor and the prompt ledger,
hands prompts to the engines, computes rewards and advantages (dynamic sampling with refill), sends
each step's batch to the trainer group, orders the weight updates, and logs metrics and progress.

    python -m rl_engine.actors.coordinator --config RUN.yaml --port P --heartbeat-port Q

Topology: the coordinator binds one ROUTER socket (on `placement.host`, loopback by default); every
actor connects a DEALER whose identity is its id ("trainer", "rollout-0", ...) and registers with
`Hello`. Heartbeats go to a `HeartbeatMonitor` socket served by its own thread, so a coordinator busy
with rewards never misses them. A rollout worker declared dead is retired and its in-flight prompts
are requeued on the others; a silent trainer ends the run. A malformed or unexpected message gets an
`ErrorReply` and a log line.

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
import logging
import os
import time

import torch

from rl_engine import protocol as P
from rl_engine.actors.coordinator_io import CoordinatorBase, write_json_atomic
from rl_engine.actors.ledger import PromptLedger
from rl_engine.actors.wire import samples_of, train_batch, wire_sampling
from rl_engine.config import load_config
from rl_engine.metrics import MetricsLogger
from rl_engine.policy import ModelConfig
from rl_engine.rl_step import (PromptSource, Sample, collect_groups, eval_sampling_params, rollout_metrics,
                               sampling_params)
from rl_engine.rollout.advantages import compute_advantages
from rl_engine.rollout.rewards import RewardComputer
from rl_engine.train_config import RLConfig

logger = logging.getLogger(__name__)


class Coordinator(CoordinatorBase):
    def __init__(self, cfg: RLConfig, *, port: int | None = None, heartbeat_port: int | None = None) -> None:
        super().__init__(cfg, port=port, heartbeat_port=heartbeat_port)
        model_config = ModelConfig.from_pretrained(cfg.model.path)
        self.prompts = PromptSource(cfg, model_path=cfg.model.path, data_path=cfg.data.path,
                                    eval_path=cfg.data.eval_path, eos_token_ids=model_config.eos_token_id)
        self.rewards = RewardComputer(cfg.reward)
        self.ledger = PromptLedger()
        self.version = 0
        self._stalled = False  # a step had no group to train on (dynamic sampling)

    # ---- the run ----------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, out = self.cfg, self.cfg.train.output_dir
        t_start = time.perf_counter()
        self.wait_for_actors()
        before = self.evaluate().get("eval/accuracy")
        if before is not None:
            print(f"held-out accuracy before RL: {100 * before:.1f}%", flush=True)
        t_rl = time.perf_counter()
        with MetricsLogger(os.path.join(out, "metrics.jsonl"), total_steps=cfg.train.steps) as metrics:
            for step in range(cfg.train.steps):
                row = self.step(step)
                if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
                    row.update(self.evaluate())
                metrics.log(step + 1, row)
        rl_seconds = time.perf_counter() - t_rl
        after = self.evaluate().get("eval/accuracy")
        checkpoint = self.save_checkpoint(cfg.train.steps)
        summary = {"output_dir": out, "placement": cfg.placement.mode, "steps": cfg.train.steps,
                   "policy_version": self.version, "rl_seconds": round(rl_seconds, 1),
                   "total_seconds": round(time.perf_counter() - t_start, 1), "checkpoint": checkpoint,
                   "prompts": self.ledger.counts(), "worker_deaths": self.num_worker_deaths,
                   "protocol_errors": self.num_protocol_errors}
        if before is not None and after is not None:
            print(f"held-out accuracy after RL:  {100 * after:.1f}% ({100 * (after - before):+.1f} points, "
                  f"RL phase {rl_seconds:.0f}s)", flush=True)
            summary.update({"eval_accuracy_before": before, "eval_accuracy_after": after})
        write_json_atomic(os.path.join(out, "summary.json"), summary)
        self.shutdown_actors("run finished")
        return summary

    # ---- one step ---------------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        kept, generated, stats = self.collect(step)
        metrics = rollout_metrics(generated, num_reward_failed=stats["reward_failed"],
                                  rollout_s=time.perf_counter() - t0)
        metrics.update({"rollout/kept_groups": len(kept), "rollout/dropped_groups": stats["dropped"],
                        "rollout/refill_rounds": stats["rounds"], "rollout/refused": stats["refused"]})
        if kept:
            metrics.update(self.train(step, kept))
        else:  # said once; `rollout/kept_groups` = 0 in the metrics says it every time
            log = logger.info if self._stalled else logger.warning
            log("step %d: no group with varied rewards after %d refill round(s); no update", step + 1, stats["rounds"])
            self._stalled = True
        counts = self.ledger.counts()
        self.ledger.check()
        metrics.update({f"prompts/{k}": v for k, v in counts.items()})
        metrics["policy_version"] = self.version
        if self.disaggregated:
            metrics.update({"workers/alive": len(self.live_workers()), "workers/deaths": self.num_worker_deaths})
        return metrics

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

    def train(self, step: int, kept: list[list[Sample]]) -> dict[str, float]:
        samples = [s for grp in kept for s in grp]
        advantages = compute_advantages(torch.tensor([s.reward for s in samples], dtype=torch.float32),
                                        torch.tensor([s.group for s in samples]), config=self.cfg.advantage)
        version = self.version + 1
        targets = {a.id: str(a.capabilities["weights_address"]) for a in self.live_workers()}
        self.send("trainer", train_batch(samples, advantages, step=step + 1, policy_version=version,
                                         weight_targets=targets))
        _, result = self.take(lambda s, m: isinstance(m, P.TrainResult) and m.policy_version == version,
                              "the trainer's TrainResult")
        metrics = dict(result.metrics)
        if self.disaggregated:
            metrics.update(self.update_workers(version, targets))
        oldest = min((v for s in samples for v in s.policy_versions[s.prompt_len - 1:]), default=self.version)
        metrics["rollout/max_staleness"] = self.version - oldest  # 0 in synchronous mode
        self.version = version
        self.ledger.trained([grp[0].uid for grp in kept])
        return metrics

    def update_workers(self, version: int, targets: dict[str, str]) -> dict[str, float]:
        """Tell each target to take `version` from the trainer; wait for both sides. A worker that
        fails to take it is retired (it cannot serve the new policy)."""
        for name in targets:
            if self.actors[name].alive:
                self.send(name, P.UpdateWeights(version=version))
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
        """The trainer's sharded checkpoint plus this coordinator's state (dataset cursor, ledger)."""
        path = os.path.join(self.cfg.train.output_dir, "checkpoint")
        self.send("trainer", P.SaveCheckpoint(path=path, step=step))
        self.take(lambda s, m: isinstance(m, P.Ack) and m.ref == f"checkpoint:{path}", "the trainer's checkpoint")
        write_json_atomic(os.path.join(path, "coordinator_state.json"),
                          {"step": step, "policy_version": self.version, "dataset": self.prompts.dataset.state_dict(),
                           "ledger": self.ledger.state_dict()})
        return path

    def close(self) -> None:
        self.rewards.close()
        super().close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rl_engine.actors.coordinator")
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--heartbeat-port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s coordinator %(levelname)s %(name)s: %(message)s")
    cfg = load_config(RLConfig, args.config)
    torch.set_num_threads(cfg.placement.threads_per_process)
    coordinator = Coordinator(cfg, port=args.port, heartbeat_port=args.heartbeat_port)
    try:
        coordinator.run()
    finally:
        coordinator.close()


if __name__ == "__main__":
    main()
