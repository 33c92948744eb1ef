"""Agentic sessions' turns on the coordinator's engines (colocated and disaggregated placement).

The sessions (rl_engine/rollout/agentic.py) run as asyncio tasks in the coordinator's thread; each
`session.chat` becomes one `GenerateRequest` (n = 1, the prompt = the session's accumulated ids) and
awaits its `GenerateResult`. `CoordinatorTurns.run(coroutine)` drives the event loop and the
coordinator's message pump together: requests go out as soon as a session asks (disaggregated: to
the least-loaded live worker, so the turns of every session share each worker's continuous batch;
colocated: every pending turn in one `GenerateBatch` to the trainer group), answers resolve the
awaiting sessions as they arrive.

Turns are tracked by a `PromptLedger` of their own (one entry per turn), installed as the
coordinator's current round: a worker that dies has its turns sent again to the others, and a late
answer to a retired attempt is dropped. In async mode a weight update interrupts the turns in flight
(`GenerateResult.interrupted`): each is sent again with its partial output (`resume`) and continues
with the new weights, its earlier tokens keeping their versions and log-probs, as partial rollouts do.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field

import zmq

from rl_engine import protocol as P
from rl_engine.actors.ledger import PromptLedger
from rl_engine.actors.wire import wire_sampling
from rl_engine.inference.sampling_params import SamplingParams
from rl_engine.rollout.agentic import TurnOutput

logger = logging.getLogger(__name__)


@dataclass
class _TurnRound:
    """What `CoordinatorBase` expects of its current round (`ledger`, `n`, `pending`, `results`)."""

    ledger: PromptLedger = field(default_factory=PromptLedger)
    n: int = 1
    pending: deque[str] = field(default_factory=deque)
    results: dict[str, P.GenerateResult] = field(default_factory=dict)
    requests: dict[str, tuple[list[int], P.WireSamplingParams]] = field(default_factory=dict)
    resume: dict[str, list[P.SampleResult]] = field(default_factory=dict)


class CoordinatorTurns:
    """A `TurnBackend` over a `Coordinator`'s engines."""

    def __init__(self, coordinator, *, max_model_len: int) -> None:
        self.coordinator = coordinator
        self.max_model_len = max_model_len
        self.round = _TurnRound()
        self._futures: dict[str, asyncio.Future] = {}
        self.num_interrupted = 0

    async def generate(self, prompt_ids: list[int], params: SamplingParams, *, key: str) -> TurnOutput:
        rnd = self.round
        if key in self._futures:
            raise ValueError(f"turn {key} is already in flight")
        rnd.ledger.take(key)
        rnd.requests[key] = (list(prompt_ids), wire_sampling(params))
        rnd.pending.append(key)
        future = asyncio.get_running_loop().create_future()
        self._futures[key] = future
        return await future

    def run(self, coroutine):
        """Run `coroutine` (sessions awaiting `generate`) to completion, pumping the coordinator."""
        c = self.coordinator
        previous, c._round = c._round, self.round

        async def drive():
            task = asyncio.ensure_future(coroutine)
            while not task.done():
                self.poll()
                await asyncio.sleep(0.002)  # sessions and tools run; then the socket again
            return task.result()

        try:
            return asyncio.run(drive())
        finally:
            c._round = previous

    def poll(self) -> None:
        """Send the pending turns, take every answer that arrived, resolve their sessions."""
        c, rnd = self.coordinator, self.round
        self._dispatch()
        c.pump(0)
        for key in list(rnd.results):
            msg = rnd.results.pop(key)
            future = self._futures.get(key)
            if future is None or future.done():
                continue
            if msg.error is not None:
                del self._futures[key]
                rnd.ledger.trained([key])  # done with: the key may come again (a regenerated prompt's session)
                future.set_exception(ValueError(f"turn {key} refused by the engine: {msg.error}"))
                continue
            sample = msg.samples[0]
            if msg.interrupted and sample.finish_reason == "abort":  # a weight update: continue it
                self.num_interrupted += 1
                rnd.ledger.requeue(key)
                rnd.resume[key] = list(msg.samples)
                rnd.pending.append(key)
                continue
            del self._futures[key]
            rnd.ledger.trained([key])
            future.set_result(TurnOutput(token_ids=sample.token_ids.tolist(),
                                         logprobs=sample.behavior_logprobs.tolist(),
                                         policy_versions=sample.policy_versions.tolist(),
                                         kv_versions=sample.kv_versions.tolist(),
                                         finish_reason=sample.finish_reason))

    def _request(self, key: str, worker: str) -> P.GenerateRequest:
        rnd = self.round
        rid = rnd.ledger.dispatch(key, worker)
        prompt, sampling = rnd.requests[key]
        return P.GenerateRequest(request_id=rid, sample_ids=[f"{rid}/0"], prompt_token_ids=prompt, sampling=sampling,
                                 policy_version=self.coordinator.version, resume=rnd.resume.pop(key, None))

    def _dispatch(self) -> None:
        c, rnd = self.coordinator, self.round
        if not rnd.pending:
            return
        if not c.disaggregated:
            requests = [self._request(key, "trainer") for key in rnd.pending]
            rnd.pending.clear()
            c.send("trainer", P.GenerateBatch(requests=requests))
            return
        load = {a.id: len(rnd.ledger.in_flight(a.id)) for a in c.live_workers()}
        while rnd.pending and load:
            worker = min(load, key=lambda w: (load[w], w))
            request = self._request(rnd.pending.popleft(), worker)
            load[worker] += 1
            try:
                c.send(worker, request)
            except zmq.ZMQError as e:  # gone without a word: the heartbeat monitor will requeue it
                logger.warning("could not send %s to %s: %s", request.request_id, worker, e)
