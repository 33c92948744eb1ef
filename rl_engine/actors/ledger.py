"""Prompt accounting: where every prompt taken from the dataset is, so that none is lost.

A prompt is *queued* (taken, not yet sent), *in flight* on one worker (attempt k, request id
`"<uid>#<k>"`), *generated* (its samples are back, waiting for rewards and the optimizer step), then
*trained* or *dropped* by a stated rule ("uniform_rewards", "refused", "stale", ...). A worker that
dies has its in-flight prompts put back in the queue (a new attempt; a late answer to the old one is
stale and ignored, so no sample is trained twice). In async mode a generated prompt can go back to
the queue too: an interrupted partial rollout to continue, or a stale sample to regenerate
(`requeue`). The invariant, checked by `check()`:

    taken == queued + in_flight + generated + trained + sum(dropped)

Main design choice: a plain object with no sockets or clocks, owned by the coordinator, unit-tested
alone, and serialisable (`state_dict`) for checkpoints; finished prompts are kept only as counts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any


@dataclass
class _Entry:
    state: str  # "queued" | "in_flight" | "generated"
    attempt: int = 0
    worker: str | None = None


def request_id(uid: str, attempt: int) -> str:
    return f"{uid}#{attempt}"


def parse_request_id(rid: str) -> tuple[str, int] | None:
    uid, sep, attempt = rid.rpartition("#")
    return (uid, int(attempt)) if sep and attempt.isdigit() else None


class PromptLedger:
    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self.num_taken = 0
        self.num_trained = 0
        self.num_requeued = 0
        self.dropped: Counter[str] = Counter()
        self.events: list[tuple[str, str]] = []  # (uid, "trained" | "dropped:<reason>") since pop_events()

    # ---- transitions -------------------------------------------------------------------------------
    def take(self, uid: str) -> None:
        if uid in self._entries:
            raise ValueError(f"prompt {uid} was taken twice without finishing")
        self._entries[uid] = _Entry("queued")
        self.num_taken += 1

    def dispatch(self, uid: str, worker: str) -> str:
        """queued -> in flight on `worker`; returns the request id of this attempt."""
        e = self._get(uid, "queued")
        e.state, e.worker, e.attempt = "in_flight", worker, e.attempt + 1
        return request_id(uid, e.attempt)

    def complete(self, rid: str, worker: str) -> str | None:
        """in flight -> generated for the answer to request `rid` from `worker`; returns its uid, or
        None when the answer is stale (an earlier attempt, another worker, or an unknown prompt)."""
        parsed = parse_request_id(rid)
        if parsed is None:
            return None
        uid, attempt = parsed
        e = self._entries.get(uid)
        if e is None or e.state != "in_flight" or e.attempt != attempt or e.worker != worker:
            return None
        e.state, e.worker = "generated", None
        return uid

    def requeue_worker(self, worker: str) -> list[str]:
        """Every prompt in flight on `worker` goes back to the queue (sorted uids)."""
        uids = sorted(u for u, e in self._entries.items() if e.state == "in_flight" and e.worker == worker)
        for uid in uids:
            e = self._entries[uid]
            e.state, e.worker = "queued", None
        self.num_requeued += len(uids)
        return uids

    def requeue(self, uid: str) -> None:
        """generated -> queued (async: a partial rollout to continue, a stale sample to regenerate)."""
        self._get(uid, "generated").state = "queued"

    def requeue_in_flight(self) -> list[str]:
        """Every prompt in flight goes back to the queue (on resume: the engines that had them are gone)."""
        uids = self.in_flight()
        for uid in uids:
            e = self._entries[uid]
            e.state, e.worker = "queued", None
        return uids

    def trained(self, uids: list[str]) -> None:
        for uid in uids:
            self._get(uid, "generated")
        for uid in uids:
            del self._entries[uid]
            self.events.append((uid, "trained"))
        self.num_trained += len(uids)

    def drop(self, uid: str, reason: str) -> None:
        """generated (or queued: async, a stale partial rollout) -> dropped by `reason`."""
        e = self._entries.get(uid)
        if e is None or e.state not in ("generated", "queued"):
            raise ValueError(f"prompt {uid} is {e.state if e else 'unknown'}, expected generated or queued")
        del self._entries[uid]
        self.dropped[reason] += 1
        self.events.append((uid, f"dropped:{reason}"))

    def pop_events(self) -> list[tuple[str, str]]:
        events, self.events = self.events, []
        return events

    # ---- views -------------------------------------------------------------------------------------
    def _get(self, uid: str, state: str) -> _Entry:
        e = self._entries.get(uid)
        if e is None or e.state != state:
            raise ValueError(f"prompt {uid} is {e.state if e else 'unknown'}, expected {state}")
        return e

    def state_of(self, uid: str) -> str | None:
        e = self._entries.get(uid)
        return None if e is None else e.state

    def unfinished(self) -> dict[str, str]:
        """uid -> state of every prompt taken and not yet trained or dropped."""
        return {u: e.state for u, e in sorted(self._entries.items())}

    def in_flight(self, worker: str | None = None) -> list[str]:
        return sorted(u for u, e in self._entries.items()
                      if e.state == "in_flight" and (worker is None or e.worker == worker))

    def counts(self) -> dict[str, int]:
        states = Counter(e.state for e in self._entries.values())
        out = {"taken": self.num_taken, "queued": states["queued"], "in_flight": states["in_flight"],
               "generated": states["generated"], "trained": self.num_trained, "requeued": self.num_requeued,
               "dropped": sum(self.dropped.values())}
        out.update({f"dropped_{reason}": n for reason, n in sorted(self.dropped.items())})
        return out

    def check(self) -> None:
        c = self.counts()
        accounted = c["queued"] + c["in_flight"] + c["generated"] + c["trained"] + c["dropped"]
        if accounted != c["taken"]:
            raise AssertionError(f"prompt accounting broken: taken {c['taken']} != {accounted} accounted for ({c})")

    def state_dict(self) -> dict[str, Any]:
        return {"entries": {u: [e.state, e.attempt, e.worker] for u, e in self._entries.items()},
                "taken": self.num_taken, "trained": self.num_trained, "requeued": self.num_requeued,
                "dropped": dict(self.dropped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._entries = {u: _Entry(s, a, w) for u, (s, a, w) in state["entries"].items()}
        self.num_taken, self.num_trained = state["taken"], state["trained"]
        self.num_requeued, self.dropped = state["requeued"], Counter(state["dropped"])
