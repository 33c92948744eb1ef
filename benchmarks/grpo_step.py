"""Seconds per GRPO step and completion tokens/s: rl_engine's colocated loop against TRL's
`GRPOTrainer` on the same tiny checkpoint, task, group size, batch and lengths, in the same run.

    pip install trl   # only for this benchmark
    python benchmarks/grpo_step.py [--steps 5 --prompts 16 --n 8 --max-new-tokens 64]

Two settings: fixed-length completions (EOS ignored, every completion `max_new_tokens` long) and
EOS-varied lengths (a random-init model stops at EOS at random points, capped at `max_new_tokens`).
Both sides start from the same random-init preset checkpoint (`--preset`, `tiny` by default: hidden 64,
2 layers, a 101-token character vocabulary; `3m`: hidden 256, 4 layers), use temperature 1, no KL term
(so no reference model), one optimizer step per generation batch, fp32 and no activation
recomputation on both sides (TRL's defaults, bf16 autocast and gradient checkpointing, are turned off:
with them TRL is about 2x slower on CPU), CPU. The two run interleaved: one step of ours after each
TRL step. `speedup_tokens_per_s` also accounts for the two sides sampling different EOS-varied
lengths (different random streams). Figures are medians over the counted steps (`s_per_step_mean`
beside them). Both sides run at `--threads` torch threads (ours through
`train.threads`, which the engine in the same process shares, running a small model's decode steps on one of
them or all, whichever measured faster for steps of their size: `kernels/cpu/threads.StepThreads`, reported as
`decode_step_threads`, rows bucket -> threads; each row reports the threads seen after the steps),
and each side's step is split into its rollout (generation, rewards) and the rest (training pass,
optimizer step, weight publication).

What each side does per step (`--prompts` P prompts x `--n` samples, 16 x 8 = 128 by default):
- TRL: `GRPOConfig(num_generations=n, per_device_train_batch_size=P*n, max_completion_length=M,
  temperature=1, top_k=0, top_p=1, beta=0, bf16=False, gradient_checkpointing=False)`, everything else
  TRL's default: loss_type "dapo" (token-level, normalised over the batch's tokens), epsilon 0.2,
  num_iterations 1 and steps_per_generation 1 (so no old log-prob forward: on-policy), scale_rewards
  "group", max_grad_norm 1, fused torch AdamW; generation by transformers' `generate` on the left-padded
  batch (no vLLM, no paged/continuous batching), then one padded forward + backward of all P*n samples.
- rl_engine (`GRPOTrainer`, single process): the engine generates from the policy's own tensors (paged
  KV, finished sequences leave the batch, behavior log-probs recorded), group advantages, shared-prefix
  packing (`train.shared_prefix` auto) into micro-batches of `--micro-batch-tokens` 8192 tokens
  (`train.micro_batch_tokens`, whose default 4096 splits the EOS-varied step's ~6k packed tokens in two: one
  micro-batch, as TRL's one padded batch, trained 64.2 -> 59.5 ms a step in an in-process A/B at 2 threads;
  fixed lengths, ~8.4k packed tokens, 3 micro-batches -> 2: 78.2 -> 77.7 ms), loss
  ppo_clip token-mean, clip 0.2, TIS on the engine's behavior log-probs (no old log-prob forward at one
  update per step), grad clip 1, torch AdamW, the new version published in place (no copy). The engine's decode
  steps are compiled (`rollout.compile_decode`; `--no-compile-decode`: eager): the compile falls in the
  uncounted first step and the row reports it (`decode_compile_s`, bucket -> seconds). `--compile-train`
  compiles the training forward's decoder layers too (`train.compile`, off by default here: the training
  pass alone ~5-8% faster in an in-process A/B, not seen above the run-to-run spread of whole steps), the
  compile in the same first step (`train_compile_s`: that step's training part less the counted steps'
  median). TRL could compile as well (transformers' `TrainingArguments.torch_compile`, compiling its whole
  model, which its `generate` also runs); it stays at TRL's default (off) here, not measured.
Both run in one process, so TRL's side also runs with what our trainer sets process-wide when it is built
(`train.keep_freed_memory`: glibc's malloc keeps freed memory instead of page-faulting it back in; its training
pass gains from it too, so the ratio is lower than against TRL in a process of its own).
Both score exact match on the `upper` task; the random-init model never answers right, so every reward
and advantage is 0 on both sides, and both still run the whole training pass (neither skips
zero-advantage samples), as they would on a batch that teaches something.

A `shared_prefix` row (skipped with `--no-shared-prefix`) runs rl_engine alone on long shared prompts
(`--prefix-prompt-len` 256 prompt tokens, `--prefix-new-tokens` 64 completion tokens, EOS ignored,
`--n` samples per prompt) with `train.shared_prefix` true against false, interleaved step by step in
the same run: the training time per step (`perf/train_s`: forward, backward and optimizer step; the
rollout is the same on both sides, the engine already shares a prompt's KV) and the whole step.

A last row (`grpo_async.py`, skipped with `--no-async`) compares rl_engine's async mode with its sync
mode (disaggregated actors, EOS-varied lengths) in the same run: s/step, completion tokens/s and the
staleness observed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_helpers import emit, parse_args, peer_missing  # noqa: E402
from grpo_async import add_arguments as add_async_arguments, async_rows  # noqa: E402


def ours(model_dir: str, data_dir: str, out_dir: str, args, *, fixed: bool):
    """Our trainer and a function running one step of it -> (seconds, completion tokens)."""
    from rl_engine.config import load_config
    from rl_engine.train_config import RLConfig
    from rl_engine.trainer import GRPOTrainer

    cfg = load_config(RLConfig, None, [
        f"model.path={model_dir}", f"data.path={data_dir}/train.jsonl", "data.eval_path=null", "warmup.path=null",
        f"train.output_dir={out_dir}", f"rollout.prompts_per_step={args.prompts}", f"rollout.n={args.n}",
        f"rollout.max_new_tokens={args.max_new_tokens}", f"rollout.ignore_eos={str(fixed).lower()}",
        "optim.lr=1e-6", f"train.threads={args.threads}", f"rollout.compile_decode={str(args.compile_decode).lower()}",
        f"train.compile={str(args.compile_train).lower()}", f"train.micro_batch_tokens={args.micro_batch_tokens}"])
    trainer = GRPOTrainer(cfg)

    rollout = trainer.rollout
    rollout_s = [0.0]

    def timed_rollout():  # generation, rewards and samples, as TRL's rollout below
        t0 = time.perf_counter()
        try:
            return rollout()
        finally:
            rollout_s[0] = time.perf_counter() - t0

    trainer.rollout = timed_rollout

    def step() -> tuple[float, float, dict]:
        t0 = time.perf_counter()
        m = trainer.step()
        step_s = time.perf_counter() - t0
        phases = {"rollout_s": rollout_s[0], "train_s": step_s - rollout_s[0], "threads": torch.get_num_threads()}
        return step_s, m["response_length/mean"] * args.prompts * args.n, phases

    return trainer, step


def interleaved(model_dir: str, data_dir: str, out_dir: str, args, *, fixed: bool) -> tuple[dict, dict]:
    """Run TRL's `GRPOTrainer` for steps + 1 steps and one step of ours after each of its steps, so a
    burst of load from elsewhere on a shared machine hits both alike. The first step of each warms up
    and is not counted. Returns (ours, TRL) figures."""
    import json

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    our_trainer, our_step = ours(model_dir, data_dir, os.path.join(out_dir, "ours"), args, fixed=fixed)
    rows = [json.loads(line) for line in open(f"{data_dir}/train.jsonl")]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")

    def exact_match(completions, answer, **_):
        return [float(c[0]["content"].strip() == a) for c, a in zip(completions, answer)]

    gen_kwargs = {"min_new_tokens": args.max_new_tokens} if fixed else {}
    config = GRPOConfig(
        output_dir=os.path.join(out_dir, "trl"), use_cpu=True, per_device_train_batch_size=args.prompts * args.n,
        num_generations=args.n, max_completion_length=args.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
        beta=0.0, learning_rate=1e-6, max_steps=args.steps + 1, logging_steps=1, save_strategy="no",
        # TRL defaults to bf16 autocast and gradient checkpointing; ours runs fp32 without activation
        # recompute, so both are turned off for the same work on both sides.
        bf16=False, gradient_checkpointing=False,
        report_to="none", generation_kwargs=gen_kwargs, seed=0, dataloader_num_workers=0)

    class Interleave(TrainerCallback):
        def __init__(self):
            self.trl_s, self.trl_phases, self.ours = [], [], []
            self.rollout_s = 0.0

        def on_step_begin(self, *a, **k):
            self.rollout_s = 0.0
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_s = time.perf_counter() - self.t0
            self.trl_s.append(step_s)
            self.trl_phases.append({"rollout_s": self.rollout_s, "train_s": step_s - self.rollout_s,
                                    "threads": torch.get_num_threads()})
            self.ours.append(our_step())

    cb = Interleave()
    torch.set_num_threads(args.threads)  # (ours set it too, at train.threads, when it was built)
    trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[cb])
    # TRL's rollout (generation, rewards, advantages; no old log-prob pass at one update per generation
    # batch) is its `_generate_and_score_completions`; the rest of its step is the training pass and
    # the optimizer step
    generate_and_score = trainer._generate_and_score_completions

    def timed_rollout(*a, **k):
        t0 = time.perf_counter()
        try:
            return generate_and_score(*a, **k)
        finally:
            cb.rollout_s += time.perf_counter() - t0

    trainer._generate_and_score_completions = timed_rollout
    with contextlib.redirect_stdout(sys.stderr):  # TRL prints its log dicts; stdout carries the JSON only
        trainer.train()
    compile_s = _compile_seconds(our_trainer, [phases for _, _, phases in cb.ours], args)
    our_trainer.close()
    # TRL logs the mean completion length of every step (logging_steps=1).
    lengths = [float(h["completions/mean_length"]) for h in trainer.state.log_history if "completions/mean_length" in h]
    trl_tokens = [n * args.prompts * args.n for n in lengths]
    ours_times, ours_tokens, ours_phases = zip(*cb.ours[1:])
    return ({**_figures(list(ours_times), list(ours_tokens), args, list(ours_phases)), **compile_s},
            _figures(cb.trl_s[1:], trl_tokens[1:], args, cb.trl_phases[1:]))


def _compile_seconds(trainer, phases: list[dict], args) -> dict:
    """The compiles of the uncounted first step: each compiled decode step's seconds (bucket -> s) as
    `decode_compile_s`, the decode steps' thread counts (`decode_step_threads`), and with train.compile the first step's training part less the counted steps'
    median as `train_compile_s`."""
    out = {}
    compiled = trainer.llm.engine.runner.compile_seconds()
    if compiled:
        out["decode_compile_s"] = {b: round(s, 1) for b, s in compiled.items()}
    chosen = trainer.llm.engine.stats().get("decode_step_threads")
    if chosen:  # (StepThreads: chosen in the first step)
        out["decode_step_threads"] = chosen
    if args.compile_train:
        out["train_compile_s"] = round(phases[0]["train_s"] - statistics.median(p["train_s"] for p in phases[1:]), 1)
    return out


def ours_alone(model_dir: str, data_dir: str, out_dir: str, args, *, fixed: bool) -> dict:
    """Our figures without TRL (not installed): steps + 1 steps, the first one not counted."""
    trainer, step = ours(model_dir, data_dir, out_dir, args, fixed=fixed)
    try:
        runs = [step() for _ in range(args.steps + 1)]
        compile_s = _compile_seconds(trainer, [phases for _, _, phases in runs], args)
    finally:
        trainer.close()
    times, tokens, phases = zip(*runs[1:])
    return {**_figures(list(times), list(tokens), args, list(phases)), **compile_s}


def shared_prefix_row(model_dir: str, tmp: str, args) -> dict:
    """`train.shared_prefix` true vs false on long shared prompts, steps interleaved (the first of each
    not counted)."""
    import json
    import random

    from rl_engine.config import load_config
    from rl_engine.train_config import RLConfig
    from rl_engine.trainer import GRPOTrainer

    data = os.path.join(tmp, "long_prompts.jsonl")
    rng = random.Random(0)
    with open(data, "w") as f:  # the character tokenizer: one token per character (no chat template)
        for _ in range(max(8, args.prompts)):
            text = "".join(rng.choice("abcdefghij ") for _ in range(args.prefix_prompt_len))
            f.write(json.dumps({"prompt": text, "answer": text[:8].upper()}) + "\n")
    trainers = {}
    for shared in (True, False):
        cfg = load_config(RLConfig, None, [
            f"model.path={model_dir}", f"data.path={data}", "data.eval_path=null", "data.apply_chat_template=false",
            "warmup.path=null", f"train.output_dir={os.path.join(tmp, f'shared_{shared}')}",
            f"rollout.prompts_per_step={args.prompts}", f"rollout.n={args.n}",
            f"rollout.max_new_tokens={args.prefix_new_tokens}", "rollout.ignore_eos=true", "optim.lr=1e-6",
            f"train.shared_prefix={str(shared).lower()}", f"train.threads={args.threads}"])
        trainers[shared] = GRPOTrainer(cfg)
    runs: dict[bool, list[dict]] = {True: [], False: []}
    try:
        for _ in range(args.steps + 1):
            for shared, trainer in trainers.items():
                t0 = time.perf_counter()
                m = trainer.step()
                runs[shared].append({**m, "step_s": time.perf_counter() - t0})
    finally:
        for trainer in trainers.values():
            trainer.close()
    out = {}
    for shared, rows in runs.items():
        rows = rows[1:]
        samples = args.prompts * args.n
        out["shared" if shared else "unshared"] = {  # medians over the counted steps
            "train_s": statistics.median(r["perf/train_s"] for r in rows),
            "s_per_step": statistics.median(r["step_s"] for r in rows),
            "micro_batches": rows[-1]["train/micro_batches"],
            "mean_prompt_len": rows[-1]["tokens/total"] / samples - rows[-1]["response_length/mean"]}
    s, u = out["shared"], out["unshared"]
    return {"mode": "shared_prefix", "rl_engine": out, "prompt_tokens": args.prefix_prompt_len,
            "completion_tokens": args.prefix_new_tokens,
            "speedup_train_s": round(u["train_s"] / s["train_s"], 2),
            "speedup_s_per_step": round(u["s_per_step"] / s["s_per_step"], 2)}


def _figures(times: list[float], tokens: list[float], args, phases: list[dict]) -> dict:
    """Medians over the counted steps (a burst of load from elsewhere on a shared machine moves a mean
    by one step's spike; the means are kept beside them); `rollout_s` / `train_s`: each step's rollout
    (generation and rewards) and the rest (the training pass, optimizer step, weight publication);
    `threads`: torch's intra-op threads seen during the steps."""
    return {"s_per_step": statistics.median(times), "s_per_step_mean": sum(times) / len(times),
            "s_per_step_min": min(times),
            "rollout_s": statistics.median(p["rollout_s"] for p in phases),
            "train_s": statistics.median(p["train_s"] for p in phases),
            "threads": sorted({p["threads"] for p in phases}),
            "completion_tokens_per_s": statistics.median(n / t for n, t in zip(tokens, times)),
            "mean_completion_len": sum(tokens) / len(tokens) / (args.prompts * args.n)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--micro-batch-tokens", type=int, default=8192,
                    help="our train.micro_batch_tokens (TRL trains the step's P x n samples as one padded batch)")
    ap.add_argument("--no-compile-decode", dest="compile_decode", action="store_false",
                    help="our rollout engine decodes eagerly (default: rollout.compile_decode, each decode step "
                         "compiled by torch.compile; the compile falls in the uncounted first step and is reported)")
    ap.add_argument("--compile-train", action="store_true",
                    help="our training forward's decoder layers compiled (train.compile: each layer's attention-free "
                         "halves; the compile falls in the uncounted first step and is reported); default eager")
    ap.add_argument("--preset", default="tiny", help="the random-init model preset both sides train (tiny, small, 3m)")
    ap.add_argument("--no-async", dest="async_rows", action="store_false",
                    help="skip the async-vs-sync actors rows (grpo_async.py)")
    ap.add_argument("--no-shared-prefix", dest="shared_prefix_row", action="store_false",
                    help="skip the shared-prefix row (train.shared_prefix true vs false on long prompts)")
    ap.add_argument("--prefix-prompt-len", type=int, default=256)
    ap.add_argument("--prefix-new-tokens", type=int, default=64)
    ap.add_argument("--only-shared-prefix", action="store_true", help="run the shared-prefix row alone")
    add_async_arguments(ap)
    args = parse_args(ap, smoke={"steps": 1, "prompts": 2, "n": 2, "max_new_tokens": 4, "threads": 1,
                                 "compile_decode": False,
                                 "async_rows": False, "prefix_prompt_len": 24, "prefix_new_tokens": 4})
    torch.set_num_threads(args.threads)
    trl_missing = peer_missing("trl", "trl")

    from rl_engine.demo_task import write_task
    from rl_engine.policy.presets import write_preset_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_preset_checkpoint(args.preset, os.path.join(tmp, "model"), seed=0)
        data_dir = os.path.join(tmp, "data")
        write_task(data_dir, "upper", seed=0)
        for fixed in (() if args.only_shared_prefix else (True, False)):
            mode = "fixed_length" if fixed else "eos_varied"
            if trl_missing:
                rows.append({"mode": mode, "rl_engine": ours_alone(model_dir, data_dir, os.path.join(tmp, mode), args,
                                                                   fixed=fixed), "trl": trl_missing})
                continue
            r_ours, r_trl = interleaved(model_dir, data_dir, os.path.join(tmp, mode), args, fixed=fixed)
            rows.append({"mode": mode, "rl_engine": r_ours, "trl": r_trl,
                         "speedup_s_per_step": round(r_trl["s_per_step"] / r_ours["s_per_step"], 2),
                         "speedup_tokens_per_s": round(r_ours["completion_tokens_per_s"]
                                                       / r_trl["completion_tokens_per_s"], 2),
                         "target": 2.0 if fixed else 3.0})
        if args.shared_prefix_row:
            rows.append(shared_prefix_row(model_dir, tmp, args))
        if args.async_rows and not args.only_shared_prefix:  # rl_engine async vs sync (actors, disaggregated), same checkpoint and task
            rows.append(async_rows(model_dir, data_dir, tmp, argparse.Namespace(**{**vars(args),
                                                                                  "steps": args.async_steps})))
    emit({"benchmark": "grpo_step", "model": f"preset {args.preset} (random init)", "prompts_per_step": args.prompts,
          "group_size": args.n, "max_new_tokens": args.max_new_tokens, "threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
