"""`rollout.fn` in the RL loop: agentic sessions (rl_engine/rollout/agentic.py) run for a step's
prompts, scored, and turned into training samples, the same way in the single-process trainer
(turns on its `AsyncEngine`) and in the coordinator (turns on the colocated or disaggregated engines,
`rl_engine.actors.agentic_turns`).

A session's sample is its whole token list: the first prompt is the sample's prompt, everything after
it the response, with the loss mask 1 exactly on the sampled tokens. Its reward: the rollout
function's (`RolloutResult.reward` or `session.reward`), else `reward.name` applied to the content of
the final assistant message with the row's answer. A session that sampled nothing (its first prompt
already over `rollout.max_total_tokens`) cannot be trained on and is left out of its group (counted
in `rollout/empty_sessions`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from rl_engine.config import ConfigError
from rl_engine.rl_step import PromptSource, Sample, make_sample, prompt_seed
from rl_engine.rollout.agentic import (RolloutStats, SessionRecord, TemplateDeltas, TurnBackend, limits_from_config,
                                       load_rollout_fn, run_groups)
from rl_engine.rollout.data import PromptItem
from rl_engine.rollout.rewards import RewardComputer
from rl_engine.train_config import RLConfig


class AgenticRollouts:
    def __init__(self, cfg: RLConfig, prompts: PromptSource, rewards: RewardComputer) -> None:
        if prompts.tokenizer.chat_template is None:
            raise ConfigError(f"rollout.fn={cfg.rollout.fn!r} renders conversations with the model's chat template; "
                              f"{cfg.model.path} has none (add chat_template to tokenizer_config.json)")
        try:
            self.fn = load_rollout_fn(cfg.rollout.fn)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.cfg, self.prompts, self.rewards = cfg, prompts, rewards
        self.deltas = TemplateDeltas(prompts.tokenizer)
        self.stats = RolloutStats()
        self.num_sessions = 0
        self.num_empty = 0

    def sessions(self, items: Sequence[PromptItem], *, backend: TurnBackend, n: int, step_seed: int | None,
                 greedy: bool = False):
        """The coroutine running `n` sessions per item -> [item][sample] records (greedy: held-out
        sessions, named apart from the training ones that may run on the same engines)."""
        eos = self.prompts.eos_token_ids

        def limits_of(item: PromptItem, i: int):
            return limits_from_config(self.cfg, eos_token_ids=eos, greedy=greedy,
                                      seed=prompt_seed(step_seed, f"{item.uid}/{i}"))

        return run_groups(self.fn, items, n=n, backend=backend, deltas=self.deltas, limits_of=limits_of,
                          stats=self.stats, prefix="eval:" if greedy else "")

    def score(self, items: Sequence[PromptItem], records: list[list[SessionRecord]]) -> tuple[list[list[float]], int]:
        """Every record's reward ([item][sample]) and the number of reward-function failures."""
        todo = [(g, i) for g, group in enumerate(records) for i, r in enumerate(group) if r.reward is None]
        outcomes, stats = self.rewards.compute([records[g][i].response for g, i in todo],
                                               [items[g].answer for g, _ in todo]) if todo else ([], None)
        rewards = [[r.reward for r in group] for group in records]
        for (g, i), outcome in zip(todo, outcomes):
            rewards[g][i] = outcome.score
        return rewards, 0 if stats is None else stats.num_failed

    def groups(self, items: Sequence[PromptItem], records: list[list[SessionRecord]]
               ) -> tuple[list[tuple[PromptItem, list[Sample]]], int]:
        """(item, its samples) per item with at least one trainable session, and the number of
        reward failures (as `collect_groups`' `generate` returns them)."""
        rewards, num_failed = self.score(items, records)
        answered = []
        for g, (item, group) in enumerate(zip(items, records)):
            samples = []
            for record, reward in zip(group, rewards[g]):
                self.num_sessions += 1
                if not record.num_sampled:
                    self.num_empty += 1
                    continue
                samples.append(sample_of_record(record, reward=reward, group=g, uid=item.uid))
            if samples:
                answered.append((item, samples))
        return answered, num_failed

    def metrics(self) -> dict[str, float]:
        """Counters since the last call (rollout/*), then reset."""
        out = self.stats.metrics(self.num_sessions)
        out["rollout/empty_sessions"] = self.num_empty
        logged = {"mismatch_logged": self.stats.mismatch_logged, "fn_error_logged": self.stats.fn_error_logged}
        self.stats, self.num_sessions, self.num_empty = RolloutStats(**logged), 0, 0  # one example per run
        return out

    def accuracy(self, items: Sequence[PromptItem], *, backend: TurnBackend, run) -> float:
        """Held-out accuracy: one greedy session per item, mean reward. `run(coroutine)` drives it."""
        stats, self.stats = self.stats, RolloutStats()
        try:
            records = run(self.sessions(items, backend=backend, n=1, step_seed=None, greedy=True))
            rewards, _ = self.score(items, records)
        finally:
            self.stats = stats
        return sum(r[0] for r in rewards) / len(rewards)


def sample_of_record(record: SessionRecord, *, reward: float, group: int, uid: str) -> Sample:
    p = record.prompt_len
    return make_sample(prompt_ids=record.token_ids[:p], response_ids=record.token_ids[p:],
                       logprobs=record.logprobs[p:], policy_versions=record.policy_versions[p:],
                       kv_versions=record.kv_versions[p:], response_mask=record.loss_mask[p:], reward=reward,
                       group=group, uid=uid, num_turns=record.num_turns, finish_reason=record.finish_reason)


def run_in_new_loop(coroutine):
    """Run a coroutine to completion in a fresh event loop (the single-process trainer's rollouts)."""
    return asyncio.run(coroutine)
