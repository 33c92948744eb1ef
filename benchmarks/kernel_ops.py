"""Kernel benchmark: each op's resolved backend against its torch reference, measured in the same run.

Prints one JSON object: per op, the backend the registry picked, median milliseconds of the
reference (the baseline) and of the chosen implementation, and their ratio. On CPU the C++ kernels
that are the registry's CPU defaults (paged_decode_attention, rotary_kv_write, greedy_argmax) are measured against
their references; every other op resolves to its reference (ratio 1 by construction) unless
`RL_ENGINE_CPU_KERNELS=1`. Shapes are modest so a CPU run finishes in seconds:

    python benchmarks/kernel_ops.py [--device cuda] [--iters 20] [--ops rms_norm,silu_and_mul]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from bench_helpers import parse_args
from rl_engine.kernels import logprob, reference, registry


def _inputs(op: str, device: torch.device, dtype: torch.dtype) -> tuple[tuple, dict]:
    """Positional and keyword arguments of one call of `op` (a mid-size LLM layer's shapes)."""
    t, hidden, heads, kv_heads, dim = 512, 1024, 16, 4, 64
    rand = lambda *s: torch.randn(*s, device=device).to(dtype)  # noqa: E731
    if op == "rms_norm":
        return (rand(t, hidden), rand(hidden), 1e-6, rand(t, hidden)), {}
    if op == "silu_and_mul":
        return (rand(t, 2 * hidden),), {}
    if op == "apply_rotary":
        cos, sin = reference.rotary_cos_sin(torch.arange(t, device=device),
                                            torch.rand(dim // 2, device=device))
        return (rand(t, heads, dim), rand(t, kv_heads, dim), cos, sin), {}
    if op == "logprob_entropy":
        targets = torch.randint(0, 8192, (t,), device=device)
        return (rand(t, 8192), targets), {"temperature": 1.0}
    if op == "paged_decode_attention":
        batch, block_size, ctx = 16, 16, 256
        blocks_per_seq = ctx // block_size
        k_cache = rand(batch * blocks_per_seq, block_size, kv_heads, dim)
        tables = torch.randperm(batch * blocks_per_seq, device=device).view(batch, -1).int()
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        return (rand(batch, heads, dim), k_cache, rand(*k_cache.shape), tables, lens, dim ** -0.5), {}
    if op == "rotary_kv_write":  # a prefill chunk's q|k|v views, rotated and written into 16-token blocks
        qkv = rand(t, (heads + 2 * kv_heads) * dim)
        q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1)
        cos, sin = reference.rotary_cos_sin(torch.arange(t, device=device), torch.rand(dim // 2, device=device))
        caches = [rand(2 * t // 16, 16, kv_heads, dim) for _ in range(2)]
        return (q.view(t, heads, dim), k.view(t, kv_heads, dim), v.view(t, kv_heads, dim), cos, sin,
                torch.arange(t, device=device), *caches), {}
    if op == "greedy_argmax":  # a batch-64 greedy pick over a 32k vocabulary
        return (rand(64, 32000),), {}
    if op == "moe_permute":
        return (rand(t, hidden), torch.randint(0, 8, (t, 2), device=device), 8), {}
    raise ValueError(f"no benchmark inputs for op {op!r}")


BENCHMARKED = ("rms_norm", "silu_and_mul", "apply_rotary", "logprob_entropy",
               "paged_decode_attention", "rotary_kv_write", "greedy_argmax", "moe_permute")
_REFERENCES: dict[str, Callable] = {"logprob_entropy": logprob.logprob_entropy}


def _median_ms(fn: Callable, args: tuple, kwargs: dict, device: torch.device, iters: int) -> float:
    fn(*args, **kwargs)  # warm-up (and Triton compilation)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--ops", default=",".join(BENCHMARKED))
    args = parse_args(parser, smoke={"iters": 1})
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    results = {}
    with torch.no_grad():
        for op in args.ops.split(","):
            call_args, call_kwargs = _inputs(op, device, dtype)
            resolution = registry.default_registry().resolution(op, device)
            baseline_fn = _REFERENCES.get(op) or getattr(reference, op)
            baseline = _median_ms(baseline_fn, call_args, call_kwargs, device, args.iters)
            chosen = _median_ms(resolution.fn, call_args, call_kwargs, device, args.iters)
            results[op] = {"backend": resolution.backend, "reference_ms": round(baseline, 4),
                           "chosen_ms": round(chosen, 4), "speedup": round(baseline / chosen, 3)}
    print(json.dumps({"device": str(device), "dtype": args.dtype, "ops": results}, indent=2))


if __name__ == "__main__":
    main()
