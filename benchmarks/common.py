"""Shared benchmark helpers: timing and this machine's matmul peak, measured in the same run."""

from __future__ import annotations

import json
import os
import sys
import time

import torch


def unshadow_installed_packages() -> None:
    """Drop this folder from sys.path once `common` is imported. Python puts a script's folder first,
    so `benchmarks/kernels.py` would stand in for the `kernels` package that transformers imports
    whenever that package is installed (then every transformers model fails to load)."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]


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


def emit(result: dict) -> None:
    print(json.dumps(result, indent=2))
