"""Every attack of issue 13, scripted against a real disaggregated run on this machine.

While the run trains, a local process that can read the run's ports (they are in `actors.json`)
but does not hold the run's secret keeps trying to: end the run with a forged `startup_failed`,
register as `rollout-0` (to get prompts and weights, and to hand the trainer a weights address of
its own), report results and heartbeats in a worker's name, crash receivers with msgpack nested
1,000 deep, oversized frames and garbage, and push forged weight buckets (unsigned, and signed with
another run's key) into the rollout worker's weights socket. The run must complete with the same
metrics and byte-identical prompt accounting as the same run unattacked, the rejected messages must
be counted, and nothing the intruder sent may be answered or acted on.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import subprocess
import threading
import time

import msgspec
import pytest
import torch
import zmq

from rl_actor_helpers import child_pythonpath, rows, toy_config
from rl_engine import protocol as P
from rl_engine.actors.run import run_actors
from rl_engine.auth import RunAuth

DEEP = msgspec.msgpack.encode({"version": P.PROTOCOL_VERSION, "msg": msgspec.Raw(b"\x91" * 1000 + b"\x00")})
RUN = ["placement.mode=disaggregated", "train.deterministic=true", "train.steps=8"]


class Intruder:
    """Attacks the run in `out` from a thread until `stop` is set; records anything it gets back.
    Once it has done `GATE_ROUNDS` rounds (or its thread ends) it creates the file `gate`: a run whose
    rollout worker has `--step-once-file-exists gate` (`gated`) generates nothing before, so every
    attack of those rounds reaches a run in progress, however slow this thread is against the run."""

    GATE_ROUNDS = 2

    def __init__(self, out, *, gate=None) -> None:
        self.out = out
        self.gate = gate
        self.stop = threading.Event()
        self.answers: list = []
        self.listeners: set[tuple[str, int]] = set()  # (local address, pid) of every TCP listener seen
        self.rounds = 0
        self.ctx = zmq.Context()
        # Where the intruder would like the trainer to send weights (it never connects).
        self.trap = self.ctx.socket(zmq.ROUTER)
        self.trap.setsockopt(zmq.LINGER, 0)
        self.trap_address = P.bind(self.trap)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _dealer(self, address: str, identity: bytes, *, keys: RunAuth | None = None) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, 0)  # a refused handshake leaves no peer: a send would block for ever
        sock.setsockopt(zmq.IDENTITY, identity)
        if keys is not None:  # another run's keys: a well-formed CURVE client with the wrong secret
            keys.connect_as(sock, identity.decode())
        sock.connect(address)
        return sock

    def _run(self) -> None:
        try:
            self._attack()
        finally:
            self._open_gate()

    def _open_gate(self) -> None:
        if self.gate is not None:
            open(self.gate, "a").close()

    def _attack(self) -> None:
        actors = self.out / "actors.json"
        while not self.stop.is_set():
            try:
                table = json.loads(actors.read_text())
                weights = str(table["actors"]["rollout-0"]["weights_address"]).removeprefix("shm+")
                break
            except (FileNotFoundError, json.JSONDecodeError, KeyError):
                time.sleep(0.02)
        else:
            return
        other = RunAuth.generate()
        forger = other.signer("weights")
        socks = []
        while not self.stop.is_set():
            try:
                self._round(table, weights, other, forger, socks)
            except zmq.Again:  # a socket with no peer (refused): on to the next round
                pass
            self.rounds += 1
            self.listeners |= tcp_listeners()
            if self.rounds >= self.GATE_ROUNDS:
                self._open_gate()
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline:
                for s in [*socks, self.trap]:
                    if s.poll(0):
                        self.answers.append(s.recv_multipart())
                time.sleep(0.02)
            for s in socks[:-12]:  # keep the last rounds' sockets open to catch late answers
                s.close()
            socks = socks[-12:]
        for s in socks:
            s.close()

    def _round(self, table: dict, weights: str, other: RunAuth, forger, socks: list[zmq.Socket]) -> None:
        """One of each attack; the sockets it opens go into `socks`."""
        w = self._dealer(weights, b"src0-%d" % self.rounds)
        socks.append(w)
        forged = P.WeightUpdateBucket(version=self.rounds + 1, bucket_index=0, checksum="",
                                      tensors={"0": torch.full((1024,), 1e30)})
        w.send_multipart([b"\xc1garbage"])
        w.send_multipart([DEEP])
        P.send_msg(w, P.WeightUpdateBegin(version=self.rounds + 1, num_buckets=1))
        P.send_msg(w, forged)
        P.send_msg(w, forged, signer=forger)  # signed, with a key that is not the run's
        P.send_msg(w, P.WeightUpdateCommit(version=self.rounds + 1, num_buckets=1), signer=forger)
        w.send_multipart([b"\x00" * (8 << 20)])  # over the weights socket's frame limit (2 MiB for the toy model)
        for keys in (None, other):
            c = self._dealer(table["coordinator"], b"rollout-0", keys=keys)
            t = self._dealer(table["coordinator"], b"trainer", keys=keys)
            h = self._dealer(table["heartbeat"], b"rollout-0", keys=keys)
            socks += [c, t, h]
            P.send_msg(c, P.ErrorReply(code="startup_failed", message="forged: end the run"))
            P.send_msg(c, P.Hello(worker_id="rollout-0", role="rollout",
                                  capabilities={"weights_address": self.trap_address}))
            P.send_msg(c, P.GenerateResult(request_id="0:0#1", samples=[]))
            c.send_multipart([DEEP])
            P.send_msg(t, P.TrainResult(step=1, policy_version=1, metrics={"train/loss": 1e9}))
            P.send_msg(h, P.Heartbeat(sender="rollout-0", time=time.time()))
            h.send_multipart([DEEP])

    def __enter__(self) -> Intruder:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()  # its sends never block (SNDTIMEO 0): it ends within a round
        self.trap.close()
        self.ctx.destroy(linger=0)


def gated(gate):
    """edit_specs: rollout-0 generates nothing until the file `gate` exists (an `Intruder`'s)."""
    def edit(specs):
        return [dataclasses.replace(s, args=[*s.args, "--step-once-file-exists", str(gate)])
                if s.name == "rollout-0" else s for s in specs]
    return edit


def tcp_listeners() -> set[tuple[str, int]]:
    """(local address:port, pid) of every listening TCP socket on this machine (`ss -ltnpH`)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return {(line.split()[3], int(pid)) for line in out.splitlines() for pid in re.findall(r"pid=(\d+)", line)}


def run_pids(out) -> set[int]:
    """Every process of the run, from its actors.json (coordinator, actors, each trainer rank)."""
    table = json.loads((out / "actors.json").read_text())
    pids = {table["coordinator_pid"]}
    for actor in table["actors"].values():
        pids.add(int(actor["pid"]))
        pids |= {int(p) for p in str(actor.get("rank_pids", "")).split(",") if p}
    return pids


def assert_same_metrics(got: list[dict], reference: list[dict]) -> None:
    """Every metric equal, the same samples and rewards; the trainer's floats up to fp32 reduction
    order: a disaggregated worker batches requests as they arrive, so its behavior log-probs may
    differ in the last bits between two runs (the log-prob contract's 1e-5), attacked or not."""
    assert len(got) == len(reference)
    for step, (a, b) in enumerate(zip(got, reference), start=1):
        assert a.keys() == b.keys(), step
        for key in a:
            if key.startswith("train/") and isinstance(a[key], float):
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(b[key])), (step, key, a[key], b[key])
            else:
                assert a[key] == b[key], (step, key, a[key], b[key])


def _run(out, monkeypatch, *overrides, edit_specs=None) -> dict:
    child_pythonpath(monkeypatch)
    return run_actors(toy_config(out, *RUN, *overrides), echo_stream=io.BytesIO(), edit_specs=edit_specs)


@pytest.mark.parametrize("transport", ["zmq", "shm"])
def test_attacks_do_not_affect_the_run_and_are_counted(transport, tmp_path, monkeypatch):
    overrides = [f"placement.weight_transport={transport}"]
    reference = _run(tmp_path / "reference", monkeypatch, *overrides)
    gate = tmp_path / "intruder_started"
    with Intruder(tmp_path / "attacked", gate=gate) as intruder:
        # The worker generates nothing before the intruder's first 2 rounds: they reach a live run.
        attacked = _run(tmp_path / "attacked", monkeypatch, *overrides, edit_specs=gated(gate))
    assert intruder.rounds >= Intruder.GATE_ROUNDS, "the run ended before the intruder got going"
    assert (tmp_path / "attacked" / "prompts.jsonl").read_bytes() == (tmp_path / "reference" / "prompts.jsonl").read_bytes()
    assert_same_metrics(rows(tmp_path / "attacked"), rows(tmp_path / "reference"))
    assert attacked["prompts"] == reference["prompts"] and attacked["worker_deaths"] == 0
    assert intruder.answers == []  # nothing was answered, and the trainer never called the trap
    assert attacked["protocol_errors"] == 0  # nothing reached a handler
    rejected = attacked["rejected_messages"]
    assert rejected["coordinator"] > 0 and rejected["rollout-0"] > 0, rejected
    assert reference["rejected_messages"] == {"coordinator": 0, "rollout-0": 0}
    # Every socket of the run (ZMQ, torch.distributed's store and gloo) listened on loopback only.
    ours = {(address, pid) for address, pid in intruder.listeners if pid in run_pids(tmp_path / "attacked")}
    assert len({pid for _, pid in ours}) == 3, ours  # coordinator, trainer, rollout worker: all seen
    assert all(address.startswith("127.0.0.1:") for address, _ in ours), ours
