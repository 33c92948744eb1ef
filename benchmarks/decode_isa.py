"""The C++ paged decode attention's vector paths against each other, timed in the same run: the engine's build
of `rl_engine/kernels/cpu/csrc/cpu_ops.cpp` ("native": AVX-512 where the CPU has it), its AVX2 build (AVX-512
switched off: what an AVX2-only CPU runs) and its portable build (plain C++ loops that the compiler vectorises
with the same -march=native: what such a CPU ran before the AVX2 path), from `kernels.cpu.isa_variant`.

One timed call is one decode step's attention over every layer of a model of benchmarks/generate.py (3m: 4
layers, 8 query / 2 kv heads of dim 32) or vs_vllm.py (40m: 8 layers, 8 / 2 heads of dim 64), each layer with
its own K/V pool, at `--rows` sequences of random context lengths in `--context`, their 16-token blocks
scattered over the pool like a block manager's after some churn. Reports microseconds per layer call and the
ratios over the portable and the native builds.

    python benchmarks/decode_isa.py [--models 3m,40m] [--rows 1,64] [--dtypes float32,bfloat16]
                                    [--isas native,avx2,portable] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
from types import ModuleType

import torch

from bench_helpers import emit, interleaved_best, parse_args
from rl_engine.kernels import cpu

# name -> (layers, query heads, kv heads, head dim): generate.py's 3m and vs_vllm.py's 40m
MODELS = {"3m": (4, 8, 2, 32), "40m": (8, 8, 2, 64)}


def builds(isas: list[str]) -> dict[str, ModuleType]:
    """Each requested build of cpu_ops.cpp: "native" is the engine's, the others `cpu.isa_variant`'s."""
    out = {}
    for isa in isas:
        out[isa] = cpu.extension() if isa == "native" else cpu.isa_variant(isa)
    return out


def step_inputs(model: str, *, rows: int, context: tuple[int, int], block_size: int, dtype: torch.dtype,
                seed: int = 0) -> tuple[list[tuple], int]:
    """One decode step's attention calls (one argument tuple per layer) and its longest context."""
    layers, heads, kv_heads, dim = MODELS[model]
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(context[0], context[1] + 1, (rows,), generator=gen, dtype=torch.int32)
    max_len = int(lens.max())
    per_row = math.ceil(max_len / block_size)
    num_blocks = 2 * rows * per_row  # half the pool in use, like a cache that has seen other requests
    calls = []
    for _ in range(layers):
        k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
        v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
        tables = torch.randperm(num_blocks, generator=gen)[:rows * per_row].view(rows, per_row).int()
        q = torch.randn(rows, heads, dim, generator=gen).to(dtype)
        calls.append((q, k_cache, v_cache, tables, lens, dim ** -0.5, max_len))
    return calls, max_len


def bench_cell(modules: dict[str, ModuleType], model: str, *, rows: int, dtype: torch.dtype,
               context: tuple[int, int], block_size: int, repeats: int, steps: int) -> dict:
    calls, max_len = step_inputs(model, rows=rows, context=context, block_size=block_size, dtype=dtype)
    expected = [modules[next(iter(modules))].paged_decode_attention(*args) for args in calls]
    max_diff = {}
    for isa, module in modules.items():  # the builds agree (each is tested against the reference)
        max_diff[isa] = max(float((module.paged_decode_attention(*args).float() - ref.float()).abs().max())
                            for args, ref in zip(calls, expected))

    def timed(module: ModuleType):
        def run() -> None:
            for _ in range(steps):
                for args in calls:
                    module.paged_decode_attention(*args)
        return run

    with torch.inference_mode():
        best = interleaved_best({isa: timed(module) for isa, module in modules.items()}, repeats=repeats)
    us = {isa: round(t / (steps * len(calls)) * 1e6, 1) for isa, t in best.items()}
    row = {"model": model, "rows": rows, "dtype": str(dtype).removeprefix("torch."), "max_context": max_len,
           "us_per_layer_call": us, "max_abs_diff_vs_first": {k: round(v, 7) for k, v in max_diff.items()}}
    for base in ("portable", "native"):
        if base in best:
            row[f"over_{base}"] = {isa: round(best[base] / t, 2) for isa, t in best.items() if isa != base}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="3m,40m", help=f"shape sets: {', '.join(MODELS)}")
    ap.add_argument("--rows", default="1,64", help="sequences per decode step, comma-separated")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--isas", default="native,avx2,portable",
                    help=f"builds to compare: native (the engine's) and any of {', '.join(cpu.ISA_VARIANTS)}")
    ap.add_argument("--context", default="80,192", help="min,max context length of a sequence")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the best of each build is kept")
    ap.add_argument("--steps", type=int, default=20, help="decode steps per timed round")
    # smoke: the native and AVX2 builds only (the AVX2 one is the tests' build, so CI compiles nothing extra)
    args = parse_args(ap, smoke={"models": "3m", "rows": "1", "dtypes": "float32,bfloat16", "isas": "native,avx2",
                                 "repeats": 1, "steps": 1})
    torch.set_num_threads(args.threads)
    isas = args.isas.split(",")
    unknown = sorted(set(isas) - {"native", *cpu.ISA_VARIANTS})
    if unknown:
        raise SystemExit(f"--isas: unknown builds {unknown}; choose from native, {', '.join(cpu.ISA_VARIANTS)}")
    ok, reason = cpu.extension_status()
    if not ok:
        emit({"benchmark": "decode_isa", "skipped": f"the C++ CPU kernels did not build: {reason}"})
        return
    left_out = {}
    if "avx2" in isas and not cpu.cpu_has_avx2():
        isas.remove("avx2")
        left_out["avx2"] = "this CPU lacks AVX2, FMA or F16C"
    modules = builds(isas)
    lo, hi = (int(x) for x in args.context.split(","))
    report = {"benchmark": "decode_isa", "threads": args.threads, "block_size": args.block_size,
              "context": [lo, hi], "isa": {name: module.isa() for name, module in modules.items()},
              "left_out": left_out, "cells": []}
    for model in args.models.split(","):
        for dtype in args.dtypes.split(","):
            for rows in (int(r) for r in args.rows.split(",")):
                row = bench_cell(modules, model, rows=rows, dtype=getattr(torch, dtype), context=(lo, hi),
                                 block_size=args.block_size, repeats=args.repeats, steps=args.steps)
                print(json.dumps(row), flush=True)
                report["cells"].append(row)
    emit(report)


if __name__ == "__main__":
    main()
