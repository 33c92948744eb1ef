"""EngineHost as the guest of an engine another thread owns (an RL run's loop): served requests join the
owner's batches and come back whole, the owner's outputs are untouched, and a served request that the
owner interrupts for a weight update continues with the new weights, its tokens stamped per version."""

from __future__ import annotations

import asyncio
import threading

import pytest

from rl_engine.inference import LLM, SamplingParams
from rl_engine.serve.host import EngineHost


@pytest.fixture
def llm(chat_model_dir):
    return LLM(chat_model_dir, kv_cache_memory=16 << 20)


class Loop:
    """An event loop on a thread (the server's side)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def _collect(host, prompt, params, rid, progress=None):
    outs = []
    async for out in host.generate(prompt, params, request_id=rid):
        outs.append(out)
        if progress is not None:
            progress.set()
    return outs


def test_served_requests_share_the_owners_batches(llm, chat_model_dir):
    ref = LLM(chat_model_dir, kv_cache_memory=16 << 20)
    greedy = SamplingParams(temperature=0, max_tokens=12)
    served_prompts = [f"served {i}" for i in range(6)]
    owner_prompts = [f"owner {i}" for i in range(5)]
    host, loop = EngineHost(llm.engine), Loop()
    try:
        with host.lock:  # the owner holds the engine: served requests are admitted by its steps
            futures = [loop.submit(_collect(host, p, greedy, f"s{i}")) for i, p in enumerate(served_prompts)]
            for _ in range(1000):  # every served request is waiting in the inbox
                with host._mutex:
                    if len(host._inbox) == len(served_prompts):
                        break
                threading.Event().wait(0.01)
            owner = llm.generate(owner_prompts, greedy)  # admits the served requests at its first step
            with host._mutex:
                assert not host._inbox  # they joined the owner's batch
        served = [f.result(30)[-1] for f in futures]
    finally:
        host.close()
        loop.close()
    expected_owner = ref.generate(owner_prompts, greedy)
    expected_served = ref.generate(served_prompts, greedy)
    assert [o.outputs[0].token_ids for o in owner] == [o.outputs[0].token_ids for o in expected_owner]
    assert [o.outputs[0].token_ids for o in served] == [o.outputs[0].token_ids for o in expected_served]
    assert all(o.finished and o.outputs[0].policy_versions == [0] * len(o.outputs[0].token_ids) for o in served)
    assert llm.engine.guest is None and not llm.engine.requests


def test_interrupted_request_continues_with_new_weights(llm, chat_model_dir):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    host, loop = EngineHost(llm.engine), Loop()
    try:
        with host.lock:  # the owner: it steps the served request a few times, then a weight update interrupts it
            future = loop.submit(_collect(host, "interrupt me", params, "r0"))
            for _ in range(1000):
                with host._mutex:
                    if host._inbox:
                        break
                threading.Event().wait(0.01)
            for _ in range(5):  # (the stepper cannot step meanwhile: the owner holds the lock)
                assert llm.engine.step() == []  # the served request's outputs went to its host
            partial = llm.engine.interrupt()
            assert partial == []  # the served request's partial output went back to its host, not to the owner
            done = len(llm.engine.requests["r0"].seqs[0].token_ids) - len(llm.engine.requests["r0"].prompt_token_ids)

            def scale(model):
                for p in model.parameters():
                    if p.dim() == 2:
                        p.mul_(1.5)

            llm.engine.update_weights(scale, version=7, recompute_kv=True)
        outs = future.result(60)
    finally:
        host.close()
        loop.close()
    final = outs[-1].outputs[0]
    assert final.finish_reason == "length" and len(final.token_ids) == 40
    assert done == 5
    assert final.policy_versions == [0] * done + [7] * (40 - done)  # each token stamped with its weights
    # the continuation is what the new weights say after the old tokens (KV recomputed with them)
    prompt = outs[-1].prompt_token_ids + final.token_ids[:done]
    cont = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40 - done, ignore_eos=True))[0]
    assert cont.outputs[0].token_ids == final.token_ids[done:]
    assert all(a >= b for a, b in zip([len(o.outputs[0].token_ids) for o in outs[1:]],
                                      [len(o.outputs[0].token_ids) for o in outs[:-1]]))  # never goes back


def test_disconnected_client_is_aborted_between_owner_steps(llm):
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    host, loop = EngineHost(llm.engine), Loop()
    free = llm.engine.block_manager.num_free_blocks
    progress = threading.Event()
    try:
        future = loop.submit(_collect(host, "long", params, "gone", progress))
        progress.wait(30)
        future.cancel()  # the server's task consuming it goes away
        for _ in range(500):
            if not llm.engine.requests:
                break
            threading.Event().wait(0.01)
        assert not llm.engine.requests and llm.engine.block_manager.num_free_blocks == free
    finally:
        host.close()
        loop.close()


def test_weights_version_of_a_request_arriving_during_an_update(llm):
    """Arriving while the owner holds the engine for a weight update, it waits, then samples with the
    new version only."""
    params = SamplingParams(temperature=0, max_tokens=6)
    host, loop = EngineHost(llm.engine), Loop()
    try:
        with host.lock:
            future = loop.submit(_collect(host, "during update", params, "u"))
            threading.Event().wait(0.2)
            assert not future.done()  # waits for the owner
            llm.engine.update_weights(lambda m: None, version=3)
        out = future.result(30)[-1]
    finally:
        host.close()
        loop.close()
    assert out.outputs[0].token_ids and out.outputs[0].policy_versions == [3] * len(out.outputs[0].token_ids)


def test_owner_gets_the_engine_while_served_requests_run(llm):
    """The lock is owner-first: an owner (a weight update) asking for the engine while the stepper serves a
    long request gets it after the step in progress, not once the request is done."""
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    host, loop = EngineHost(llm.engine), Loop()
    progress = threading.Event()
    try:
        future = loop.submit(_collect(host, "a long one", params, "r0", progress))
        assert progress.wait(30)  # the stepper is stepping it
        for _ in range(20):
            with host.lock:
                request = llm.engine.requests["r0"]  # still running
                assert len(request.seqs[0].token_ids) < len(request.prompt_token_ids) + 400
        outs = future.result(120)
    finally:
        host.close()
        loop.close()
    assert len(outs[-1].outputs[0].token_ids) == 400


def test_a_request_the_engine_cannot_add_fails_alone(llm, monkeypatch):
    """An error adding one served request (any exception, not only bad input) goes to that request's
    stream; the stepper lives on and serves the next one."""
    add_request = llm.engine.add_request

    def failing(rid, *args, **kwargs):
        if rid == "bad":
            raise RuntimeError("cannot add this one")
        return add_request(rid, *args, **kwargs)

    monkeypatch.setattr(llm.engine, "add_request", failing)
    params = SamplingParams(temperature=0, max_tokens=4)
    host, loop = EngineHost(llm.engine), Loop()
    try:
        with pytest.raises(RuntimeError, match="cannot add this one"):
            loop.submit(_collect(host, "bad one", params, "bad")).result(30)
        out = loop.submit(_collect(host, "good one", params, "good")).result(30)[-1]
    finally:
        host.close()
        loop.close()
    assert out.finished and len(out.outputs[0].token_ids) == 4
