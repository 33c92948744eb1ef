"""Async against sync GRPO with the actors, in the same run: seconds per step, completion tokens/s
and the staleness observed. Used by `grpo_step.py` (its `async_rows`); runnable alone:

    python benchmarks/grpo_async.py [--steps 8 --prompts 16 --n 8 --max-new-tokens 64 --repeats 2]

Both modes run the disaggregated placement on this machine (a coordinator, one trainer rank, one
rollout worker, one torch thread each), the same tiny random-init checkpoint and `upper` task,
EOS-varied lengths, one optimizer step per `prompts_per_step` groups. Sync generates with the newest
weights and then trains; async (`rollout.mode=async`, `max_staleness` 1) keeps the worker generating
while the trainer trains and continues interrupted requests after each update. Timing is the RL phase
only (process start-up and the first step excluded); the runs alternate sync/async `--repeats` times and the best of each
is kept. Completion tokens/s counts the tokens of the samples trained on (samples dropped as too stale
are generated work thrown away, reported separately).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from bench_helpers import emit, parse_args  # noqa: E402


def run_mode(model_dir: str, data_dir: str, out_dir: str, args, *, mode: str) -> dict:
    from rl_engine.actors.run import run_actors
    from rl_engine.config import load_config
    from rl_engine.train_config import RLConfig

    cfg = load_config(RLConfig, None, [
        f"model.path={model_dir}", f"data.path={data_dir}/train.jsonl", "data.eval_path=null", "warmup.path=null",
        f"train.output_dir={out_dir}", f"train.steps={args.steps}", f"rollout.prompts_per_step={args.prompts}",
        f"rollout.n={args.n}", f"rollout.max_new_tokens={args.max_new_tokens}", "optim.lr=1e-6",
        "placement.mode=disaggregated", "placement.num_rollout_workers=1", f"rollout.mode={mode}",
        "placement.verify_probe=false"])
    summary = run_actors(cfg, echo_stream=io.BytesIO())
    rows, clock = (_read(os.path.join(out_dir, name)) for name in ("metrics.jsonl", "metrics.wallclock.jsonl"))
    # Step 1 warms up (first engine steps, first optimizer step) and is not counted.
    times = [c["time/step_s"] for c in clock[1:]]
    tokens = sum(r["response_length/mean"] * args.prompts * args.n for r in rows[1:])
    out = {"s_per_step": sum(times) / len(times), "s_per_step_min": min(times),
           "completion_tokens_per_s": tokens / sum(times),
           "mean_staleness": sum(r.get("rollout/mean_staleness", 0.0) for r in rows) / len(rows),
           "max_staleness": max(r["rollout/max_staleness"] for r in rows)}
    if mode == "async":
        out.update({k: summary["async"][k] for k in ("interrupted", "resumed", "dropped_stale")})
    return out


def _read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def async_rows(model_dir: str, data_dir: str, tmp: str, args) -> dict:
    best: dict[str, dict] = {}
    for i in range(args.repeats):
        for mode in ("sync", "async"):
            got = run_mode(model_dir, data_dir, os.path.join(tmp, f"{mode}{i}"), args, mode=mode)
            if mode not in best or got["s_per_step"] < best[mode]["s_per_step"]:
                best[mode] = got
    return {"mode": "async_vs_sync (disaggregated, eos_varied)", "sync": best["sync"], "async": best["async"],
            "speedup_s_per_step": round(best["sync"]["s_per_step"] / best["async"]["s_per_step"], 2),
            "speedup_tokens_per_s": round(best["async"]["completion_tokens_per_s"]
                                          / best["sync"]["completion_tokens_per_s"], 2)}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--async-steps", dest="async_steps", type=int, default=8,
                    help="RL steps of each async/sync actors run")
    ap.add_argument("--repeats", type=int, default=2, help="sync/async runs alternated, best of each kept")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    add_arguments(ap)
    args = parse_args(ap, smoke={"prompts": 2, "n": 2, "max_new_tokens": 4, "async_steps": 2, "repeats": 1})
    args.steps = args.async_steps

    from rl_engine.demo_task import write_task
    from rl_engine.policy.presets import write_preset_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_preset_checkpoint("tiny", os.path.join(tmp, "model"), seed=0)
        write_task(os.path.join(tmp, "data"), "upper", seed=0)
        row = async_rows(model_dir, os.path.join(tmp, "data"), tmp, args)
    emit({"benchmark": "grpo_async", "model": "preset tiny (random init)", "prompts_per_step": args.prompts,
          "group_size": args.n, "max_new_tokens": args.max_new_tokens, "steps": args.steps, "rows": [row]})


if __name__ == "__main__":
    main()
