"""A rollout worker (disaggregated placement): one inference engine in its own process, serving the
coordinator's requests and taking weight updates between engine steps.

    python -m rl_engine.actors.rollout_worker --config RUN.yaml --coordinator ADDR --heartbeat ADDR \
        --worker-id rollout-0

`GenerateRequest`s go into the engine as they arrive and are stepped together (continuous batching);
each finished request is answered with a `GenerateResult` (tokens, behavior log-probs, per-token policy
and KV versions, routed experts when recording). A request with `resume` continues a partial rollout.
`UpdateWeights(v)` makes the worker receive version v through weight_sync from every trainer rank
(shared memory or ZMQ, `placement.weight_transport`; checksummed per bucket, optionally probed), apply
it between two engine steps and answer `WeightsApplied`; with `interrupt` (async mode) it first answers
every request in flight with its partial rollout (`GenerateResult.interrupted`), which the coordinator
sends out again to continue. Malformed or unexpected messages get an `ErrorReply` and a log line.

Main design choice: the worker decides nothing (which prompt, which version, when to update are the
coordinator's), so its whole state is its engine and weights version, and a worker that dies loses
nothing the coordinator cannot requeue. Fault injection for tests: `--die-after-requests N` makes the
worker SIGKILL itself on receiving its N-th request, with the earlier ones still in flight;
`--hold-a-request-until-update` (async mode) takes, at each weights version, the first sampled request
that has a generated token out of the engine and keeps it until the next `UpdateWeights`, which answers
it as interrupted: every update then finds a partial rollout, whatever the relative speed of this worker
and the trainer (without it, a worker that finishes everything before the update interrupts nothing);
`--step-once-file-exists PATH` keeps every request waiting in the engine (heartbeats and messages go
on) until the file PATH exists, so a test can keep the run going until it has done what it must do
during the run, whatever the machine's speed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import time

import torch

from rl_engine import protocol as P
from rl_engine.actors.link import CoordinatorLink, load_actor_config, max_message_bytes, report_startup_failure
from rl_engine.actors.wire import add_to_engine, generate_result
from rl_engine.auth import RunAuth
from rl_engine.inference import LLM, RequestOutput
from rl_engine.policy import from_pretrained
from rl_engine.policy.tokenizer import Tokenizer
from rl_engine.rl_step import DecodeCompileSeconds
from rl_engine.serve.host import start_run_server
from rl_engine.train_config import RLConfig
from rl_engine.weight_sync import (EngineLayout, SharedMemoryReceiverTransport, TrainLayout, WeightReceiver,
                                   WeightSyncError, ZmqReceiverTransport, plan_message_bytes, plan_sync)

logger = logging.getLogger(__name__)
COMMANDS = (P.GenerateRequest, P.UpdateWeights, P.Shutdown)


def shm_has_room(model: torch.nn.Module, directory: str = "/dev/shm") -> bool:
    """Whether `directory` can hold the shared-memory transport's two staging copies of `model`
    (with 10% to spare); False when there is no such directory."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return 2.2 * size < st.f_bavail * st.f_frsize


