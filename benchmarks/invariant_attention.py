"""The batch-invariant attention (`model.batch_invariant` on CPU) against SDPA, timed in the same run: one
decode call of a layer shaped like the ~3M model of benchmarks/generate.py (8 query heads, 2 kv heads,
head dim 32, block size 16) over `--context` cached keys, at batch 1 and 64: the C++ kernel
(`rl_engine/kernels/cpu/csrc/invariant_attention.cpp`, reading the paged cache in place), the torch
implementation it replaces (`invariant.attention` over the gathered keys, the fallback) and the default
engine's SDPA over gathered blocks. Microseconds per call (wall time), best of `--repeats` interleaved
rounds.

    python benchmarks/invariant_attention.py [--threads 1] [--context 100] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench_helpers import emit, parse_args
from rl_engine.kernels import invariant

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 8, 2, 32, 16


def per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--context", type=int, default=100, help="cached keys per row (the query's position + 1)")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200, help="calls per timing at batch 1 (fewer at larger batches)")
    args = parse_args(ap, smoke={"batches": "1,4", "repeats": 1, "calls": 5})
    if not invariant.native_attention("cpu"):
        emit({"benchmark": "invariant_attention", "skipped": "the C++ invariant attention did not build (see the log)"})
        return
    torch.set_num_threads(args.threads)
    dtype, length = getattr(torch, args.dtype), args.context
    blocks = -(-length // BLOCK)
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = (torch.randn(4 * blocks + 1, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).to(dtype) for _ in range(2))
    scale = HEAD_DIM ** -0.5
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen).to(dtype)
        table = torch.randperm(4 * blocks, generator=gen)[:blocks].add(1).int()  # scattered blocks, shared
        tables = table[None].repeat(batch, 1)
        table_rows = torch.arange(batch, dtype=torch.int32)
        positions = torch.full((batch,), length - 1, dtype=torch.int32)
        padded = invariant.padded_length(length)
        slots = invariant.paged_slots(tables, padded, BLOCK).reshape(-1)

        def cpp():
            return invariant.paged_attention(q, k_cache, v_cache, tables, table_rows, positions, scale=scale)

        def torch_blocks():  # the fallback: gather each row's keys, then the fixed-block torch ops
            k = k_cache.flatten(0, 1).index_select(0, slots).view(batch, padded, KV_HEADS, HEAD_DIM)
            v = v_cache.flatten(0, 1).index_select(0, slots).view(batch, padded, KV_HEADS, HEAD_DIM)
            return invariant.attention(q, k, v, positions.long(), scale=scale)

        def sdpa():  # the default engine's decode: gathered blocks, GQA group on SDPA's query axis
            k = k_cache.index_select(0, table.long()).view(1, -1, KV_HEADS, HEAD_DIM)[:, :length]
            v = v_cache.index_select(0, table.long()).view(1, -1, KV_HEADS, HEAD_DIM)[:, :length]
            k, v = (t.transpose(1, 2).expand(batch, -1, -1, -1) for t in (k, v))
            return F.scaled_dot_product_attention(q.view(batch, KV_HEADS, -1, HEAD_DIM), k, v, scale=scale)

        torch.testing.assert_close(cpp().float(), sdpa().reshape(batch, HEADS, HEAD_DIM).float(),
                                   atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=0)
        calls = max(2, int(args.calls / batch ** 0.5))
        fns = {"cpp": cpp, "torch": torch_blocks, "sdpa": sdpa}
        best = {name: float("inf") for name in fns}
        for _ in range(args.repeats):  # in turn each round: a burst of load hits all three alike
            for name, fn in fns.items():
                best[name] = min(best[name], per_call_us(fn, calls))
        rows.append({"batch": batch, "context": length, "cpp_us": round(best["cpp"], 1),
                     "torch_us": round(best["torch"], 1), "sdpa_us": round(best["sdpa"], 1),
                     "cpp_over_sdpa": round(best["cpp"] / best["sdpa"], 2),
                     "cpp_over_torch": round(best["cpp"] / best["torch"], 3)})
    emit({"benchmark": "invariant_attention", "threads": args.threads, "dtype": args.dtype, "results": rows})


if __name__ == "__main__":
    main()
