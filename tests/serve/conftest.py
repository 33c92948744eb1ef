"""A server on a free loopback port over a tiny chat checkpoint (written offline), shared by the module's
tests, and the official `openai` client bound to it."""

from __future__ import annotations

import pytest

from chat_models import write_chat_model
from serve_helpers import RunningServer


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> str:
    return write_chat_model(str(tmp_path_factory.mktemp("chat_model")), seed=0, max_position_embeddings=512)


@pytest.fixture(scope="module")
def server(chat_model_dir):
    s = RunningServer(chat_model_dir)
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return server.client()
