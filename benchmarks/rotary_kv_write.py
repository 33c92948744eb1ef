"""The fused rotary + paged KV cache write (`rl_engine/kernels/cpu/csrc/cpu_ops.cpp`, `kernels.cpu.ops.rotary_kv_write`)
against the torch ops it replaces in the engine, timed in the same run on one layer's call: the model's rotary
(`RotaryEmbedding.rotate` over the fused projection's q|k heads, then the split) and `PagedAttention.attend`'s two
`index_copy_` into the cache. Shapes of generate.py's 3m model (8 / 2 heads of dim 32) and the 40m model of
the vLLM comparison (8 / 2 heads of dim 64), at decode rows (one token each, in blocks scattered over a pool of
4096 16-token blocks) and prefill chunks of whole blocks (the fused op then also returns the rotated k).

    python benchmarks/rotary_kv_write.py [--models 3m,40m] [--tokens 1,64,1024] [--threads 1] [--dtype float32]
"""

from __future__ import annotations

import argparse

import torch

from bench_helpers import emit, interleaved_best, parse_args
from rl_engine.kernels import reference
from rl_engine.kernels.cpu import extension_status
from rl_engine.policy.layers import RotaryEmbedding

MODELS = {"3m": (8, 2, 32), "40m": (8, 2, 64)}  # (query heads, kv heads, head dim)
PREFILL_FROM = 128  # token counts from here on are prefill steps (the rotated k is returned too)


def bench(model: str, tokens: int, dtype: torch.dtype, *, repeats: int, calls: int) -> dict:
    from rl_engine.kernels.cpu import ops

    hq, hkv, dim = MODELS[model]
    block_size, num_blocks = 16, 4096
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * dim, generator=gen).to(dtype)
    q, k, v = (t.view(tokens, -1, dim) for t in qkv.split([hq * dim, hkv * dim, hkv * dim], dim=1))
    qk = qkv[:, :(hq + hkv) * dim].view(tokens, hq + hkv, dim)
    positions = torch.randint(0, 2048, (tokens,), generator=gen)
    prefill = tokens >= PREFILL_FROM
    if prefill:  # sequences fill whole blocks, the blocks scattered over the pool
        blocks = torch.randperm(num_blocks, generator=gen)[:-(-tokens // block_size)]
        slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:tokens]
    else:  # one token per sequence, each in its own block
        blocks = torch.randperm(num_blocks, generator=gen)[:tokens]
        slots = blocks * block_size + torch.randint(0, block_size, (tokens,), generator=gen)
    caches = [torch.zeros(num_blocks, block_size, hkv, dim, dtype=dtype) for _ in range(2)]
    k_flat, v_flat = (c.view(-1, hkv, dim) for c in caches)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rotary = RotaryEmbedding(head_dim=dim, max_positions=2048, device=torch.device("cpu"))
    tables = rotary.tables(positions, inv_freq)
    cos, sin = rotary.tables(positions, inv_freq, half_width=True)

    def torch_path() -> None:
        for _ in range(calls):
            _, k_rot = rotary.rotate(qk, tables).split([hq, hkv], dim=1)
            k_flat.index_copy_(0, slots, k_rot)
            v_flat.index_copy_(0, slots, v)

    def fused() -> None:
        for _ in range(calls):
            ops.rotary_kv_write(q, k, v, cos, sin, slots, caches[0], caches[1], return_k=prefill)

    with torch.inference_mode():
        expected_q, _ = reference.rotary_kv_write(q, k, v, cos, sin, slots, *caches)
        assert torch.equal(ops.rotary_kv_write(q, k, v, cos, sin, slots, *caches)[0], expected_q)
        best = interleaved_best({"torch": torch_path, "fused": fused}, repeats=repeats)
    us = {name: round(seconds / calls * 1e6, 2) for name, seconds in best.items()}
    return {"model": model, "tokens": tokens, "prefill": prefill, "dtype": str(dtype).removeprefix("torch."),
            "torch_us": us["torch"], "fused_us": us["fused"], "speedup": round(us["torch"] / us["fused"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="3m,40m")
    ap.add_argument("--tokens", default="1,64,1024", help="rows of a call (>= 128: a prefill step)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds (best kept)")
    ap.add_argument("--calls", type=int, default=200, help="calls per timed round")
    args = parse_args(ap, smoke={"models": "3m", "tokens": "1,128", "repeats": 1, "calls": 2})
    available, reason = extension_status()
    if not available:
        emit({"skipped": f"C++ CPU kernels unavailable: {reason}"})
        return
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows = [bench(m, int(t), dtype, repeats=args.repeats, calls=args.calls)
            for m in args.models.split(",") for t in args.tokens.split(",")]
    emit({"threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
