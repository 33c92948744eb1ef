"""Listening sockets bound before their port is published, then handed to the process that serves them.

Picking a free port, closing it and letting another process bind it later leaves a window in which any
process on a shared machine can take the port (the server then fails with EADDRINUSE, or a stranger
answers its clients). Here the launcher binds and listens first (port 0: the kernel picks), publishes the
port it got, and passes the listening socket to the child that serves it as an inherited file descriptor
(`subprocess.Popen(pass_fds=...)`); the child adopts it: the TCP store of torch.distributed through
`master_listen_fd`, a ZMQ socket through `ZMQ_USE_FD`. Clients that connect before the child adopts the
socket wait in its listen backlog.
"""

from __future__ import annotations

import errno
import socket

# Rank 0 of the trainer group finds its store's listening socket here (set by the launcher).
MASTER_LISTEN_FD_ENV = "RL_ENGINE_MASTER_LISTEN_FD"


def listen(host: str, port: int = 0, *, backlog: int = 128) -> socket.socket:
    """A TCP socket bound to `host:port` (0: a port the kernel picks) and listening; read its port with
    `port_of`. Raises OSError naming the address when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT peer does not block it
        listener.bind((host, port))
        listener.listen(backlog)
    except OSError as e:
        listener.close()
        hint = " (in use by another process: choose another port, or 0 for one the kernel picks)" \
            if e.errno == errno.EADDRINUSE else ""
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}{hint}") from None
    return listener


def port_of(listener: socket.socket) -> int:
    return listener.getsockname()[1]


def adopt(fd: int, *, port: int, what: str) -> int:
    """Check that inherited `fd` is a listening TCP socket on `port` and return it (the caller's server
    takes it over). `what` names the fd's source in the error."""
    try:
        with socket.socket(fileno=fd) as probe:
            bound = probe.getsockname()[1]
            listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            probe.detach()  # the fd stays open for the server
    except OSError as e:
        raise ValueError(f"{what}: fd {fd} is not an open socket ({e.strerror}); the launcher passes it with "
                         "pass_fds to the process it starts") from None
    if bound != port or not listening:
        raise ValueError(f"{what}: fd {fd} is {'listening' if listening else 'not listening'} on port {bound}, "
                         f"not on the published port {port}")
    return fd
