"""Shared benchmark helpers: the command line (`--smoke`), timing and this machine's matmul peak,
measured in the same run.

Conventions every script in benchmarks/ follows (tests/test_benchmarks_smoke.py runs each one):
- It is run as `python benchmarks/NAME.py [flags]` and ends its stdout with one JSON object, the
  result (lines before it, e.g. one JSON row per configuration as it finishes, are allowed); anything
  else goes to stderr.
- It parses its flags with `parse_args(parser, smoke={...})`: `--smoke` makes `smoke` the defaults,
  the smallest settings that still run every part of the script (seconds, figures meaningless), so CI
  catches a broken benchmark. Explicit flags still win over them.
- A comparison against a peer that is not a dependency (TRL, vLLM, ...) is skipped when the peer is not
  installed: its row says `{"skipped": "<why, and the pip install that enables it>"}`, and the rest of
  the script runs.
- No module here is named like a package someone may have installed (Python puts this folder first on
  sys.path, so `kernels.py` once stood in for Hugging Face's `kernels`, which transformers imports);
  the smoke test checks that no script name is importable from elsewhere.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch

# This checkout's rl_engine, not the one a venv's editable install points at: a script run from another checkout (a
# git worktree measured beside main with main's venv) imported main's code, since `python benchmarks/NAME.py` puts
# only benchmarks/ on sys.path (session 25). Imported before rl_engine by every script that measures it (not by
# context_parallel.py and parallel_step.py, which import rl_engine first; run those with PYTHONPATH=<checkout>).
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _CHECKOUT not in sys.path:
    sys.path.insert(1, _CHECKOUT)  # (after benchmarks/ itself, before site-packages)

SMOKE_HELP = "the smallest settings that run every part of this script (CI's check that it works; figures meaningless)"


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None, *,
               smoke: dict[str, Any]) -> argparse.Namespace:
    """`parser.parse_args(argv)` with a `--smoke` flag that turns `smoke` (dest -> value) into the
    defaults; flags given explicitly keep their values."""
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = parser.parse_args(argv)
    if args.smoke:
        unknown = sorted(set(smoke) - set(vars(args)))
        if unknown:
            raise ValueError(f"smoke settings for unknown options {unknown}")
        parser.set_defaults(**smoke)
        args = parser.parse_args(argv)
    return args


def peer_missing(module: str, pip_name: str) -> dict | None:
    """`{"skipped": ...}` when the comparison peer `module` is not installed, else None."""
    if importlib.util.find_spec(module) is not None:
        return None
    return {"skipped": f"{module} is not installed: pip install {pip_name} to run this comparison"}


def best_of(fn, *, repeats: int = 3, warmup: int = 1) -> float:
    """Best wall time of `fn()` in seconds (min is the least noisy estimate on a shared machine)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def interleaved_best(fns: dict[str, "callable"], *, repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Best wall time of each function, running them in turn each round, so that a burst of load
    from elsewhere on a shared machine hits all of them alike rather than one."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work, so that a host clock read after it times that work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_step(n: int = 1536, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """(function, flops): one large square matmul, this machine's practical dense-compute roofline.
    Time it with `interleaved_best` beside the workload it is the baseline for."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)

    def step() -> None:
        a @ b
        sync(device)

    return step, 2 * n ** 3


def matmul_peak_flops(n: int = 1536, dtype: torch.dtype = torch.float32) -> float:
    fn, flops = matmul_peak_step(n, dtype)
    return flops / best_of(fn, repeats=5)


def last_json_object(stdout: str) -> dict:
    """The JSON object that ends a script's output: from the last line starting with '{' to the end."""
    lines = stdout.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("{")]
    if not starts:
        raise ValueError(f"no JSON object in the output: {stdout[-2000:]!r}")
    return json.loads("\n".join(lines[starts[-1]:]))


def fresh_processes(script: str, argv: list[str], processes: int) -> list[dict]:
    """Run `python script *argv` `processes` times, one after another, each a fresh process, and return each
    one's final JSON object. A benchmark's ratio moves between processes more than between the rounds of one
    (allocations, page placement, the thread pool and the library state differ per process, on both sides of
    the comparison), so a figure worth a target is the median of several processes, not one process's.
    Their stderr passes through, and so do their one-line JSON rows (to this one's stderr, as they finish); a run
    that fails stops this one, naming it."""
    reports = []
    for i in range(processes):
        with subprocess.Popen([sys.executable, script, *argv], stdout=subprocess.PIPE, text=True) as proc:
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if line.startswith('{"'):
                    print(f"[process {i + 1}/{processes}] {line}", end="", file=sys.stderr, flush=True)
        if proc.returncode != 0:
            raise SystemExit(f"process {i + 1} of {processes} ({os.path.basename(script)} {' '.join(argv)}) "
                             f"exited with status {proc.returncode}; its stderr is above")
        reports.append(last_json_object("".join(lines)))
    return reports


def median_row(rows: list[dict], key: str, *, also: tuple[str, ...] = ()) -> dict:
    """Of the same row measured in several processes, the one whose `key` is the median (the lower middle
    one for an even count), with `{key}_per_process` (every process's value, in order), the same list for
    each of `also` present in the rows, and `median_process` (its index): its other figures are that
    process's own, so they stay consistent with one another."""
    if not rows:
        raise ValueError("median_row needs at least one row")
    order = sorted(range(len(rows)), key=lambda i: rows[i][key])
    pick = order[(len(rows) - 1) // 2]
    out = dict(rows[pick])
    for name in (key, *also):
        if all(name in r for r in rows):
            out[f"{name}_per_process"] = [r[name] for r in rows]
    out["median_process"] = pick
    return out


def emit(result: dict) -> None:
    print(json.dumps(result, indent=2))
