"""`rl-engine train [CONFIG] [key=value ...]`: run RL. With no arguments, the built-in demo: a tiny
model on the built-in task, on CPU, in this process, printing held-out accuracy before and after RL.

`placement.mode` picks how: "single_process" runs `GRPOTrainer` here (the fast path); "colocated" and
"disaggregated" start the coordinator, trainer ranks and rollout workers as processes on this machine
(`rl_engine.actors.run`), show the coordinator's progress, and stop them all on exit, error or Ctrl-C.

Before any work (the warm start, a process launch) the config's values are checked as it loads, then
its inputs by `check_inputs`: a mistake in either is an `InputError` that `rl-engine` prints as one
line, exiting with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rl_engine.policy import ModelConfig
    from rl_engine.train_config import RLConfig

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, help="YAML config file (default: the built-in demo)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-6 rollout.n=8")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _split_args(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    # A first positional with '=' is an override, not a config file.
    if args.config is not None and "=" in args.config and not os.path.isfile(args.config):
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def main(args: argparse.Namespace) -> int:
    """Raises `InputError` (ConfigError) for a user's mistake; `rl_engine.cli.main` prints it."""
    import yaml

    from rl_engine.config import load_config, to_dict
    from rl_engine.train_config import RLConfig

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    path, overrides = _split_args(args)
    config = load_config(RLConfig, path, overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(config), sort_keys=False))
        return 0
    if config.placement.uses_actors:
        from rl_engine.actors.run import ActorsFailed

        check_inputs(config)
        try:
            summary = run(config)
        except ActorsFailed as e:
            print(e.result.summary(), file=sys.stderr)
            return e.result.exit_code
    else:  # a ResumeError (an InputError) is raised before any step runs
        checkpoint = resume_checkpoint(config)
        check_inputs(config)
        summary = run(config, checkpoint=checkpoint)
    print(json.dumps(summary, indent=2))
    return 0


def check_inputs(config: RLConfig) -> None:
    """What the config alone cannot tell, checked before any work: the reward function, the model
    directory (config.json, every weights file's header, the tokenizer), every row of the datasets, and
    the lengths: the longest prompt against the model's context, `train.micro_batch_tokens` and the KV
    pool. Builtin models and tasks are written into the run directory first, as the run does. Raises
    `InputError` naming the file (`file:line` for a row) or `ConfigError` naming the key."""
    from rl_engine.config import ConfigError, InputError
    from rl_engine.rl_step import PromptSource
    from rl_engine.rollout.data import read_records
    from rl_engine.rollout.rewards import get_reward_fn
    from rl_engine.trainer import resolve_paths

    device = config.train.device
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={device!r} but torch sees no CUDA device; use train.device=cpu")
    try:
        get_reward_fn(config.reward.name)
    except ValueError as e:  # unknown name, module or attribute
        raise ConfigError(f"reward.name={config.reward.name!r}: {e}") from None
    model_path, data_path, eval_path, warm_path = resolve_paths(config)
    model_config = _check_model_dir(model_path)
    if config.ref.path is not None:
        from rl_engine.frozen_models import check_same_tokenizer

        _check_model_dir(config.ref.path)
        check_same_tokenizer(key="ref.path", path=config.ref.path, policy_path=model_path)
    if config.distill.teacher_path is not None:
        from rl_engine.frozen_models import check_same_tokenizer

        _check_model_dir(config.distill.teacher_path)
        check_same_tokenizer(key="distill.teacher_path", path=config.distill.teacher_path, policy_path=model_path)
    _check_speculative(config, model_config, policy_path=model_path)
    prompts = PromptSource(config, model_path=model_path, data_path=data_path, eval_path=eval_path,
                           eos_token_ids=model_config.eos_token_id)  # reads and checks every row
    if warm_path and config.warmup.steps > 0:
        rows = read_records(warm_path)
        if not rows:
            raise InputError(f"warm-start dataset {warm_path} has no rows")
        for line, row in rows:
            ok = isinstance(row, dict) and isinstance(row.get("response"), str) and (
                isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list))
            if not ok:
                raise InputError(f"{warm_path}:{line}: a warm-start row needs a string 'response' and a string "
                                 "'prompt' or a list of chat 'messages'")
    lengths = [(len(prompts.encode(item.text)), prompts.dataset.where(item.index)) for item in prompts.dataset.rows]
    eval_lengths = [(len(prompts.encode(item.text)), f"{eval_path} (held-out row {item.index + 1})")
                    for item in prompts.eval_items]
    for length, where in lengths + eval_lengths:
        if length >= model_config.max_context_len:
            raise InputError(f"{where}: the prompt has {length} tokens; the model's context holds "
                             f"{model_config.max_context_len}, with room for at least one generated token")
    _check_sample_length(config, model_config, *max(lengths))


