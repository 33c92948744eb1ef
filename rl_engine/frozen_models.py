"""Frozen second models of the RL loop: the reference policy of `loss.kl_coef` and the teacher of
on-policy distillation (`distill.teacher_path`). One implementation of "a frozen model's log-probs on the sampled tokens":
it scores the trainer's own packed micro-batches at the start of a step, in the trainer process(es),
and the log-probs travel in each micro-batch's `loss_inputs` to the loss.

Single process: a plain model (`policy.from_pretrained`, or a frozen copy of the initial policy).
Trainer group: `policy.frozen.FrozenPolicy`, sharded like the trainer, without optimizer state.
"""

from __future__ import annotations

from rl_engine.config import ConfigError
from rl_engine.policy.tokenizer import Tokenizer
from rl_engine.train_config import RLConfig


def reference_path(cfg: RLConfig, *, initial_policy_path: str) -> str | None:
    """Where the reference's weights come from: `ref.path`, else the initial policy when
    `loss.kl_coef > 0`, else None (no reference)."""
    if not cfg.uses_reference:
        return None
    return cfg.ref.path or initial_policy_path


def check_same_tokenizer(*, key: str, path: str, policy_path: str) -> None:
    """A second model scores the policy's token ids, so it must read them as the same tokens: its
    tokenizer's vocabulary (added tokens included) must equal the policy's. ConfigError otherwise."""
    try:
        theirs = Tokenizer.from_pretrained(path).vocab()
    except FileNotFoundError as e:
        raise ConfigError(f"{key}={path!r}: {e}") from None
    ours = Tokenizer.from_pretrained(policy_path).vocab()
    if theirs != ours:
        differ = sorted(set(theirs.items()) ^ set(ours.items()), key=lambda kv: kv[1])[:3]
        raise ConfigError(f"{key}={path!r} has a different tokenizer from the policy's ({len(theirs)} vs "
                          f"{len(ours)} tokens; first differences {differ}): it would score other tokens "
                          "than the ones sampled. Use a model with the policy's tokenizer")
