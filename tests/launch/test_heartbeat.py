"""Heartbeats: the liveness rule on a fake clock, then a live monitor with sender threads and a real
sender process killed with SIGKILL. Time bounds are liveness checks (generous), never speed checks."""

import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from rl_engine import protocol as P
from rl_engine.launch.heartbeat import HeartbeatMonitor, HeartbeatSender, PeerTracker

HERE = Path(__file__).resolve().parent


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_peer_tracker_rule():
    clock = FakeClock()
    tracker = PeerTracker(timeout_s=2.0, clock=clock)
    tracker.watch("silent")  # expected but never heard from
    assert tracker.beat("w0") is True and tracker.beat("w0") is False
    clock.now += 1.5
    tracker.beat("w0")
    assert tracker.expire() == []
    clock.now += 1.0  # silent: 2.5 s, w0: 1.0 s
    assert tracker.expire() == ["silent"] and tracker.expire() == []  # reported once
    assert tracker.alive() == ["w0"] and tracker.dead() == ["silent"]
    clock.now += 5.0
    assert tracker.expire() == ["w0"]
    assert tracker.beat("w0") is True  # back from the dead
    assert tracker.alive() == ["w0"]
    tracker.forget("silent")
    assert tracker.dead() == [] and tracker.expire() == []
    with pytest.raises(ValueError, match="timeout_s"):
        PeerTracker(timeout_s=0)


def _events(monitor_kwargs: dict) -> tuple[HeartbeatMonitor, "queue.Queue[tuple[str, str]]"]:
    events: queue.Queue = queue.Queue()
    monitor = HeartbeatMonitor(on_dead=lambda p: events.put(("dead", p)),
                               on_alive=lambda p: events.put(("alive", p)), **monitor_kwargs)
    return monitor, events


def _next(events: queue.Queue, timeout_s: float = 10.0) -> tuple[str, str]:
    return events.get(timeout=timeout_s)


def _wait_for(condition, what: str, timeout_s: float = 60.0) -> None:
    """Liveness only: a condition the threads make true whatever their speed."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.01)


def test_sender_alive_then_dead_after_it_stops():
    """A live sender thread keeps its peer alive on a real monitor thread; once it stops, the peer
    is declared dead; a new sender brings it back. The monitor runs on a clock the test moves, 1 s
    (a third of the timeout) at a time and only once a heartbeat has been received at the current
    time: a live sender is then never more than 1 s silent on the monitor's clock however long the
    machine stalls either thread (on the wall clock a 3 s stall under load declared it dead), and a
    beat that did not refresh the peer fails the test instead of passing on a fast machine."""
    clock = FakeClock()
    events: queue.Queue = queue.Queue()
    declared: list[tuple[list[str], list[str]]] = []  # (dead, alive) as each death is declared

    def on_dead(peer: str) -> None:
        declared.append((monitor.dead(), monitor.alive()))
        events.put(("dead", peer))

    monitor = HeartbeatMonitor(timeout_s=3.0, clock=clock, on_dead=on_dead,
                               on_alive=lambda p: events.put(("alive", p)))
    assert monitor.address.startswith("tcp://127.0.0.1:")
    with monitor:
        sender = HeartbeatSender(monitor.address, sender_id="w0", interval_s=0.2).start()
        try:
            assert _next(events, 60.0) == ("alive", "w0")
            for _ in range(6):  # 6 s on the monitor's clock: twice the timeout, heard throughout
                clock.now += 1.0
                _wait_for(lambda: monitor.tracker.last_heard("w0") == clock.now, "a heartbeat after the clock moved")
            assert monitor.alive() == ["w0"] and events.empty()
        finally:
            sender.stop()
        # Past the timeout on the clock; again if a beat sent just before the stop lands after a move.
        event = None
        for _ in range(60):
            clock.now += 3.5
            try:
                event = events.get(timeout=1.0)
                break
            except queue.Empty:
                pass
        # The state as the death was declared: a beat of the stopped sender still in flight (in a starved
        # I/O thread) may land later and bring w0 back, so the state is not read afterwards.
        assert event == ("dead", "w0") and declared == [(["w0"], [])]
        # It comes back: alive again, heard at the clock's current time (a new sender's beat).
        sender = HeartbeatSender(monitor.address, sender_id="w0", interval_s=0.2).start()
        try:
            clock.now += 1.0
            _wait_for(lambda: monitor.tracker.last_heard("w0") == clock.now, "the new sender's heartbeat")
            assert _next(events, 60.0) == ("alive", "w0") and monitor.alive() == ["w0"]
        finally:
            sender.stop()


def test_watched_peer_that_never_beats_is_declared_dead():
    monitor, events = _events({"timeout_s": 0.5})
    with monitor:
        monitor.watch("w9")
        assert _next(events) == ("dead", "w9")


def test_bad_messages_get_error_replies_and_the_monitor_keeps_going():
    calls: list[str] = []

    def on_alive(peer: str) -> None:
        calls.append(peer)
        raise RuntimeError("callback bug")  # logged, must not kill the monitor thread

    dead: queue.Queue = queue.Queue()
    ctx = zmq.Context.instance()
    with HeartbeatMonitor(timeout_s=1.0, on_dead=dead.put, on_alive=on_alive) as monitor:
        peer = ctx.socket(zmq.DEALER)
        peer.setsockopt(zmq.LINGER, 0)
        peer.setsockopt(zmq.RCVTIMEO, 10_000)
        peer.setsockopt(zmq.IDENTITY, b"raw")
        peer.connect(monitor.address)
        try:
            peer.send_multipart([b"not msgpack"])
            _, reply = P.recv_msg(peer)
            assert isinstance(reply, P.ErrorReply) and reply.code == P.ERROR_PROTOCOL
            P.send_msg(peer, P.Ack(ref="x"))
            _, reply = P.recv_msg(peer)
            assert isinstance(reply, P.ErrorReply) and reply.code == P.ERROR_UNEXPECTED
            assert "Heartbeat" in reply.message
            P.send_msg(peer, P.Heartbeat(sender="rollout-0", time=0.0))  # in another peer's name: refused
            _, reply = P.recv_msg(peer)
            assert isinstance(reply, P.ErrorReply) and "not your identity" in reply.message
            assert monitor.alive() == []
            P.send_msg(peer, P.Heartbeat(sender="raw", time=0.0))
            assert dead.get(timeout=10) == "raw"  # the monitor survived all of the above
            assert calls == ["raw"]
        finally:
            peer.close()


def test_killed_sender_process_is_declared_dead(tmp_path):
    monitor, events = _events({"timeout_s": 1.0})
    pidfile = tmp_path / "hb.pid"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    with monitor:
        proc = subprocess.Popen([sys.executable, "-m", "launch_children", "heartbeat", monitor.address,
                                 "rollout-3", str(pidfile)], env=env)
        try:
            assert _next(events, 60.0) == ("alive", "rollout-3")  # first beat (after importing torch)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            assert _next(events) == ("dead", "rollout-3")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