def _check_speculative(config: RLConfig, model_config: ModelConfig, *, policy_path: str) -> None:
    """rollout.speculative against the models: a draft model's directory and tokenizer, MTP layers."""
    from rl_engine.config import ConfigError
    from rl_engine.frozen_models import check_same_tokenizer

    spec = config.rollout.speculative
    if spec is None:
        return
    if spec.method == "draft_model":
        _check_model_dir(spec.model)
        check_same_tokenizer(key="rollout.speculative.model", path=spec.model, policy_path=policy_path)
        logger.warning("rollout.speculative: the draft model %s keeps its weights while the policy trains; its "
                       "acceptance (rollout/spec_acceptance_rate) falls as the policy moves away from it", spec.model)
    elif spec.method == "mtp" and not (model_config.is_mla and model_config.num_mtp_layers):
        raise ConfigError(f"rollout.speculative.method=mtp needs a deepseek_v3 policy with MTP layers "
                          f"(num_nextn_predict_layers > 0 and their weights); {policy_path} has "
                          f"{model_config.model_type!r} with {model_config.num_mtp_layers} MTP layers. Use method "
                          "ngram or draft_model")


def _check_model_dir(path: str) -> ModelConfig:
    from rl_engine.config import InputError
    from rl_engine.policy import ModelConfig
    from rl_engine.policy.checkpoint import check_hf_files
    from rl_engine.policy.tokenizer import Tokenizer

    model_config = ModelConfig.from_pretrained(path)
    check_hf_files(path)
    try:
        Tokenizer.from_pretrained(path, eos_token_ids=model_config.eos_token_id or None)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions for a bad file
        raise InputError(f"{path}: cannot load its tokenizer ({type(e).__name__}: {e})") from None
    return model_config


