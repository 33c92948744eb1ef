"""The coordinator's rollout buffer in async mode: every prompt taken and not yet trained or
dropped, with what is known of it.

    queue     prompts to send to an engine: new ones, interrupted partial rollouts to continue (their
              `GenerateResult` so far in `partials`), stale ones to regenerate from scratch
    buffer    finished and scored groups waiting for an optimizer step, oldest first

The prompt ledger (`ledger.py`) says which state each prompt is in; this object holds the data that
goes with it: token ids, answer, the sampling seed fixed when the prompt was taken (a continued
partial rollout keeps drawing from the same per-token seeds), partial rollouts and scored groups.
It is written into checkpoints whole (`to_bytes`): tensors as raw protocol frames, no pickle. Reading
it back (`from_bytes`) decodes into a typed schema, checks the result, and turns any failure, of any
exception type, into one `CheckpointError` naming the file: a damaged buffer is never half-loaded.

Staleness of a token is `trainer version - version that sampled it`; a group is only trained while
its oldest token is at most `max_staleness` versions old (`staleness`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec

from rl_engine import protocol as P
from rl_engine.run_checkpoint import CheckpointError


@dataclass
class Prompt:
    prompt_ids: list[int]
    answer: Any
    seed: int


@dataclass
class RolloutBuffer:
    prompts: dict[str, Prompt] = field(default_factory=dict)
    queue: deque[str] = field(default_factory=deque)
    partials: dict[str, P.GenerateResult] = field(default_factory=dict)
    buffer: deque[tuple[str, P.GenerateResult, list[float]]] = field(default_factory=deque)

    def add(self, uid: str, prompt: Prompt) -> None:
        self.prompts[uid] = prompt
        self.queue.append(uid)

    def forget(self, uid: str) -> None:
        """The prompt is trained or dropped: nothing of it is kept."""
        self.prompts.pop(uid, None)
        self.partials.pop(uid, None)

    def interrupted(self, uid: str, result: P.GenerateResult) -> None:
        """A partial rollout came back: continue it first (it is the oldest work)."""
        self.partials[uid] = result
        self.queue.appendleft(uid)

    def pop_oldest(self, version: int) -> tuple[str, P.GenerateResult, list[float]]:
        """Remove and return the finished group whose oldest token is oldest (the first to arrive among
        equals): the samples closest to the staleness bound are trained before they pass it."""
        i = max(range(len(self.buffer)), key=lambda j: (staleness(self.buffer[j][1], version), -j))
        entry = self.buffer[i]
        del self.buffer[i]
        return entry

    def regenerate(self, uid: str) -> None:
        self.partials.pop(uid, None)
        self.queue.append(uid)

    def check(self) -> None:
        """Raise ValueError unless every queued, partial or buffered uid has its prompt and every
        buffered group has one reward per sample (what the coordinator relies on after a resume)."""
        buffered = [uid for uid, _, _ in self.buffer]
        for where, uids in (("queue", self.queue), ("partials", self.partials), ("buffer", buffered)):
            orphans = [uid for uid in uids if uid not in self.prompts]
            if orphans:
                raise ValueError(f"{where} holds {orphans[:3]}, which have no prompt")
        for uid, result, rewards in self.buffer:
            if len(rewards) != len(result.samples):
                raise ValueError(f"buffered group {uid!r} has {len(result.samples)} samples but {len(rewards)} rewards")

    # ---- checkpoints --------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        def frames(result: P.GenerateResult) -> list[bytes]:
            return [bytes(f) for f in P.encode(result)]

        return msgspec.msgpack.encode(_Saved(
            prompts={u: (p.prompt_ids, p.answer, p.seed) for u, p in self.prompts.items()},
            queue=list(self.queue),
            partials={u: frames(r) for u, r in self.partials.items()},
            buffer=[(u, frames(r), rewards) for u, r, rewards in self.buffer]))

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "the rollout buffer") -> RolloutBuffer:
        """The buffer `to_bytes` wrote; `CheckpointError` naming `source` if `data` is anything else."""
        try:
            saved = msgspec.msgpack.decode(data, type=_Saved)
            out = cls(prompts={u: Prompt(ids, answer, seed) for u, (ids, answer, seed) in saved.prompts.items()},
                      queue=deque(saved.queue),
                      partials={u: _result(f) for u, f in saved.partials.items()},
                      buffer=deque((u, _result(f), rewards) for u, f, rewards in saved.buffer))
            out.check()
        except Exception as e:  # of any type (msgspec, ProtocolError, RecursionError, ...): refused whole
            raise CheckpointError(f"{source} is damaged and cannot be loaded ({type(e).__name__}: {e}); resume "
                                  "from an earlier checkpoint") from None
        return out


class _Saved(msgspec.Struct, forbid_unknown_fields=True):
    """A checkpointed buffer: prompts as [prompt_ids, answer, seed], results as protocol frames."""

    prompts: dict[str, tuple[list[int], Any, int]]
    queue: list[str]
    partials: dict[str, list[bytes]]
    buffer: list[tuple[str, list[bytes], list[float]]]


def _result(frames: list[bytes]) -> P.GenerateResult:
    msg = P.decode(frames)
    if not isinstance(msg, P.GenerateResult):
        raise ValueError(f"a rollout buffer entry decodes to {type(msg).__name__}, not GenerateResult")
    return msg


def staleness(result: P.GenerateResult, version: int) -> int:
    """How many versions older than `version` the oldest sampled token of `result` is (0 when none)."""
    oldest = min((int(s.policy_versions.min()) for s in result.samples if s.policy_versions.numel()), default=version)
    return version - oldest
