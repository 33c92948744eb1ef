"""The small-M GEMM (`rl_engine/kernels/cpu/csrc/small_gemm.cpp`, panel-packed weights) against oneDNN's
prepacked linear (what the engine's batched decode steps call: `kernels/cpu/packed_linear.py`) and
F.linear, timed in the same run on one decode step's linears of a model of benchmarks/generate.py: per layer
qkv (with bias), o (+ residual), gate/up, down (+ residual), then the LM head, at M rows.

    python benchmarks/small_gemm.py [--models 3m,40m,50m] [--rows 64] [--threads 1] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench_helpers import emit, interleaved_best, parse_args
from rl_engine.kernels.cpu import small_gemm

# (hidden, layers, qkv width, intermediate, vocab): generate.py's 3m, vs_vllm.py's 40m, generate.py's --large
MODELS = {"3m": (256, 4, 384, 768, 2048), "40m": (512, 8, 768, 1792, 32000), "50m": (512, 10, 768, 1792, 32000)}


def step_shapes(model: str) -> list[tuple[int, int, bool, bool]]:
    """(N, K, bias, residual) of one decode step's linears."""
    hidden, layers, qkv, inter, vocab = MODELS[model]
    layer = [(qkv, hidden, True, False), (hidden, hidden, False, True), (2 * inter, hidden, False, False),
             (hidden, inter, False, True)]
    return layer * layers + [(vocab, hidden, False, False)]


def bench(model: str, rows: int, dtype: torch.dtype, configs: list[tuple[int, int]], repeats: int,
          calls: int) -> dict:
    shapes = step_shapes(model)
    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(n, k, generator=gen) * k ** -0.5).to(dtype) for n, k, _, _ in shapes]
    biases = [torch.randn(n, generator=gen).to(dtype) if b else None for n, _, b, _ in shapes]
    inputs = {k: torch.randn(rows, k, generator=gen).to(dtype) for _, k, _, _ in shapes}
    residual = torch.randn(rows, MODELS[model][0], generator=gen).to(dtype)
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights]
    ours = {c: [small_gemm.pack(w, panel=c[0]) for w in weights] for c in configs}

    def run_onednn():
        for (_, k, _, res), packed, bias in zip(shapes, onednn, biases):
            if res:
                torch.ops.mkldnn._linear_pointwise.binary(inputs[k], residual, packed, None, "add")
            else:
                torch.ops.mkldnn._linear_pointwise(inputs[k], packed, bias, "none", [], "")

    def run_f_linear():
        for (_, k, _, res), w, bias in zip(shapes, weights, biases):
            torch.addmm(residual, inputs[k], w.t()) if res else F.linear(inputs[k], w, bias)

    def ours_fn(config):
        def run():
            for (_, k, _, res), packed, bias in zip(shapes, ours[config], biases):
                small_gemm.linear(inputs[k], packed, bias, residual=residual if res else None, row_block=config[1])
        return run

    fns = {"onednn": run_onednn, "f_linear": run_f_linear, **{f"small_gemm_{p}x{r}": ours_fn((p, r))
                                                               for p, r in configs}}

    def repeated(fn):
        def run():
            for _ in range(calls):
                fn()
        return run

    with torch.inference_mode():
        best = interleaved_best({name: repeated(fn) for name, fn in fns.items()}, repeats=repeats)
    flops = 2 * rows * sum(n * k for n, k, _, _ in shapes)
    return {"model": model, "rows": rows, "step_ms": {name: round(t / calls * 1e3, 3) for name, t in best.items()},
            "gflops": {name: round(flops * calls / t / 1e9, 1) for name, t in best.items()},
            "over_onednn": {name: round(best["onednn"] / t, 2) for name, t in best.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="3m,40m,50m", help=f"shape sets: {', '.join(MODELS)}")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--configs", default="32x8,48x8,64x6", help="panel x row_block of the small GEMM, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calls", type=int, default=5, help="steps per timing")
    args = parse_args(ap, smoke={"models": "3m", "rows": 5, "repeats": 1, "calls": 1, "configs": "32x8"})
    ok, reason = small_gemm.available()
    if not ok:
        emit({"benchmark": "small_gemm", "skipped": f"the small-GEMM C++ kernel did not build: {reason}"})
        return
    torch.set_num_threads(args.threads)
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    rows = []
    for model in args.models.split(","):
        row = bench(model, args.rows, getattr(torch, args.dtype), configs, args.repeats, args.calls)
        print(json.dumps(row), flush=True)
        rows.append(row)
    emit({"benchmark": "small_gemm", "threads": args.threads, "dtype": args.dtype, "rows": rows})


if __name__ == "__main__":
    main()
