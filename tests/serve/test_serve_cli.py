"""`rl-engine serve` as a command: a server process on a free loopback port answering the official client
with its API key, its bad-flag errors, and the warning for a non-loopback host without a key."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from rl_engine.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command(chat_model_dir):
    port = _free_port()
    env = {**os.environ, "RL_ENGINE_API_KEY": "k-123"}  # the key out of the process list
    proc = subprocess.Popen([sys.executable, "-m", "rl_engine.cli", "serve", chat_model_dir, "--port", str(port),
                             "--served-model-name", "m", "--max-model-len", "256", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
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
