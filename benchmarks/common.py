"""Shared benchmark helpers: timing and this machine's matmul peak, measured in the same run."""

from __future__ import annotations

import json
import time

import torch


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


def matmul_peak_step(n: int = 1536, dtype: torch.dtype = torch.float32):
    """(function, flops): one large square matmul, this machine's practical dense-compute roofline.
    Time it with `interleaved_best` beside the workload it is the baseline for."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return (lambda: a @ b), 2 * n ** 3


def matmul_peak_flops(n: int = 1536, dtype: torch.dtype = torch.float32) -> float:
    fn, flops = matmul_peak_step(n, dtype)
    return flops / best_of(fn, repeats=5)


def emit(result: dict) -> None:
    print(json.dumps(result, indent=2))
