"""Running the app under uvicorn: in the foreground (`rl-engine serve`) or on a thread with its own
event loop (a server on the engine of an RL run, and tests). Binding beyond loopback without an API key
logs a warning naming the risk: anyone who reaches the port can generate from the model and read its
outputs, and, in an RL run, load the engine the run's rollouts use."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading

import uvicorn

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: resolve it
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def warn_if_exposed(host: str, api_key: str | None, *, where: str = "rl-engine serve") -> str | None:
    """The warning (logged, and returned) for a non-loopback bind without an API key; None otherwise."""
    if api_key or is_loopback(host):
        return None
    message = (f"{where}: listening on {host} without an API key: anyone who can reach this port can generate "
               "from the model, read its outputs and fill its KV cache; pass an API key (--api-key / "
               "placement.serve_api_key) or bind 127.0.0.1")
    logger.warning(message)
    return message


def uvicorn_config(app, *, host: str, port: int, log_level: str = "warning") -> uvicorn.Config:
    """uvloop and httptools where installed (dependencies of rl_engine on Linux and macOS; "auto" falls
    back to asyncio and h11): they cut the server's CPU per streamed token by ~12% against asyncio + h11
    (32 streaming clients, benchmarks/serve.py's setting); no access log (a line per request)."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="off",
                          loop="auto", http="auto", timeout_graceful_shutdown=5)


class ServerThread:
    """uvicorn on a daemon thread with its own event loop; `start()` returns once it listens."""

    def __init__(self, app, *, host: str, port: int, log_level: str = "warning") -> None:
        self.server = uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level=log_level))
        self.server.install_signal_handlers = lambda: None  # the owning process keeps its own handlers
        self.thread = threading.Thread(target=self._run, name=f"http-{port}", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.serve())
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self.error = e
        finally:
            self.loop.close()

    def start(self, timeout_s: float = 30.0) -> "ServerThread":
        self.thread.start()
        waited = 0.0
        while not self.server.started and self.thread.is_alive() and waited < timeout_s:
            self.thread.join(0.02)
            waited += 0.02
        if not self.server.started:
            raise RuntimeError(f"the HTTP server did not start: {self.error or 'timed out (port in use?)'}")
        return self

    @property
    def port(self) -> int:
        """The port it listens on (the one the OS chose for port 0)."""
        return self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
