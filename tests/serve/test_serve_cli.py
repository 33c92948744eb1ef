"""`rl-engine serve` as a command: a server process on a free loopback port answering the official client
with its API key, its bad-flag errors, and the warning for a non-loopback host without a key."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from rl_engine.cli import main


# How long the server may take to answer /health: a guard against a hang, not a measurement. Starting it
# imports torch and builds the engine: this whole test took 20 s under nice at load ~10 on the 2-core CI
# machine; the full suite's load reaches 15-20 and stalls single processes for tens of seconds, so 60 s
# left a margin of 3x and flaked. A server that exits, or never answers, fails with its own output.
STARTUP_S = 300


def _wait_until_healthy(proc: subprocess.Popen, log_path) -> int:
    """The port the server bound (`--port 0`: the kernel picked it, the server printed it), once it answers
    /health there. The port was the server's from its bind on, so the answer is this server's."""
    deadline = time.monotonic() + STARTUP_S
    port = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited ({proc.returncode}) before answering /health; its output:\n"
                        f"{log_path.read_text()}")
        if port is None:
            found = re.search(r"serving \S+ on http://127\.0\.0\.1:(\d+)/v1", log_path.read_text())
            port = int(found.group(1)) if found else None
        if port is not None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    return port
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    pytest.fail(f"the server did not answer /health within {STARTUP_S}s; its output:\n{log_path.read_text()}")


def test_serve_command(chat_model_dir, tmp_path):
    env = {**os.environ, "RL_ENGINE_API_KEY": "k-123"}  # the key out of the process list
    log_path = tmp_path / "server.log"  # a file, not a pipe nobody reads: a full pipe would stall the server
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rl_engine.cli", "serve", chat_model_dir, "--port", "0",
                                 "--served-model-name", "m", "--max-model-len", "256", "--log-level", "warning"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        port = _wait_until_healthy(proc, log_path)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k-123", max_retries=0)
        (model,) = client.models.list().data
        assert model.id == "m" and model.max_model_len == 256
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.usage.completion_tokens == len(r.choices[0].message.content) and r.system_fingerprint == "v0"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        proc.terminate()
        proc.wait(20)


def test_a_taken_port_is_a_one_line_error(chat_model_dir, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", chat_model_dir, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on --host 127.0.0.1 --port {port}" in err and "--port (0 picks a free one" in err, err


def test_an_address_not_of_this_machine_names_the_host(chat_model_dir, capsys):
    """Not the port's fault: the fix named is --host's (192.0.2.1 is TEST-NET-1, documentation only)."""
    assert main(["serve", chat_model_dir, "--host", "192.0.2.1", "--port", "0", "--api-key", "k"]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on --host 192.0.2.1 --port 0" in err and "--host must be a name or address" in err, err
    assert "choose another --port" not in err, err


def test_bad_flags_are_one_line_errors(chat_model_dir, capsys):
    assert main(["serve", chat_model_dir, "--port", "70000"]) == 2
    assert "--port=70000 must be in [0, 65535]" in capsys.readouterr().err
    assert main(["serve", chat_model_dir, "--num-speculative-tokens", "3"]) == 2
    assert "need --speculative-method" in capsys.readouterr().err


def test_exposed_host_without_key_warns(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("RL_ENGINE_API_KEY", raising=False)
    with caplog.at_level(logging.WARNING):
        assert main(["serve", str(tmp_path / "missing"), "--host", "0.0.0.0"]) == 2  # fails before binding
    assert any("0.0.0.0 without an API key" in r.getMessage() for r in caplog.records)
