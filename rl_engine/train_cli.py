"""`rl-engine train [CONFIG] [key=value ...]`: run RL. With no arguments, the built-in demo: a tiny
model on the built-in task, on CPU, in this process, printing held-out accuracy before and after RL.

`placement.mode` picks how: "single_process" runs `GRPOTrainer` here (the fast path); "colocated" and
"disaggregated" start the coordinator, trainer ranks and rollout workers as processes on this machine
(`rl_engine.actors.run`), show the coordinator's progress, and stop them all on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

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
    import yaml

    from rl_engine.config import ConfigError, load_config, to_dict
    from rl_engine.train_config import RLConfig

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    path, overrides = _split_args(args)
    try:
        config = load_config(RLConfig, path, overrides)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(to_dict(config), sort_keys=False))
        return 0
    if config.placement.uses_actors:
        from rl_engine.actors.run import ActorsFailed

        try:
            summary = run(config)
        except ActorsFailed as e:
            print(e.result.summary(), file=sys.stderr)
            return e.result.exit_code
        except ValueError as e:  # the model does not fit the layout, ...: nothing was started
            print(f"config error: {e}", file=sys.stderr)
            return 2
    else:
        from rl_engine.trainer import ResumeError

        try:
            summary = run(config)
        except ResumeError as e:  # raised before any step runs
            print(f"config error: {e}", file=sys.stderr)
            return 2
    print(json.dumps(summary, indent=2))
    return 0


def run(config) -> dict:
    """Warm start (if configured), evaluate, RL steps, evaluate; returns the summary. With actors
    (placement.mode colocated / disaggregated) the coordinator does the same in its own process.

    Single process: a checkpoint every `train.checkpoint_every` steps and after the last one. With
    `train.resume` it continues from a checkpoint instead of warm-starting and evaluating: weights,
    optimizer, data cursor and RNG come from it, and so does the "before" accuracy; metrics.jsonl
    keeps its rows up to the checkpoint's step and goes on from there."""
    if config.placement.uses_actors:
        from rl_engine.actors.run import run_actors

        return run_actors(config)
    from rl_engine import run_checkpoint
    from rl_engine.metrics import MetricsLogger
    from rl_engine.trainer import GRPOTrainer, ResumeError, check_resume_config

    t_start = time.perf_counter()
    out, steps = config.train.output_dir, config.train.steps
    try:
        checkpoint = run_checkpoint.resolve_resume(out, config.train.resume)
    except (FileNotFoundError, ValueError) as e:
        raise ResumeError(str(e)) from None
    if checkpoint is not None:
        check_resume_config(checkpoint, config)  # before building anything
    elif os.path.isfile(os.path.join(run_checkpoint.checkpoints_root(out), run_checkpoint.LATEST)):
        logger.warning("starting a new run in %s (train.resume=%s): its earlier checkpoints are replaced as "
                       "this run writes its own; pass train.resume=auto to continue them", out, config.train.resume)
    trainer = GRPOTrainer(config)
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
        before = trainer.before_rl.get("eval/accuracy_before")
        if before is not None:
            print(f"held-out accuracy before RL: {100 * before:.1f}%", flush=True)
        t_rl = time.perf_counter()
        saved = start if checkpoint is not None else None
        every = config.train.checkpoint_every
        with MetricsLogger(os.path.join(out, "metrics.jsonl"), total_steps=steps,
                           resume_step=start if checkpoint is not None else None) as metrics:
            for _ in range(start, steps):
                row = trainer.step()
                step = int(row.pop("step"))
                if config.train.eval_every and step % config.train.eval_every == 0:
                    row.update(trainer.evaluate())
                metrics.log(step, row)  # before the checkpoint: a resume drops rows after its step
                if every and step % every == 0:
                    trainer.save_checkpoint(step)
                    saved = step
        if saved != steps:  # the end of the run is always a checkpoint
            trainer.save_checkpoint(steps)
        rl_seconds = time.perf_counter() - t_rl
        after = trainer.evaluate().get("eval/accuracy")
        final_dir = os.path.join(out, "final_model")
        trainer.model.save_pretrained(final_dir)
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
        trainer.close()
