"""The batch-invariant linear (`model.batch_invariant`'s products on CPU) against F.linear, timed in
the same run: the C++ kernel (`rl_engine/kernels/cpu/csrc/invariant_linear.cpp`) and the MKL tiles it
replaces (`invariant._mm_rows`, the fallback), as time over F.linear's at each row count M, on the
linears of the ~3M model of benchmarks/generate.py (K x N: qkv 256 x 384, gate/up 256 x 1536, down
768 x 256, LM head 256 x 2048) and two of Qwen2-0.5B's (gate/up 896 x 4864, down 4864 x 896).

    python benchmarks/invariant_linear.py [--threads 1] [--dtype float32|bfloat16] [--rows 1,4,64,512,2048]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench_helpers import emit, interleaved_best, parse_args
from rl_engine.kernels import invariant

SHAPES = {"3m": [(256, 384), (256, 1536), (768, 256), (256, 2048)], "0.5b": [(896, 4864), (4864, 896)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--rows", default="1,4,64,512,2048", help="row counts M, comma-separated")
    ap.add_argument("--models", default="3m,0.5b", help=f"shape sets: {', '.join(SHAPES)}")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--flops-per-call", type=float, default=2e7, help="calls per timing: about this many FMAs")
    args = parse_args(ap, smoke={"rows": "1,5", "models": "3m", "repeats": 1, "flops_per_call": 1e5})
    kernel = invariant.linear_kernel()
    if kernel is None:
        emit({"benchmark": "invariant_linear", "skipped": "the C++ invariant linear did not build (see the log)"})
        return
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = []
    for model in args.models.split(","):
        for k, n in SHAPES[model]:
            w = torch.randn(n, k).to(dtype)
            for m in (int(v) for v in args.rows.split(",")):
                x = torch.randn(m, k).to(dtype)
                calls = max(1, int(args.flops_per_call / (m * n * k)))

                def timed(fn):
                    def run():
                        for _ in range(calls):
                            fn()
                    return run

                with torch.no_grad():
                    best = interleaved_best({"f_linear": timed(lambda: F.linear(x, w)),
                                             "cpp": timed(lambda: kernel.linear(x, w, None)),
                                             "mkl_tiles": timed(lambda: invariant._mm_rows(x, w.t()))},
                                            repeats=args.repeats)
                f_us = best["f_linear"] / calls * 1e6
                row = {"model": model, "k": k, "n": n, "m": m, "f_linear_us": round(f_us, 1),
                       "cpp_over_f_linear": round(best["cpp"] / best["f_linear"], 2),
                       "mkl_tiles_over_f_linear": round(best["mkl_tiles"] / best["f_linear"], 2),
                       "cpp_gflops": round(2 * m * n * k * calls / best["cpp"] / 1e9, 1)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    emit({"benchmark": "invariant_linear", "threads": args.threads, "dtype": args.dtype,
          "isa": kernel.isas()[0], "rows": rows})


if __name__ == "__main__":
    main()
