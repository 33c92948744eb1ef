"""Speculative decoding against plain decoding, measured in the same run: output tokens/s and acceptance.

Target: the ~3M-parameter Qwen2-shaped model of `generate.py` (hidden 256, 4 layers, 8 heads, 2 KV
heads, 2k vocab, random weights), fp32. Two tasks:
- repetitive: prompts that repeat a short random pattern, greedy. Like editing or extraction, where
  the output copies spans of the context, and where n-gram prompt lookup should win.
- non_repetitive: random prompts, sampled at temperature 1 (RL rollouts), where lookup finds little.
Methods: plain decoding; n-gram lookup (k = 4, n-grams of 1-4 tokens); a draft model, the target's
first layer with its embedding and head (a 1-layer "early exit" sharing the tokenizer, k = 3). With
random weights that draft is a weak predictor of the target, so its rows mostly show the cost side.
Each configuration is timed `--repeats` times, methods interleaved, best time kept (shared machine).
Greedy rows also check that speculative outputs equal plain decoding's, token for token.

    python benchmarks/speculative.py                  # batch 1 and 16, 128 new tokens
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_helpers import interleaved_best, parse_args  # noqa: E402


def write_checkpoint(path: str, *, seed: int = 0) -> str:
    from rl_engine.policy import CausalLM, ModelConfig

    hf = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 2048, "hidden_size": 256,
          "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
          "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True,
          "hidden_act": "silu", "torch_dtype": "float32", "eos_token_id": 2, "bos_token_id": 1}
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.from_hf_dict(hf))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.05)
    model.save_pretrained(path)
    return path


def early_exit_draft(target, num_layers: int = 1):
    """The target's embedding, first `num_layers` layers, final norm and head, as a smaller CausalLM."""
    from rl_engine.policy import CausalLM

    draft = CausalLM(dataclasses.replace(target.config, num_layers=num_layers), dtype=target.dtype)
    draft.load_state_dict(target.state_dict(), strict=False)
    return draft.eval()


def task_prompts(task: str, num: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(num):
        if task == "repetitive":
            pattern = torch.randint(3, vocab, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
            prompts.append((pattern * 16)[:int(torch.randint(32, 97, (1,), generator=g))])
        else:
            prompts.append(torch.randint(3, vocab, (int(torch.randint(16, 129, (1,), generator=g)),),
                                         generator=g).tolist())
    return prompts


def bench(path: str, *, batches: list[int], new_tokens: int, repeats: int) -> list[dict]:
    from rl_engine import LLM, SamplingParams

    plain = LLM(path, max_num_seqs=max(batches))
    draft = early_exit_draft(plain.model)
    methods = {
        "plain": plain,
        "ngram_k4": LLM(plain.model, max_num_seqs=max(batches), speculative_config={
            "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}),
        "draft_model_k3": LLM(plain.model, max_num_seqs=max(batches), speculative_config={
            "method": "draft_model", "model": draft, "num_speculative_tokens": 3}),
    }
    vocab = plain.model.config.vocab_size
    rows = []
    for task, temperature in (("repetitive", 0.0), ("non_repetitive", 1.0)):
        params = SamplingParams(temperature=temperature, max_tokens=new_tokens, ignore_eos=True, seed=0)
        for batch in batches:
            prompts = task_prompts(task, 4 if batch == 1 else batch, vocab, seed=batch)
            groups = [[p] for p in prompts] if batch == 1 else [prompts]  # batch 1: one prompt after another
            outputs, before = {}, {}

            def run(name):
                llm = methods[name]
                llm.reset_prefix_cache()  # every run starts cold
                outputs[name] = [o.outputs[0].token_ids for g in groups for o in llm.generate(g, params)]

            for name, llm in methods.items():
                before[name] = (llm.engine.stats().get("speculative"), llm.engine.num_steps)
            times = interleaved_best({name: (lambda n=name: run(n)) for name in methods}, repeats=repeats, warmup=1)
            tokens = len(prompts) * new_tokens
            for name, llm in methods.items():
                row = {"task": task, "mode": "greedy" if temperature == 0 else "sampled", "batch": batch,
                       "method": name, "tokens_per_s": round(tokens / times[name], 1),
                       "speedup_vs_plain": round(times["plain"] / times[name], 2)}
                spec = llm.engine.stats().get("speculative")
                if spec is not None:  # acceptance over this configuration's runs only
                    row.update(_delta(*before[name], spec, llm.engine.num_steps))
                if temperature == 0:
                    row["outputs_equal_plain"] = outputs[name] == outputs["plain"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def _delta(before: dict, steps_before: int, after: dict, steps_after: int) -> dict:
    """The engine's speculative metrics over one configuration's runs (counters after - before)."""
    drafts = after["draft_tokens"] - before["draft_tokens"]
    accepted = after["accepted_tokens"] - before["accepted_tokens"]
    verifies = after["verifies"] - before["verifies"]
    steps = steps_after - steps_before
    return {"acceptance_rate": round(accepted / drafts, 3) if drafts else 0.0,
            "mean_accepted_length": round(1 + accepted / verifies, 2) if verifies else 0.0,
            "draft_tokens_per_step": round(drafts / steps, 2) if steps else 0.0,
            "drafting_seqs_per_step": round(verifies / steps, 2) if steps else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", default="1,16")
    args = parse_args(ap, smoke={"new_tokens": 8, "repeats": 1, "batches": "1,2"})
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(os.path.join(tmp, "3m"))
        rows = bench(path, batches=[int(b) for b in args.batches.split(",")], new_tokens=args.new_tokens,
                     repeats=args.repeats)
    print(json.dumps({"benchmark": "speculative", "model": "qwen2-3m", "torch_threads": args.threads,
                      "new_tokens_per_prompt": args.new_tokens, "seconds": round(time.perf_counter() - t0, 1),
                      "results": rows}, indent=2))


if __name__ == "__main__":
    main()
