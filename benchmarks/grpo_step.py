"""Seconds per GRPO step and completion tokens/s: rl_engine's colocated loop against TRL's
`GRPOTrainer` on the same tiny checkpoint, task, group size, batch and lengths, in the same run.

    pip install trl   # only for this benchmark
    python benchmarks/grpo_step.py [--steps 3 --prompts 16 --n 8 --max-new-tokens 64]

Two settings: fixed-length completions (EOS ignored, every completion `max_new_tokens` long) and
EOS-varied lengths (a random-init model stops at EOS at random points, capped at `max_new_tokens`).
Both sides start from the same random-init `tiny` preset checkpoint, use temperature 1, no KL term
(so no reference model), one optimizer step per generation batch, fp32, CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import emit  # noqa: E402


def ours(model_dir: str, data_dir: str, out_dir: str, args, *, fixed: bool) -> dict:
    from rl_engine.config import load_config
    from rl_engine.train_config import RLConfig
    from rl_engine.trainer import GRPOTrainer

    cfg = load_config(RLConfig, None, [
        f"model.path={model_dir}", f"data.path={data_dir}/train.jsonl", "data.eval_path=null", "warmup.path=null",
        f"train.output_dir={out_dir}", f"rollout.prompts_per_step={args.prompts}", f"rollout.n={args.n}",
        f"rollout.max_new_tokens={args.max_new_tokens}", f"rollout.ignore_eos={str(fixed).lower()}",
        "optim.lr=1e-6"])
    trainer = GRPOTrainer(cfg)
    times, tokens = [], []
    for i in range(args.steps + 1):  # the first step warms up and is not counted
        t0 = time.perf_counter()
        m = trainer.step()
        if i:
            times.append(time.perf_counter() - t0)
            tokens.append(m["response_length/mean"] * args.prompts * args.n)
    trainer.close()
    return {"s_per_step": sum(times) / len(times), "completion_tokens_per_s": sum(tokens) / sum(times),
            "mean_completion_len": sum(tokens) / len(tokens) / (args.prompts * args.n)}


def trl(model_dir: str, data_dir: str, out_dir: str, args, *, fixed: bool) -> dict:
    import json

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in open(f"{data_dir}/train.jsonl")]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")

    def exact_match(completions, answer, **_):
        return [float(c[0]["content"].strip() == a) for c, a in zip(completions, answer)]

    gen_kwargs = {"min_new_tokens": args.max_new_tokens} if fixed else {}
    config = GRPOConfig(
        output_dir=out_dir, use_cpu=True, per_device_train_batch_size=args.prompts * args.n,
        num_generations=args.n, max_completion_length=args.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
        beta=0.0, learning_rate=1e-6, max_steps=args.steps + 1, logging_steps=1, save_strategy="no",
        report_to="none", generation_kwargs=gen_kwargs, seed=0, dataloader_num_workers=0)

    class Timer(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_step_begin(self, *a, **k):
            self.marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.marks.append(time.perf_counter())

    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    # TRL logs the mean completion length of every step (logging_steps=1).
    lengths = [float(h["completions/mean_length"]) for h in trainer.state.log_history if "completions/mean_length" in h]
    spans = [e - b for b, e in zip(timer.marks[0::2], timer.marks[1::2])][1:]
    mean_len = sum(lengths[1:]) / max(1, len(lengths[1:])) if lengths else float("nan")
    return {"s_per_step": sum(spans) / len(spans), "completion_tokens_per_s": mean_len * args.prompts * args.n * len(spans) / sum(spans),
            "mean_completion_len": mean_len}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from rl_engine.demo_task import write_task
    from rl_engine.policy.presets import write_preset_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_preset_checkpoint("tiny", os.path.join(tmp, "model"), seed=0)
        data_dir = os.path.join(tmp, "data")
        write_task(data_dir, "upper", seed=0)
        for fixed in (True, False):
            mode = "fixed_length" if fixed else "eos_varied"
            r_ours = ours(model_dir, data_dir, os.path.join(tmp, f"ours_{mode}"), args, fixed=fixed)
            r_trl = trl(model_dir, data_dir, os.path.join(tmp, f"trl_{mode}"), args, fixed=fixed)
            rows.append({"mode": mode, "rl_engine": r_ours, "trl": r_trl,
                         "speedup_s_per_step": round(r_trl["s_per_step"] / r_ours["s_per_step"], 2),
                         "target": 2.0 if fixed else 3.0})
    emit({"benchmark": "grpo_step", "model": "preset tiny (random init)", "prompts_per_step": args.prompts,
          "group_size": args.n, "max_new_tokens": args.max_new_tokens, "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
