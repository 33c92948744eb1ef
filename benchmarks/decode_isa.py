"""The C++ decode kernels' vector paths against each other, timed in the same run: the engine's build of
`rl_engine/kernels/cpu/csrc/cpu_ops.cpp` ("native": AVX-512 where the CPU has it), its AVX2 build (AVX-512
switched off: what an AVX2-only CPU runs) and its portable build (plain C++ loops that the compiler vectorises
with the same -march=native: what such a CPU ran before the AVX2 paths), from `kernels.cpu.isa_variant`.

Three ops (`--ops`), on the shapes of a model of benchmarks/generate.py (3m: 4 layers, hidden 256, 8 query / 2 kv
heads of dim 32, intermediate 768, vocab 2k) or vs_vllm.py (40m: 8 layers, hidden 512, 8 / 2 heads of dim 64,
intermediate 1792, vocab 32k):
- attention: one decode step's paged attention over every layer, each layer with its own K/V pool, at `--rows`
  sequences of random context lengths in `--context`, their 16-token blocks scattered over the pool like a block
  manager's after some churn; microseconds per layer call.
- gemv: one batch-1 decode step's linears (per layer qkv, o, gate|up, down; then the tied head) through the one-row
  kernel (`cpu_gemv`); microseconds per step.
- argmax: the greedy pick over `--rows` rows of the vocabulary; microseconds per call.
Each row reports the ratios over the portable and the native builds.

    python benchmarks/decode_isa.py [--models 3m,40m] [--rows 1,64] [--dtypes float32,bfloat16]
                                    [--isas native,avx2,portable] [--ops attention,gemv,argmax] [--threads 1]
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
# name -> (hidden, intermediate, vocab): the same models' (vs_vllm.MODELS)
LINEARS = {"3m": (256, 768, 2048), "40m": (512, 1792, 32000)}
OPS = ("attention", "gemv", "argmax")


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


def ratios(best: dict[str, float]) -> dict:
    """Each build's speed over the portable and the native builds' (those present)."""
    return {f"over_{base}": {isa: round(best[base] / t, 2) for isa, t in best.items() if isa != base}
            for base in ("portable", "native") if base in best}


def gemv_cell(modules: dict[str, ModuleType], model: str, *, dtype: torch.dtype, repeats: int, steps: int) -> dict:
    """One batch-1 step's linears through each build's one-row kernel (its reading switch on, as in an engine's
    step), with the largest difference from the first build's outputs."""
    layers, heads, kv_heads, dim = MODELS[model]
    hidden, inter, vocab = LINEARS[model]
    gen = torch.Generator().manual_seed(0)
    shapes = [((heads + 2 * kv_heads) * dim, hidden), (hidden, heads * dim), (2 * inter, hidden), (hidden, inter)]
    weights = [torch.randn(n, k, generator=gen).to(dtype) for _ in range(layers) for n, k in shapes]
    weights.append(torch.randn(vocab, hidden, generator=gen).to(dtype))
    inputs = [torch.randn(1, w.shape[1], generator=gen).to(dtype) for w in weights]
    for module in modules.values():
        module.set_reading(True)
    try:
        outs = {isa: [module.gemv(x, w, None, None) for x, w in zip(inputs, weights)] for isa, module in modules.items()}
        first = outs[next(iter(outs))]
        max_diff = {isa: max(float((o.float() - f.float()).abs().max()) for o, f in zip(out, first))
                    for isa, out in outs.items()}

        def timed(module: ModuleType):
            def run() -> None:
                for _ in range(steps):
                    for x, w in zip(inputs, weights):
                        module.gemv(x, w, None, None)
            return run

        with torch.inference_mode():
            best = interleaved_best({isa: timed(module) for isa, module in modules.items()}, repeats=repeats)
    finally:
        for module in modules.values():
            module.set_reading(False)
    return {"op": "gemv", "model": model, "rows": 1, "dtype": str(dtype).removeprefix("torch."),
            "weights": len(weights), "us_per_step": {isa: round(t / steps * 1e6, 1) for isa, t in best.items()},
            "max_abs_diff_vs_first": {k: round(v, 7) for k, v in max_diff.items()}, **ratios(best)}


def argmax_cell(modules: dict[str, ModuleType], model: str, *, rows: int, dtype: torch.dtype, repeats: int,
                steps: int) -> dict:
    """The greedy pick over [rows, vocab] logits in each build; every build must give torch.max's indices."""
    vocab = LINEARS[model][2]
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows)).to(dtype)
    expected = logits.float().argmax(dim=-1)
    agree = {isa: bool(torch.equal(module.argmax_rows(logits), expected)) for isa, module in modules.items()}

    def timed(module: ModuleType):
        def run() -> None:
            for _ in range(steps):
                module.argmax_rows(logits)
        return run

    best = interleaved_best({isa: timed(module) for isa, module in modules.items()}, repeats=repeats)
    return {"op": "argmax", "model": model, "rows": rows, "vocab": vocab, "dtype": str(dtype).removeprefix("torch."),
            "us_per_call": {isa: round(t / steps * 1e6, 1) for isa, t in best.items()},
            "equal_to_torch_argmax": agree, **ratios(best)}


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
    return {"op": "attention", "model": model, "rows": rows, "dtype": str(dtype).removeprefix("torch."),
            "max_context": max_len, "us_per_layer_call": us,
            "max_abs_diff_vs_first": {k: round(v, 7) for k, v in max_diff.items()}, **ratios(best)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="3m,40m", help=f"shape sets: {', '.join(MODELS)}")
    ap.add_argument("--rows", default="1,64", help="sequences per decode step, comma-separated")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--isas", default="native,avx2,portable",
                    help=f"builds to compare: native (the engine's) and any of {', '.join(cpu.ISA_VARIANTS)}")
    ap.add_argument("--ops", default=",".join(OPS), help=f"ops to time: {', '.join(OPS)}")
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
    ops = args.ops.split(",")
    if set(ops) - set(OPS):
        raise SystemExit(f"--ops: unknown ops {sorted(set(ops) - set(OPS))}; choose from {', '.join(OPS)}")
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
    def add(row: dict) -> None:
        print(json.dumps(row), flush=True)
        report["cells"].append(row)

    timing = {"repeats": args.repeats, "steps": args.steps}
    for model in args.models.split(","):
        for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
            if "gemv" in ops:
                add(gemv_cell(modules, model, dtype=dtype, **timing))
            for rows in (int(r) for r in args.rows.split(",")):
                if "attention" in ops:
                    add(bench_cell(modules, model, rows=rows, dtype=dtype, context=(lo, hi),
                                   block_size=args.block_size, **timing))
                if "argmax" in ops:
                    add(argmax_cell(modules, model, rows=rows, dtype=dtype, **timing))
    emit(report)


if __name__ == "__main__":
    main()
