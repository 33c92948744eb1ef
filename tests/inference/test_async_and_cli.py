"""The asyncio engine streams; `rl-engine generate` works end to end."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from inference_helpers import mixed_prompts
from rl_engine import LLM, SamplingParams
from rl_engine.inference import AsyncEngine


def test_async_generate_streams_and_matches_offline(qwen2):
    prompts = mixed_prompts(3, seed=30)
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=4, ignore_eos=True)
    offline = LLM(qwen2[1]).generate(prompts, params)
    engine = AsyncEngine.from_llm(LLM(qwen2[1]))

    async def consume(prompt, rid):
        seen = []
        async for out in engine.generate(prompt, params, request_id=rid):
            seen.append(list(out.outputs[0].token_ids))
        return seen, out

    async def consume_bad():
        with pytest.raises(ValueError, match="max_model_len"):
            async for _ in engine.generate([5] * 600, params):
                pass
        return "refused"

    async def run():
        return await asyncio.gather(*(consume(p, f"a{i}") for i, p in enumerate(prompts)), consume_bad())

    *results, bad = asyncio.run(run())
    assert bad == "refused"
    for (seen, final), ref in zip(results, offline):
        assert final.finished and final.outputs[0].token_ids == ref.outputs[0].token_ids
        assert [len(s) for s in seen] == list(range(1, 9))  # one more token per streamed output
        assert all(a == b[:len(a)] for a, b in zip(seen, seen[1:]))


def test_async_interrupt_ends_streams_with_partial_outputs(qwen2):
    engine = AsyncEngine.from_llm(LLM(qwen2[1]))
    params = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)

    async def run():
        streams = [engine.generate(p, params) for p in mixed_prompts(2, seed=31)]
        firsts = [await s.__anext__() for s in streams]
        partial = await engine.interrupt()
        lasts = []
        for s in streams:
            async for out in s:  # outputs queued before the interrupt, then the partial one
                pass
            lasts.append(out)
        version = await engine.update_weights()
        return firsts, partial, lasts, version

    firsts, partial, lasts, version = asyncio.run(run())
    assert len(partial) == 2 and all(p.outputs[0].finish_reason == "abort" for p in partial)
    assert [o.outputs[0].finish_reason for o in lasts] == ["abort", "abort"]
    assert [o.outputs[0].token_ids for o in lasts] == [p.outputs[0].token_ids for p in partial]
    assert all(len(f.outputs[0].token_ids) >= 1 for f in firsts)
    assert version == 1


def test_cli_generate(char_model, capsys):
    from rl_engine.cli import main

    assert main(["generate", "--model", char_model, "--prompt", "Hi", "--prompt-ids", "5,6,7", "--max-tokens", "5",
                 "--temperature", "0", "--ignore-eos", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert lines[0]["prompt"] == "Hi" and lines[1]["prompt_token_ids"] == [5, 6, 7]
    assert all(len(line["outputs"][0]["token_ids"]) == 5 for line in lines)
    assert main(["generate", "--model", char_model, "--chat", "2+2?", "--max-tokens", "3", "--seed", "1"]) == 0
    assert main(["generate", "--model", char_model, "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p = 0.0 is invalid" in capsys.readouterr().err


def test_cli_entry_point_runs(char_model):
    out = subprocess.run([sys.executable, "-m", "rl_engine.cli", "generate", "--model", char_model, "--prompt", "ab",
                          "--max-tokens", "4", "--temperature", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 1
