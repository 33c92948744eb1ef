"""`rl-engine serve MODEL_DIR`: the OpenAI-compatible server in the foreground, over the engine in a
process of its own (`serve.engine_process.EngineClient`).

Loopback (127.0.0.1:8000) by default. `--api-key` (or the RL_ENGINE_API_KEY environment variable, which
keeps the key out of the process list) makes every endpoint but /health require
`Authorization: Bearer KEY`; a non-loopback `--host` without a key logs a warning. The engine flags
are `rl-engine generate`'s, speculative decoding included.

The listening socket is bound before the engine is built, and the address it got is printed on stdout
(`serving MODEL on http://HOST:PORT/v1`): with `--port 0` the kernel picks a free port, which is the
server's from then on (a caller that picked a free port itself and passed it could lose it to another
process during the start).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rl_engine.inference.cli import add_engine_arguments

    parser.add_argument("model", help="Hugging Face model directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (0: a free one, printed on stdout)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' (default: $RL_ENGINE_API_KEY, else none)")
    parser.add_argument("--served-model-name", default=None, help="the model's name in the API (default: MODEL_DIR)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_engine_arguments(parser)


def main(args: argparse.Namespace) -> int:
    import functools

    import uvicorn

    from rl_engine.config import ConfigError, InputError, check_int
    from rl_engine.inference.cli import _speculative_config, build_llm
    from rl_engine.serve.app import build_app
    from rl_engine.serve.engine_process import EngineClient, EngineProcessError
    from rl_engine.serve.server import uvicorn_config, warn_if_exposed

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_int("--port", args.port, lo=0, hi=65535)
        speculative = _speculative_config(args)
    except (ConfigError, ValueError) as e:
        raise InputError(str(e)) from None
    api_key = args.api_key if args.api_key is not None else os.environ.get("RL_ENGINE_API_KEY") or None
    warn_if_exposed(args.host, api_key)
    from rl_engine.policy import ModelConfig

    ModelConfig.from_pretrained(args.model)  # a missing or bad model directory fails here, before the engine process
    listener = _listen(args.host, args.port)
    try:
        try:  # the engine in a process of its own (engine_process.py: no GIL shared with the HTTP side)
            backend = EngineClient(functools.partial(build_llm, args, model=args.model, speculative_config=speculative))
        except (ValueError, EngineProcessError) as e:
            raise InputError(str(e)) from None
        try:
            app = build_app(backend, model_name=args.served_model_name or args.model, api_key=api_key, root=args.model)
            port = listener.getsockname()[1]
            host = f"[{args.host}]" if ":" in args.host else args.host
            print(f"serving {args.model} on http://{host}:{port}/v1", flush=True)
            uvicorn.Server(uvicorn_config(app, host=args.host, port=port, log_level=args.log_level)).run(
                sockets=[listener])
        finally:
            backend.close()
    finally:
        listener.close()
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """The server's listening socket on `host`:`port` (0: a port the kernel picks)."""
    from rl_engine.config import InputError

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES):  # the port is taken, or privileged
            fix = "choose another --port (0 picks a free one and prints it)"
        else:  # a name that does not resolve (gaierror), an address not of this machine (EADDRNOTAVAIL)
            fix = "--host must be a name or address of this machine (127.0.0.1: loopback; 0.0.0.0: every interface)"
        raise InputError(f"cannot listen on --host {host} --port {port}: {e.strerror or e}; {fix}") from None