def _check_sample_length(config: RLConfig, model_config: ModelConfig, longest: int, where: str) -> None:
    """The longest sample (the longest prompt, at `where`, plus rollout.max_new_tokens) must fit in a
    micro-batch and in the KV pool of each engine."""
    from rl_engine.config import ConfigError

    r, t = config.rollout, config.train
    sample = longest + r.max_new_tokens - 1  # a sample trains on its tokens but the last
    if t.micro_batch_tokens < sample:
        raise ConfigError(f"train.micro_batch_tokens={t.micro_batch_tokens} must be >= {sample}: the longest prompt "
                          f"({longest} tokens, {where}) plus rollout.max_new_tokens ({r.max_new_tokens}), minus 1")
    # Blocks of 16 tokens (the engine's default block size); block 0 is padding. A colocated engine
    # holds its rank's share of the KV heads.
    block = 16
    if model_config.is_mla:  # one latent row per token and layer, whole on every tp rank
        values_per_token = model_config.num_layers * (model_config.kv_lora_rank + model_config.head_dim)
    else:
        kv_heads = model_config.num_kv_heads
        if config.placement.mode == "colocated":
            kv_heads = max(1, kv_heads // t.tp)
        values_per_token = 2 * model_config.num_layers * kv_heads * model_config.head_dim
    block_bytes = values_per_token * block * (2 if config.model.dtype == "bfloat16" else 4)
    holds = max(0, (r.kv_cache_memory_mb << 20) // block_bytes - 1) * block
    needs = min(longest + r.max_new_tokens, model_config.max_context_len)
    if r.fn is not None:  # an agentic session grows to rollout.max_total_tokens
        needs = min(max(needs, r.max_total_tokens), model_config.max_context_len)
    if holds < needs:
        need_mb = -(-((-(-needs // block) + 1) * block_bytes) // (1 << 20))
        raise ConfigError(f"rollout.kv_cache_memory_mb={r.kv_cache_memory_mb} holds {holds} tokens of this model's "
                          f"KV cache; the longest prompt ({longest} tokens, {where}) plus rollout.max_new_tokens "
                          f"({r.max_new_tokens}), within the model's context of {model_config.max_context_len}, "
                          f"needs {needs}: give at least {need_mb}")


def resume_checkpoint(config: RLConfig) -> str | None:
    """The checkpoint a single-process run continues from (None: a fresh start), verified and checked
    against the config before anything is built; a `ResumeError` otherwise."""
    from rl_engine import run_checkpoint
    from rl_engine.trainer import ResumeError, check_resume_config

    try:
        checkpoint = run_checkpoint.resolve_resume(config.train.output_dir, config.train.resume)
    except (FileNotFoundError, ValueError) as e:
        raise ResumeError(str(e)) from None
    if checkpoint is not None:
        check_resume_config(checkpoint, config)
    return checkpoint


_RESOLVE = object()  # run(): resolve train.resume itself


def run(config: RLConfig, *, checkpoint: str | None | object = _RESOLVE) -> dict:
    """Warm start (if configured), evaluate, RL steps, evaluate; returns the summary. With actors
    (placement.mode colocated / disaggregated) the coordinator does the same in its own process.

    Single process: a checkpoint every `train.checkpoint_every` steps and after the last one. With
    `train.resume` it continues from a checkpoint instead of warm-starting and evaluating: weights,
    optimizer, data cursor and RNG come from it, and so does the "before" accuracy; metrics.jsonl
    keeps its rows up to the checkpoint's step and goes on from there. `checkpoint`: what
    `resume_checkpoint(config)` returned, when the caller resolved it already."""
    if config.placement.uses_actors:
        from rl_engine.actors.run import run_actors

        return run_actors(config)
    from rl_engine import run_checkpoint
    from rl_engine.config import to_dict
    from rl_engine.metrics import MetricsLogger
    from rl_engine.serve.host import start_run_server
    from rl_engine.trainer import GRPOTrainer

    t_start = time.perf_counter()
    out, steps = config.train.output_dir, config.train.steps
    if checkpoint is _RESOLVE:
        checkpoint = resume_checkpoint(config)  # before building anything
    if checkpoint is None and os.path.isfile(os.path.join(run_checkpoint.checkpoints_root(out), run_checkpoint.LATEST)):
        logger.warning("starting a new run in %s (train.resume=%s): its earlier checkpoints are replaced as "
                       "this run writes its own; pass train.resume=auto to continue them", out, config.train.resume)
    trainer = GRPOTrainer(config)
    server = None
    try:
        if checkpoint is not None:
            start = trainer.load_checkpoint(checkpoint)
            print(f"resumed from {checkpoint} (step {start} of {steps})", flush=True)
        else:
            start = 0
            if trainer.warmup_path and config.warmup.steps > 0:
                print(f"warm start: {config.warmup.steps} supervised steps on {trainer.warmup_path}", flush=True)
                t0 = time.perf_counter()
                trainer.before_rl.update(trainer.warm_start())
                print(f"warm start done in {time.perf_counter() - t0:.0f}s, "
                      f"loss {trainer.before_rl['warmup/loss_last']:.3f}", flush=True)
            trainer.before_rl.update({f"{k}_before": v for k, v in trainer.evaluate().items()})
        if config.train.dump_samples:
            from rl_engine.rl_step import truncate_dump

            truncate_dump(os.path.join(out, "samples.jsonl"), step=start)
        before = trainer.before_rl.get("eval/accuracy_before")
        if before is not None:
            print(f"held-out accuracy before RL: {100 * before:.1f}%", flush=True)
        # placement.serve_port: an OpenAI-compatible server on this engine. Every use of the engine and of
        # the weights it reads (a step: rollouts, training, the version bump) holds its lock.
        server = start_run_server(config, trainer.llm.engine, name="policy")
        engine_lock = server.lock if server is not None else contextlib.nullcontext()
        t_rl = time.perf_counter()
        saved = start if checkpoint is not None else None
        every = config.train.checkpoint_every
        with MetricsLogger(os.path.join(out, "metrics.jsonl"), total_steps=steps,
                           resume_step=start if checkpoint is not None else None, plot=config.metrics.plot,
                           tensorboard=config.metrics.tensorboard, wandb=config.metrics.wandb,
                           run_config=to_dict(config)) as metrics:
            for _ in range(start, steps):
                with engine_lock:
                    row = trainer.step()
                    step = int(row.pop("step"))
                    if config.train.eval_every and step % config.train.eval_every == 0:
                        row.update(trainer.evaluate())
                metrics.log(step, row)  # before the checkpoint: a resume drops rows after its step
                if every and step % every == 0:
                    with engine_lock:  # the engine's sampler state is saved
                        trainer.save_checkpoint(step)
                    saved = step
        if server is not None:
            server.close()
            server = None
        if saved != steps:  # the end of the run is always a checkpoint
            trainer.save_checkpoint(steps)
        rl_seconds = time.perf_counter() - t_rl
        after = trainer.evaluate().get("eval/accuracy")
        final_dir = os.path.join(out, "final_model")
        trainer.model.save_pretrained(final_dir)
        from rl_engine.convert import copy_model_assets

        copy_model_assets(trainer.model_path, final_dir)  # a complete model directory: tokenizer, chat template
        warm = {k: v for k, v in trainer.before_rl.items() if k.startswith("warmup/")}
        summary = {"output_dir": out, "steps": steps, "rl_seconds": round(rl_seconds, 1),
                   "total_seconds": round(time.perf_counter() - t_start, 1), "final_model": final_dir, **warm}
        if checkpoint is not None:
            summary["resumed_from_step"] = start
        if before is not None and after is not None:
            print(f"held-out accuracy after RL:  {100 * after:.1f}% ({100 * (after - before):+.1f} points, "
                  f"RL phase {rl_seconds:.0f}s)", flush=True)
            summary.update({"eval_accuracy_before": before, "eval_accuracy_after": after})
        return summary
    finally:
        if server is not None:
            server.close()
        trainer.close()
