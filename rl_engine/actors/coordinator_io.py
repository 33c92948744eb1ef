"""The coordinator's message plumbing: its ROUTER socket, the actor table, registration, liveness,
the pump that handles every incoming message, waits for answers, and the dispatch of generation
requests with requeue on worker death. `Coordinator` (coordinator.py) adds the RL step on top.

Requests are tracked by a `PromptLedger` per round of generation: a result is accepted only from the
worker its current attempt was sent to, so an answer that arrives after its worker was declared dead
(and the prompt requeued) is stale and dropped, and no prompt is trained twice.

A rollout worker is declared dead by the heartbeats, or at once by a cluster launcher that saw its
process end (`WorkerExited`, from the peer named `launcher`: under Ray, the driver). With worker
restarts on (`ray.max_worker_restarts`), the launcher starts it again under the same name; the new
process registers again (`Hello`), is held back (`Actor.ready` False) until the coordinator has had the
trainer send it the current weights in full (`Coordinator.admit_restarted`), then serves requests.
Each process of a name is known by its pid, so a late notice about an earlier one changes nothing.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import zmq

from rl_engine import protocol as P
from rl_engine.actors.ledger import PromptLedger
from rl_engine.rl_step import prompt_seed
from rl_engine.run_checkpoint import write_json_atomic
from rl_engine.actors.link import ERROR_STARTUP, KERNELS_KEY, max_message_bytes
from rl_engine.auth import RunAuth
from rl_engine.kernels.invariant import check_same_kernels
from rl_engine.launch.heartbeat import HeartbeatMonitor
from rl_engine.train_config import RLConfig

logger = logging.getLogger(__name__)
ANSWERS = (P.TrainResult, P.WeightsPublished, P.WeightsApplied, P.Ack)
LAUNCHER = "launcher"  # the peer name of a cluster launcher (it sends WorkerExited)


@dataclass
class Actor:
    id: str
    role: str  # "trainer" | "rollout"
    capabilities: dict = field(default_factory=dict)
    alive: bool = True
    # A restarted rollout worker gets requests only once it holds the current weights.
    ready: bool = True
    registered_at: float = field(default_factory=time.monotonic)


@dataclass
class _Round:
    """One round of generation: the prompts (uid -> token ids), their ledger, the answers so far."""

    ledger: PromptLedger
    prompts: dict[str, list[int]]
    sampling: P.WireSamplingParams
    n: int
    pending: deque[str] = field(default_factory=deque)
    results: dict[str, P.GenerateResult] = field(default_factory=dict)


class CoordinatorBase:
    def __init__(self, cfg: RLConfig, *, auth: RunAuth, port: int | None, heartbeat_port: int | None,
                 listen_fd: int | None = None, heartbeat_listen_fd: int | None = None) -> None:
        self.cfg = cfg
        p = cfg.placement
        self.disaggregated = p.mode == "disaggregated"
        self.auth = auth
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 2000)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished peer raises instead of vanishing
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes(cfg))  # a larger frame drops its sender
        self.socket.setsockopt(zmq.RCVHWM, 1000)
        # A cluster launcher reports the processes it saw end (the local launcher's children are heartbeats' only).
        self.rejoin = p.launcher == "ray" and cfg.ray.max_worker_restarts > 0
        auth.serve(self.socket, peers=[*self.expected_actors(), *([LAUNCHER] if p.launcher == "ray" else [])])
        self.address = P.bind(self.socket, host=p.host, port=port, listen_fd=listen_fd)
        self._dead: queue.SimpleQueue[tuple[str, float]] = queue.SimpleQueue()  # (peer, when declared dead)
        self.monitor = HeartbeatMonitor(timeout_s=p.heartbeat_timeout_s,
                                        on_dead=lambda peer: self._dead.put((peer, time.monotonic())), host=p.host,
                                        port=heartbeat_port, listen_fd=heartbeat_listen_fd, context=self.context,
                                        auth=auth,
                                        peers=self.expected_actors()).start()
        self.actors: dict[str, Actor] = {}
        self.inbox: list[tuple[str, P.Message]] = []  # answers not yet taken by a wait
        self._round: _Round | None = None
        # Async mode: results of the main ledger's requests go here (the coordinator's handler).
        self.on_stream_result: Callable[[str, P.GenerateResult], None] | None = None
        self.on_requeue: Callable[[list[str]], None] | None = None
        self.num_protocol_errors = 0
        self.worker_rejections: dict[str, int] = {}  # unauthenticated messages each worker dropped (its last report)
        self.num_worker_deaths = 0
        self.num_worker_rejoins = 0  # restarted rollout workers that registered again
        self.restarting: set[str] = set()  # workers the launcher said it is starting again
        # With restarts on: workers retired without the launcher's word (the trainer could not reach one,
        # heartbeats), until it reports their process's end or this deadline (monotonic) passes.
        self.awaiting: dict[str, float] = {}
        self.served: Counter[str] = Counter()  # generation results accepted from each worker (per step)
        self.decode_compile_s = 0.0  # the engines' decode-step compiles reported since the last step row

    # ---- actors -----------------------------------------------------------------------------------
    def expected_actors(self) -> list[str]:
        n = self.cfg.placement.num_rollout_workers if self.disaggregated else 0
        return ["trainer", *(f"rollout-{i}" for i in range(n))]

    def live_workers(self) -> list[Actor]:
        """The rollout workers requests go to."""
        return [a for a in self.actors.values() if a.role == "rollout" and a.alive and a.ready]

    def pending_workers(self) -> list[Actor]:
        """Restarted rollout workers that registered and wait for the current weights."""
        return [a for a in self.actors.values() if a.role == "rollout" and a.alive and not a.ready]

    def admit_restarted(self) -> None:
        """Give the pending workers the current weights and make them live (`Coordinator`); called only
        where the trainer is idle."""

    def wait_for_actors(self) -> None:
        expected = self.expected_actors()
        print(f"coordinator at {self.address}: waiting for {', '.join(expected)}", flush=True)
        self.wait_until(lambda: all(name in self.actors for name in expected), f"registration of {expected}",
                        timeout_s=self.cfg.placement.startup_timeout_s)
        print(f"all {len(expected)} actors registered", flush=True)
        self._write_actors()

    def _write_actors(self) -> None:
        write_json_atomic(os.path.join(self.cfg.train.output_dir, "actors.json"),
              {"coordinator": self.address, "heartbeat": self.monitor.address, "coordinator_pid": os.getpid(),
               "actors": {a.id: {"role": a.role, "alive": a.alive, **a.capabilities} for a in self.actors.values()}})

    def retire(self, name: str, why: str, *, notify: bool = True) -> None:
        """Stop using rollout worker `name`: requeue what it had in flight, tell it to stop (`notify`; not
        when its process is known to have ended: a restarted one may hold the name already)."""
        actor = self.actors.get(name)
        if actor is None or not actor.alive:
            return
        actor.alive = actor.ready = False
        self.monitor.forget(name)
        self.num_worker_deaths += 1
        if self.rejoin and name not in self.restarting:  # the launcher may be about to restart it
            self.awaiting[name] = time.monotonic() + max(10.0, self.cfg.placement.heartbeat_timeout_s)
        requeued = []
        if self._round is not None:
            requeued = self._round.ledger.requeue_worker(name)
            self._round.pending.extend(requeued)
        if self.on_requeue is not None and (self._round is None or self._round.ledger is not self.ledger):
            stream = self.ledger.requeue_worker(name)  # async: the stream's prompts on that worker
            self.on_requeue(stream)
            requeued += stream
        logger.warning("rollout worker %s retired (%s); %d prompt(s) requeued", name, why, len(requeued))
        back = " (restarting)" if name in self.restarting else ""
        print(f"rollout worker {name} lost ({why}){back}: {len(requeued)} prompt(s) requeued, "
              f"{len(self.live_workers())} worker(s) left", flush=True)
        if notify:
            try:
                self.send(name, P.Shutdown(reason=f"retired: {why}"))
            except zmq.ZMQError:
                pass
        self._write_actors()
        self._check_workers_left(name, why)

    def _check_workers_left(self, name: str, why: str) -> None:
        """Raise when no rollout worker serves, waits for weights, or is being (or may be) restarted."""
        if not self.live_workers() and not self.pending_workers() and not self.restarting and not self.awaiting:
            logs = os.path.join(self.cfg.train.output_dir, "logs")
            raise RuntimeError(f"every rollout worker is gone (last: {name}, {why}); the run cannot continue. "
                               f"Their logs: {logs}/rollout-*.log")

    def _worker_exited(self, msg: P.WorkerExited) -> None:
        """The launcher saw the process of a rollout worker end (and may be starting it again)."""
        name = msg.worker
        actor = self.actors.get(name)
        self.awaiting.pop(name, None)
        if actor is None or actor.role != "rollout":
            if actor is None and name in self.expected_actors()[1:] and not msg.restarting:
                raise RuntimeError(f"{name} ended before it registered ({msg.reason}); see its log")
            logger.info("launcher: %s (pid %d) ended (%s)%s", name, msg.pid, msg.reason,
                        ", restarting" if msg.restarting else "")
            return
        if msg.restarting:
            self.restarting.add(name)
        else:
            self.restarting.discard(name)
        if actor.alive and actor.capabilities.get("pid") == msg.pid:
            self.retire(name, f"its process ended: {msg.reason}", notify=False)
        else:  # an earlier process of that name, already retired (or replaced by its restart)
            logger.info("launcher: %s (pid %d) ended (%s); already handled", name, msg.pid, msg.reason)
            self._write_actors()
            self._check_workers_left(name, msg.reason)

    def _handle_dead(self) -> None:
        if self.monitor.error is not None:
            raise RuntimeError(f"the heartbeat monitor failed, so dead workers could no longer be noticed: "
                               f"{self.monitor.error}")
        now = time.monotonic()
        for name in [n for n, deadline in self.awaiting.items() if deadline < now]:
            del self.awaiting[name]  # the launcher did not report it ended: it is not coming back
            self._check_workers_left(name, "retired, and not restarted")
        while True:
            try:
                name, when = self._dead.get_nowait()
            except queue.Empty:
                return
            actor = self.actors.get(name)
            if actor is None or not actor.alive or when < actor.registered_at:  # not the process registered now
                continue
            if actor.role == "trainer":
                raise RuntimeError(f"the trainer stopped sending heartbeats for "
                                   f"{self.cfg.placement.heartbeat_timeout_s:g}s")
            self.retire(name, f"no heartbeat for {self.cfg.placement.heartbeat_timeout_s:g}s")

    # ---- messages ---------------------------------------------------------------------------------
    def send(self, name: str, msg: P.Message) -> None:
        P.send_msg(self.socket, msg, route=[name.encode()])

    def _reply(self, route: list[bytes], msg: P.ErrorReply, what: str) -> None:
        self.num_protocol_errors += 1
        logger.warning("from %r: %s; answered with ErrorReply", route[0] if route else None, what)
        if route:
            try:
                P.send_msg(self.socket, msg, route=route)
            except zmq.ZMQError as e:
                logger.warning("could not send the error reply: %s", e)

    def pump(self, timeout_s: float) -> None:
        """Handle every message that arrives within `timeout_s`, then the peers declared dead."""
        if self.socket.poll(int(timeout_s * 1000)):
            while self.socket.poll(0):
                self._receive_one()
        self._handle_dead()

    def _receive_one(self) -> None:
        try:
            route, msg = P.recv_msg(self.socket, num_route_frames=1, auth=self.auth)
        except P.Unauthenticated as e:  # counted by self.auth; a stranger gets no answer
            logger.warning("refused: %s", e)
            return
        except P.ProtocolError as e:
            self._reply(e.route, P.error_reply(e), f"malformed message: {e}")
            return
        sender = route[0].decode(errors="replace")
        if sender == LAUNCHER:  # authenticated: only the holder of the launcher's key has that routing id
            if isinstance(msg, P.WorkerExited):
                self._worker_exited(msg)
            else:
                self._reply(route, P.ErrorReply(code=P.ERROR_UNEXPECTED,
                                                message=f"the launcher sends WorkerExited, not {type(msg).__name__}"),
                            f"unexpected {type(msg).__name__} from the launcher")
            return
        if isinstance(msg, P.ErrorReply):
            if msg.code == ERROR_STARTUP and sender not in self.actors:
                raise RuntimeError(f"actor {sender} failed to start: {msg.message} (see its log)")
            logger.warning("%s reported an error (%s): %s", sender, msg.code, msg.message)
            return
        if isinstance(msg, P.Hello):
            self._register(route, sender, msg)
            return
        actor = self.actors.get(sender)
        if actor is None:
            self._reply(route, P.ErrorReply(code=P.ERROR_UNEXPECTED, message="register with Hello first"),
                        f"{type(msg).__name__} from unregistered {sender!r}")
        elif not actor.alive:
            logger.info("ignoring %s from retired %s", type(msg).__name__, sender)
        elif isinstance(msg, P.GenerateResult):
            self.decode_compile_s += msg.decode_compile_s
            self._on_result(sender, msg)
        elif isinstance(msg, ANSWERS):
            self.inbox.append((sender, msg))
        else:
            self._reply(route, P.ErrorReply(code=P.ERROR_UNEXPECTED,
                                            message=f"the coordinator does not take {type(msg).__name__} messages"),
                        f"unexpected {type(msg).__name__} from {sender}")

    def _register(self, route: list[bytes], sender: str, hello: P.Hello) -> None:
        problem = None
        previous = self.actors.get(sender)
        # A restarted rollout worker registers again under its name, with a pid of its own.
        rejoin = (self.rejoin and previous is not None and previous.role == "rollout" and hello.role == "rollout"
                  and hello.capabilities.get("pid") != previous.capabilities.get("pid"))
        if hello.worker_id != sender:
            problem = f"Hello.worker_id {hello.worker_id!r} differs from the socket identity {sender!r}"
        elif previous is not None and not rejoin:
            problem = f"{sender} is already registered"
        elif sender not in self.expected_actors() or hello.role != ("trainer" if sender == "trainer" else "rollout"):
            problem = f"unexpected actor {sender!r} with role {hello.role!r}; expected {self.expected_actors()}"
        elif hello.role == "rollout" and not isinstance(hello.capabilities.get("weights_address"), str):
            problem = "a rollout worker must announce its weights_address"
        if problem is not None:
            self._reply(route, P.ErrorReply(code=P.ERROR_UNEXPECTED, message=problem), problem)
            return
        if rejoin:
            self.restarting.add(sender)  # back already: retiring its earlier process must not end the run
            if previous.alive:  # the launcher's notice of the earlier process has not arrived yet
                self.retire(sender, "it registered again (restarted)", notify=False)
            self.restarting.discard(sender)
            self.awaiting.pop(sender, None)
            self.num_worker_rejoins += 1
            print(f"rollout worker {sender} registered again (pid {hello.capabilities.get('pid')}); it gets the "
                  "current weights before requests", flush=True)
        # Watch first, then take the registration time: a death the monitor thread declares before the
        # watch (the silence of an earlier process of this name) is then older than registered_at and
        # ignored (`_handle_dead`); in the other order one declared between the two retired the new process.
        self.monitor.watch(sender)
        self.actors[sender] = Actor(id=sender, role=hello.role, capabilities=dict(hello.capabilities),
                                    ready=not rejoin)
        logger.info("registered %s (%s, pid %s)", sender, hello.role, hello.capabilities.get("pid"))
        if self.cfg.model.batch_invariant:
            self.check_kernels()
        if rejoin:
            self._write_actors()

    def check_kernels(self) -> None:
        """Under model.batch_invariant: every registered actor's kernel choice is the same (else
        `KernelMismatch`, which ends the run; the actors' `Hello` carries it, link.kernel_capabilities)."""
        check_same_kernels({a.id: (str(a.capabilities.get(KERNELS_KEY, "not reported")),
                                   str(a.capabilities.get(f"{KERNELS_KEY}_reason", "")))
                            for a in self.actors.values() if a.alive})

    # ---- waits ------------------------------------------------------------------------------------
    def wait_until(self, done: Callable[[], bool], what: str, *, timeout_s: float | None = None,
                   between: Callable[[], None] | None = None) -> None:
        """Pump messages until `done()`; `between()` runs after each pump (async: keep engines fed)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not done():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}")
            self.pump(0.05)
            if between is not None:
                between()

    def take(self, match: Callable[[str, P.Message], bool], what: str,
             until: Callable[[], bool] | None = None,
             between: Callable[[], None] | None = None) -> tuple[str | None, P.Message | None]:
        """Wait for an answer matching `match(sender, msg)` and remove it from the inbox; (None, None)
        if `until()` turns true first."""
        found: list[tuple[str, P.Message]] = []

        def done() -> bool:
            for i, (sender, msg) in enumerate(self.inbox):
                if match(sender, msg):
                    found.append(self.inbox.pop(i))
                    return True
            return until is not None and until()

        self.wait_until(done, what, between=between)
        return found[0] if found else (None, None)

    # ---- generation -------------------------------------------------------------------------------
    def generate(self, ledger: PromptLedger, prompts: dict[str, list[int]], sampling: P.WireSamplingParams, *,
                 n: int) -> dict[str, P.GenerateResult]:
        """Generate `n` samples of every prompt (uid -> token ids, each already taken in `ledger`) on
        the engines; requests of a worker that dies are sent again to the others."""
        rnd = self._round = _Round(ledger=ledger, prompts=prompts, sampling=sampling, n=n, pending=deque(prompts))
        try:
            while len(rnd.results) < len(prompts):
                if self.disaggregated:
                    self.admit_restarted()
                self._dispatch(rnd)
                self.pump(0.05)
        finally:
            self._round = None
        return rnd.results

    def _request(self, rnd: _Round, uid: str, worker: str) -> P.GenerateRequest:
        rid = rnd.ledger.dispatch(uid, worker)
        sampling = msgspec.structs.replace(rnd.sampling, seed=prompt_seed(rnd.sampling.seed, uid))
        return P.GenerateRequest(request_id=rid, sample_ids=[f"{rid}/{i}" for i in range(rnd.n)],
                                 prompt_token_ids=rnd.prompts[uid], sampling=sampling,
                                 policy_version=getattr(self, "version", 0))

    def _dispatch(self, rnd: _Round) -> None:
        if not rnd.pending:
            return
        if not self.disaggregated:  # colocated: the trainer group's engines take the whole round at once
            requests = [self._request(rnd, uid, "trainer") for uid in rnd.pending]
            rnd.pending.clear()
            self.send("trainer", P.GenerateBatch(requests=requests))
            return
        load = {a.id: len(rnd.ledger.in_flight(a.id)) for a in self.live_workers()}
        while rnd.pending and load:  # none live: they wait for a restarted worker
            worker = min(load, key=lambda w: (load[w], w))
            request = self._request(rnd, rnd.pending.popleft(), worker)
            load[worker] += 1
            try:
                self.send(worker, request)
            except zmq.ZMQError as e:  # gone without a word: the heartbeat monitor will requeue it
                logger.warning("could not send %s to %s: %s", request.request_id, worker, e)

    def _on_result(self, sender: str, msg: P.GenerateResult) -> None:
        rnd = self._round
        uid = rnd.ledger.complete(msg.request_id, sender) if rnd is not None else None
        if uid is None and self.on_stream_result is not None:
            self.on_stream_result(sender, msg)
            return
        if uid is None:
            logger.info("stale result %s from %s dropped", msg.request_id, sender)
            return
        if msg.error is None and len(msg.samples) != rnd.n:
            raise RuntimeError(f"{sender} answered {msg.request_id} with {len(msg.samples)} samples, expected {rnd.n}")
        rnd.results[uid] = msg
        self.served[sender] += 1

    # ---- the end ----------------------------------------------------------------------------------
    def shutdown_actors(self, reason: str) -> None:
        for actor in self.actors.values():
            if actor.alive:
                try:
                    self.send(actor.id, P.Shutdown(reason=reason))
                except zmq.ZMQError:
                    pass

    def close(self) -> None:
        self.monitor.stop()
        self.auth.close()
        self.socket.close()
        self.context.term()
