"""Property test: hundreds of random multi-turn sessions on a real engine (random tool and user
observations, random per-turn lengths and stop tokens) with a byte-level BPE on which decoding the
sampled ids and encoding the text again changes them. For every session: the trained ids are the
first prompt, then per turn the observation delta and the sampled ids, byte for byte; the loss mask is
1 exactly on the sampled ids; the trainer's recomputed log-probs of every sampled token equal the
engine's behavior log-probs (fp32, <= 1e-5: the log-prob contract, same weights)."""

from __future__ import annotations

import asyncio
import random

import torch

from agentic_helpers import write_bpe_model
from rl_engine.agentic_loop import sample_of_record
from rl_engine.inference import LLM
from rl_engine.inference.async_engine import AsyncEngine
from rl_engine.inference.chat import render_chat
from rl_engine.policy import from_pretrained
from rl_engine.policy.tokenizer import Tokenizer
from rl_engine.rl_step import build_micro_batches, forward_logprobs
from rl_engine.rollout.agentic import (EngineTurns, RolloutStats, Session, SessionLimits, TemplateDeltas,
                                       run_session)

NUM_SESSIONS = 240
TEMPERATURE = 0.9
WORDS = ["the", "quick", "brown", "fox", "calculator", "12*34", "= 413", "hello world", "tool", "arguments",
         "name", "result", "<think>", "ok."]


class RecordingTurns:
    """The engine's turns, with each prompt and sampled id list kept per session."""

    def __init__(self, inner: EngineTurns) -> None:
        self.inner, self.max_model_len = inner, inner.max_model_len
        self.turns: dict[str, list[tuple[list[int], list[int]]]] = {}

    async def generate(self, prompt_ids, params, *, key):
        out = await self.inner.generate(prompt_ids, params, key=key)
        self.turns.setdefault(key.rsplit("/t", 1)[0], []).append((list(prompt_ids), list(out.token_ids)))
        return out


async def random_agent(session: Session, item: dict) -> None:
    rng = random.Random(item["seed"])
    messages = [{"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 5)))}]
    for _ in range(rng.randint(1, 4)):
        stop = rng.sample(range(200, 320), k=rng.randint(0, 3))
        messages.append(await session.chat(messages, max_tokens=rng.randint(1, 12), stop_token_ids=stop))
        for _ in range(rng.randint(1, 2)):
            role = rng.choice(["tool", "user"])
            messages.append({"role": role, "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 4)))})


def test_random_sessions_train_on_exactly_what_was_sampled(tmp_path):
    path = write_bpe_model(str(tmp_path / "bpe"), seed=3)
    tok = Tokenizer.from_pretrained(path)
    model = from_pretrained(path, dtype=torch.float32)
    llm = LLM(model=model, tokenizer=tok, kv_cache_memory=64 << 20, seed=0)
    backend = RecordingTurns(EngineTurns(AsyncEngine(llm.engine)))
    deltas, stats = TemplateDeltas(tok), RolloutStats()
    limits = SessionLimits(max_turns=4, max_total_tokens=400, max_new_tokens=12, tool_timeout_s=1.0,
                           temperature=TEMPERATURE, seed=None)

    async def run_all():
        sessions = [Session(deltas=deltas, backend=backend, limits=limits, uid=f"s{i}", stats=stats)
                    for i in range(NUM_SESSIONS)]
        return await asyncio.gather(*(run_session(random_agent, s, {"seed": i}) for i, s in enumerate(sessions)))

    records = asyncio.run(run_all())
    assert stats.fn_errors == 0 and stats.turns >= 2 * NUM_SESSIONS

    re_encoded_differently = 0
    samples = []
    for record in records:
        turns = backend.turns[record.uid]
        assert len(turns) == record.num_turns >= 1
        # Append-only: each prompt continues the previous prompt and its sampled ids.
        expected = list(turns[0][0])
        mask = [0] * len(expected)
        for k, (prompt, sampled) in enumerate(turns):
            assert prompt[:len(expected)] == expected
            delta = prompt[len(expected):]
            assert (k == 0) == (not delta)
            if k:  # the delta is the template's text of the new messages (after the unsampled closing)
                text = tok.decode(delta, skip_special_tokens=False)
                assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>" in text
            mask += [0] * len(delta) + [1] * len(sampled)
            expected = prompt + sampled
            text = tok.decode(sampled, skip_special_tokens=False)
            re_encoded_differently += tok.encode(text, add_special_tokens=False) != sampled
        assert record.token_ids == expected  # byte for byte: prompt, deltas and sampled ids
        assert record.loss_mask == mask
        # The first prompt is the template's render of the first message.
        assert tok.decode(turns[0][0], skip_special_tokens=False) == render_chat(tok, record.messages[:1])
        sample = sample_of_record(record, reward=0.0, group=len(samples), uid=record.uid)
        assert sample.input_ids + sample.targets[-1:] == record.token_ids
        assert [0] + sample.loss_mask == mask
        samples.append(sample)
    # The tokenizer does what the property needs: many sampled id lists do not survive decode-then-encode.
    assert re_encoded_differently >= NUM_SESSIONS // 4, re_encoded_differently

    micro_batches = build_micro_batches(samples, torch.zeros(len(samples)), micro_batch_tokens=2048,
                                        temperature=TEMPERATURE)
    recomputed = forward_logprobs(model, micro_batches)
    num_checked = 0
    for mb, lp in zip(micro_batches, recomputed):
        mask = mb.loss_inputs["loss_mask"]
        assert mask.sum() > 0
        gap = (lp[mask] - mb.loss_inputs["behavior"][mask]).abs().max().item()
        assert gap <= 1e-5, gap
        num_checked += int(mask.sum())
    assert num_checked == sum(sum(r.loss_mask) for r in records)