class RolloutWorker:
    def __init__(self, cfg: RLConfig, *, auth: RunAuth, worker_id: str, coordinator: str, heartbeat: str,
                 die_after_requests: int | None = None, hold_a_request_until_update: bool = False,
                 step_once_file_exists: str | None = None) -> None:
        p, r, t = cfg.placement, cfg.rollout, cfg.train
        self.worker_id, self.die_after_requests = worker_id, die_after_requests
        if hold_a_request_until_update and r.mode != "async":
            raise ValueError("--hold-a-request-until-update needs rollout.mode=async (a sync round waits for every "
                             f"request, so a held one would never be answered); got rollout.mode={r.mode}")
        self.hold_a_request_until_update = hold_a_request_until_update
        self.step_once_file_exists = step_once_file_exists  # fault injection: None once the file is there
        self.held: RequestOutput | None = None  # the partial rollout held until the next update
        self.held_at_version: int | None = None  # the weights version at which one was last held
        dtype = getattr(torch, cfg.model.dtype)
        model = from_pretrained(cfg.model.path, dtype=dtype)
        tokenizer = None
        if p.serve_port is not None:  # served text needs it; built as the single-process run's (same EOS ids)
            tokenizer = Tokenizer.from_pretrained(cfg.model.path, eos_token_ids=model.config.eos_token_id or None)
        self.llm = LLM(model, tokenizer=tokenizer, kv_cache_memory=r.kv_cache_memory_mb << 20,
                       max_num_batched_tokens=r.max_num_batched_tokens, seed=t.seed, record_routing=r.routing_replay,
                       speculative_config=r.speculative, cpu_prepack_weights=False,  # the fp32 log-prob contract
                       cpu_decode_kernel=r.cpu_decode_kernel, compile_decode=r.compile_decode,
                       fork_copy_partial_block=r.fork_copy_partial_block)
        self.engine = self.llm.engine
        self.decode_compile = DecodeCompileSeconds(self.engine)  # reported on the results (compile_decode)
        # Every process computes the same plan: every trainer rank sends its own shards to this tp=1 engine.
        # A context-parallel trainer is dp x cp replicas (TrainLayout.of), as the trainer group plans it.
        plan = plan_sync(model.config, src=TrainLayout(tp=t.tp, pp=t.pp, dp=t.dp * t.cp, ep=t.ep, dtype=dtype),
                         dst=EngineLayout(tp=1, replicas=1, dtype=dtype), bucket_bytes=p.weight_bucket_mb << 20)
        kind = p.weight_transport
        if kind == "auto":
            kind = "shm" if shm_has_room(model) else "zmq"
        receiver_cls = SharedMemoryReceiverTransport if kind == "shm" else ZmqReceiverTransport
        self.weights_rx = receiver_cls(host=p.host, timeout_s=p.weight_sync_timeout_s, signer=auth.signer("weights"),
                                       max_message_bytes=plan_message_bytes(plan, dst_rank=0))
        self.receiver = WeightReceiver(self.engine, plan, dst_rank=0, transport=self.weights_rx)
        address = ("shm+" if kind == "shm" else "") + self.weights_rx.address  # the trainer picks its sender by it
        self.link = CoordinatorLink(coordinator, auth=auth, actor_id=worker_id, role="rollout",
                                    heartbeat_address=heartbeat, heartbeat_interval_s=p.heartbeat_interval_s,
                                    max_frame_bytes=max_message_bytes(cfg),
                                    capabilities={"weights_address": address,
                                                  "weights_version": self.engine.weights_version})
        self.requests: dict[str, P.GenerateRequest] = {}
        self.num_received = 0
        # placement.serve_port: worker i serves the OpenAI API on serve_port + i from this engine; the lock
        # is held while this loop uses the engine (steps, requests, weight updates).
        index = worker_id.rsplit("-", 1)[-1]
        self.server = start_run_server(cfg, self.engine, name=worker_id, port_offset=int(index) if index.isdigit() else 0)
        self.engine_lock = self.server.lock if self.server is not None else contextlib.nullcontext()

    def serve(self) -> None:
        while True:
            busy = self.engine.has_unfinished_requests() and self._may_step()
            msg = self.link.receive(0 if busy else 100, expected=COMMANDS)
            with self.engine_lock:
                while msg is not None:  # take everything that is waiting before the next engine step
                    if isinstance(msg, P.Shutdown):
                        logger.info("%s: shutdown (%s)", self.worker_id, msg.reason)
                        return
                    self._handle(msg)
                    msg = self.link.receive(0, expected=COMMANDS)
                if self.engine.has_unfinished_requests() and self._may_step():
                    for out in self.engine.step():
                        if out.finished:
                            request = self.requests.pop(out.request_id)
                            self._send_result(generate_result(request, out))
                    if self.hold_a_request_until_update:
                        self._hold_a_request()

    def _may_step(self) -> bool:
        """False while `--step-once-file-exists`'s file is missing (fault injection, tests)."""
        if self.step_once_file_exists is not None and os.path.exists(self.step_once_file_exists):
            logger.info("%s: fault injection: %s exists, stepping", self.worker_id, self.step_once_file_exists)
            self.step_once_file_exists = None
        return self.step_once_file_exists is None

    def _hold_a_request(self) -> None:
        """Fault injection (tests): once per weights version, take out of the engine the first fresh
        (not a continued partial rollout, so no request is held twice) sampled (temperature > 0: never a
        greedy evaluation, which waits for all its answers) request whose first sample has a token;
        `_handle` answers it at the next UpdateWeights."""
        if self.held is not None or self.held_at_version == self.engine.weights_version:
            return
        for rid, request in self.requests.items():
            running = self.engine.requests.get(rid)
            if (request.resume is None and request.sampling.temperature > 0 and running is not None
                    and running.seqs[0].output_token_ids):
                self.held, self.held_at_version = self.engine.abort(rid), self.engine.weights_version
                logger.info("%s: fault injection: %s held until the next weight update", self.worker_id, rid)
                return

    def _handle(self, msg: P.Message) -> None:
        if isinstance(msg, P.GenerateRequest):
            self.num_received += 1
            if self.die_after_requests is not None and self.num_received >= self.die_after_requests:
                logger.warning("%s: fault injection: dying with %d request(s) in flight", self.worker_id,
                               len(self.requests))
                os.kill(os.getpid(), signal.SIGKILL)
            self._add(msg)
        elif isinstance(msg, P.UpdateWeights):
            held, self.held = self.held, None
            if held is not None and not msg.interrupt:  # it goes on in the engine, as the others do
                self.engine.add_request(held.request_id, held)
                held = None
            if msg.interrupt:  # async: hand the partial rollouts back; they go on with the new weights
                for out in ([held] if held is not None else []) + self.engine.interrupt():
                    self._send_result(generate_result(self.requests.pop(out.request_id), out, interrupted=True))
            reply = self._update_weights(msg.version)
            reply.rejected_messages = self.weights_rx.num_rejected
            self.link.send(reply)

    def _add(self, request: P.GenerateRequest) -> None:
        rid = request.request_id
        try:
            if rid in self.requests:
                raise ValueError(f"request {rid!r} is already being generated here")
            add_to_engine(self.engine, request)
        except ValueError as e:
            logger.warning("%s: request %s refused: %s", self.worker_id, rid, e)
            self._send_result(P.GenerateResult(request_id=rid, samples=[], error=str(e)))
            return
        self.requests[rid] = request

    def _send_result(self, result: P.GenerateResult) -> None:
        """Send `result` with the seconds the engine spent compiling decode steps since the previous one."""
        result.decode_compile_s = self.decode_compile.take()
        self.link.send(result)

    def _update_weights(self, version: int) -> P.WeightsApplied:
        t0 = time.perf_counter()
        try:
            applied = self.receiver.sync()
        except (WeightSyncError, ValueError) as e:
            logger.warning("%s: weights v%d not applied: %s", self.worker_id, version, e)
            return P.WeightsApplied(worker_id=self.worker_id, version=version, ok=False, error=str(e),
                                    seconds=time.perf_counter() - t0)
        if applied != version:  # answered under the announced version, so the coordinator matches it
            return P.WeightsApplied(worker_id=self.worker_id, version=version, ok=False,
                                    error=f"received weights v{applied}, the coordinator announced v{version}",
                                    seconds=time.perf_counter() - t0)
        return P.WeightsApplied(worker_id=self.worker_id, version=version, ok=True, seconds=time.perf_counter() - t0,
                                probe_error=self.receiver.last_probe_error)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.link.close()
        self.weights_rx.close()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup short
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rl_engine.actors.rollout_worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--heartbeat", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--die-after-requests", type=int, default=None, help="fault injection (tests)")
    parser.add_argument("--hold-a-request-until-update", action="store_true", help="fault injection (tests)")
    parser.add_argument("--step-once-file-exists", metavar="PATH", default=None, help="fault injection (tests)")
    args = parser.parse_args(argv)
    # The launcher stops workers with SIGTERM: exit through the `finally` below (and atexit), which unlink
    # the shared-memory staging regions (two copies of the model) instead of leaving them in /dev/shm.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.worker_id} %(levelname)s %(name)s: %(message)s")
    auth = RunAuth.from_env()
    cfg = load_actor_config(args.config)
    try:
        worker = RolloutWorker(cfg, auth=auth, worker_id=args.worker_id, coordinator=args.coordinator, heartbeat=args.heartbeat,
                               die_after_requests=args.die_after_requests,
                               hold_a_request_until_update=args.hold_a_request_until_update,
                               step_once_file_exists=args.step_once_file_exists)
    except Exception as e:
        report_startup_failure(args.coordinator, auth=auth, actor_id=args.worker_id, error=e)
        raise
    try:
        worker.serve()
    finally:
        worker.close()


if __name__ == "__main__":
    main()
