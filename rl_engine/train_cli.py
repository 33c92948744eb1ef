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
        summary = run(config)
    print(json.dumps(summary, indent=2))
    return 0


def run(config) -> dict:
    """Warm start (if configured), evaluate, RL steps, evaluate; returns the summary. With actors
    (placement.mode colocated / disaggregated) the coordinator does the same in its own process."""
    if config.placement.uses_actors:
        from rl_engine.actors.run import run_actors

        return run_actors(config)
    from rl_engine.metrics import MetricsLogger
    from rl_engine.trainer import GRPOTrainer

    t_start = time.perf_counter()
    trainer = GRPOTrainer(config)
    out = config.train.output_dir
    try:
        warm = {}
        if trainer.warmup_path and config.warmup.steps > 0:
            print(f"warm start: {config.warmup.steps} supervised steps on {trainer.warmup_path}", flush=True)
            t0 = time.perf_counter()
            warm = trainer.warm_start()
            print(f"warm start done in {time.perf_counter() - t0:.0f}s, loss {warm['warmup/loss_last']:.3f}", flush=True)
        before = trainer.evaluate().get("eval/accuracy")
        if before is not None:
            print(f"held-out accuracy before RL: {100 * before:.1f}%", flush=True)
        t_rl = time.perf_counter()
        with MetricsLogger(os.path.join(out, "metrics.jsonl"), total_steps=config.train.steps) as metrics:
            for _ in range(config.train.steps):
                row = trainer.step()
                step = int(row.pop("step"))
                if config.train.eval_every and step % config.train.eval_every == 0:
                    row.update(trainer.evaluate())
                metrics.log(step, row)
        rl_seconds = time.perf_counter() - t_rl
        after = trainer.evaluate().get("eval/accuracy")
        final_dir = os.path.join(out, "final_model")
        trainer.model.save_pretrained(final_dir)
        summary = {"output_dir": out, "steps": config.train.steps, "rl_seconds": round(rl_seconds, 1),
                   "total_seconds": round(time.perf_counter() - t_start, 1), "final_model": final_dir, **warm}
        if before is not None and after is not None:
            print(f"held-out accuracy after RL:  {100 * after:.1f}% ({100 * (after - before):+.1f} points, "
                  f"RL phase {rl_seconds:.0f}s)", flush=True)
            summary.update({"eval_accuracy_before": before, "eval_accuracy_after": after})
        return summary
    finally:
        trainer.close()
