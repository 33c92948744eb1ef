"""Launch overhead of Ray against the local launcher, in the same run: start-up seconds and
steady-state seconds per step of the same toy disaggregated run (a coordinator, one trainer rank, one
rollout worker), started by `placement.launcher=local` and by `placement.launcher=ray` with a private
Ray instance (`ray.address=null`: started for the run, stopped after it, so its start is counted).

    python benchmarks/launch_overhead.py [--steps 12 --repeats 2 --prompts 8 --max-new-tokens 48]

Start-up: from `run_actors` being called to the start of step 1 (the same config resolution and
pre-training evaluation for both). Steady state: the median `time/step_s` of steps 2..N (what Ray
could cost once the processes run: nothing is expected, ZMQ and torch.distributed do the talking).
The runs alternate local/ray `--repeats` times; the best of each is kept. Target: Ray's steady-state
step time within 5% of the local launcher's.

Network: Ray binds the machine's interface address even when told 127.0.0.1, so this script re-executes
itself inside a network namespace of its own with only loopback (`unshare -n`, as root), where Ray's
node comes up on 127.0.0.1 and no traffic leaves the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench_helpers import emit, parse_args  # noqa: E402


def one_run(out_dir: str, args, *, launcher: str) -> dict:
    from rl_engine.actors.run import run_actors
    from rl_engine.config import load_config
    from rl_engine.train_config import RLConfig

    overrides = ["warmup.steps=0", "data.num_eval=8", f"train.steps={args.steps}",
                 f"rollout.prompts_per_step={args.prompts}", "rollout.n=4",
                 f"rollout.max_new_tokens={args.max_new_tokens}", "reward.num_workers=0",
                 "placement.mode=disaggregated", "placement.num_rollout_workers=1", f"train.output_dir={out_dir}",
                 f"placement.launcher={launcher}"]
    if launcher == "ray":  # three processes on a machine of perhaps two cores: ask for half a CPU each
        overrides += ["ray.address=null", *(f"ray.{role}_resources={{CPU: 0.5}}"
                                            for role in ("trainer", "rollout", "coordinator"))]
    cfg = load_config(RLConfig, None, overrides)
    t0 = time.time()
    run_actors(cfg, echo_stream=io.BytesIO())
    total = time.time() - t0
    with open(os.path.join(out_dir, "metrics.wallclock.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    first_step_start = steps[0]["time/unix"] - steps[0]["time/step_s"]
    return {"startup_s": first_step_start - t0, "step_s": statistics.median(r["time/step_s"] for r in steps[1:]),
            "total_s": total}


def inside(args) -> None:
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for launcher in ("local", "ray"):
                with contextlib.redirect_stdout(sys.stderr):  # progress lines; stdout is the JSON
                    got = one_run(os.path.join(tmp, f"{launcher}_{repeat}"), args, launcher=launcher)
                prev = best.get(launcher)
                best[launcher] = got if prev is None else {k: min(prev[k], got[k]) for k in got}
    emit({"benchmark": "launch_overhead", "steps": args.steps, "repeats": args.repeats,
          "local": best["local"], "ray": best["ray"],
          "ray_startup_extra_s": best["ray"]["startup_s"] - best["local"]["startup_s"],
          "ray_over_local_step_time": best["ray"]["step_s"] / best["local"]["step_s"],
          "target_ray_over_local_step_time": 1.05})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--inside", action="store_true", help="already in a loopback-only network namespace")
    args = parse_args(parser, smoke={"steps": 2, "repeats": 1, "prompts": 2, "max_new_tokens": 4})
    if args.steps < 2 or args.repeats < 1:
        parser.error("--steps must be >= 2 (step 1 is start-up) and --repeats >= 1")
    if args.inside:
        inside(args)
        return
    cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable,
           os.path.abspath(__file__), "--inside", "--steps", str(args.steps), "--repeats", str(args.repeats),
           "--max-new-tokens", str(args.max_new_tokens), "--prompts", str(args.prompts)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE)
    if proc.returncode != 0:
        sys.exit(f"launch_overhead: the run in a network namespace failed (exit {proc.returncode}); `unshare -n` "
                 "needs root (or user namespaces)")
    sys.stdout.buffer.write(proc.stdout)


if __name__ == "__main__":
    main()
