"""Ports bound before they are published (rl_engine.launch.ports): the coordinator's sockets are held from
build_specs to the coordinator, a ZMQ socket serves an inherited listener, and a wrong fd is refused."""

from __future__ import annotations

import dataclasses
import errno
import os
import socket

import pytest
import zmq

from rl_engine import protocol as P
from rl_engine.actors.run import build_specs
from rl_engine.launch.ports import adopt, listen, port_of
from rl_engine.train_config import RLConfig


def _taken(port: int) -> bool:
    with socket.socket() as stranger:
        try:
            stranger.bind(("127.0.0.1", port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def test_coordinator_ports_are_held_and_passed_to_the_coordinator():
    cfg = RLConfig()
    cfg = dataclasses.replace(cfg, placement=dataclasses.replace(cfg.placement, mode="disaggregated"))
    coordinator, trainer, worker = build_specs(cfg, "run.yaml", run_id="r")
    args = list(coordinator.args)
    port, heartbeat_port = int(args[args.index("--port") + 1]), int(args[args.index("--heartbeat-port") + 1])
    fds = (int(args[args.index("--listen-fd") + 1]), int(args[args.index("--heartbeat-listen-fd") + 1]))
    try:
        assert tuple(coordinator.pass_fds) == fds
        assert _taken(port) and _taken(heartbeat_port)  # nobody can take them before the coordinator starts
        assert [adopt(fd, port=p, what="test") for fd, p in zip(fds, (port, heartbeat_port))] == list(fds)
        assert f"tcp://127.0.0.1:{port}" in worker.args and f"tcp://127.0.0.1:{heartbeat_port}" in trainer.args
        assert trainer.master_socket and not worker.master_socket and not coordinator.master_socket
    finally:
        for fd in fds:
            os.close(fd)


def test_zmq_socket_serves_an_inherited_listener():
    listener = listen("127.0.0.1")
    port = port_of(listener)
    context = zmq.Context()
    router, dealer = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    try:
        dealer.connect(f"tcp://127.0.0.1:{port}")  # before the server adopts it: waits in the backlog
        assert P.bind(router, port=port, listen_fd=listener.detach()) == f"tcp://127.0.0.1:{port}"
        dealer.send(b"hello")
        assert router.poll(10_000) and router.recv_multipart()[1] == b"hello"
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
        context.term()


def test_an_fd_that_is_not_the_published_listener_is_refused():
    listener = listen("127.0.0.1")
    with socket.socket() as unbound:
        with pytest.raises(ValueError, match=rf"listening on port {port_of(listener)}, not on the published port 1\b"):
            adopt(listener.fileno(), port=1, what="test")
        with pytest.raises(ValueError, match="not listening"):
            adopt(unbound.fileno(), port=0, what="test")
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match="is not an open socket"):
            adopt(r, port=port_of(listener), what="test")
    finally:
        os.close(r), os.close(w)
        listener.close()
