"""Forward+backward throughput of the policy on packed variable-length batches, against the
transformers model on the same sequences padded, measured in the same run.

    python benchmarks/train_step.py [--hidden 256 --layers 4 --seqs 16 --min-len 16 --max-len 512]
    python benchmarks/train_step.py --device cuda [--dtype bfloat16]

Prints JSON: tokens/s of both (real tokens only), the ratio, and achieved FLOP/s as a fraction of
this machine's fp32 matmul peak, also measured here; and the same step of our model built under
`model.batch_invariant` (batch-invariant ops), as a time ratio to the default.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_helpers import emit, interleaved_best, matmul_peak_step, parse_args, sync  # noqa: E402


def model_flops(cfg, lengths: list[int]) -> float:
    """Matmul FLOPs of one forward+backward (3x forward) over the real tokens."""
    h, inter, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_token = L * (h * (q + 2 * kv) + q * h + 3 * h * inter) + h * V
    tokens = sum(lengths)
    attn = L * sum(n * (n + 1) / 2 for n in lengths) * q * 2  # QK^T and AV, causal half
    return 3 * (2 * per_token * tokens + 2 * attn)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]: both models and the peak run there")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    return ap


def main() -> None:
    args = parse_args(build_parser(), smoke={"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "vocab": 128,
                                             "seqs": 2, "min_len": 4, "max_len": 16, "repeats": 1})
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device")

    from transformers import AutoConfig, AutoModelForCausalLM

    from rl_engine.policy import from_pretrained

    torch.manual_seed(0)
    hf_cfg = AutoConfig.for_model("qwen2", vocab_size=args.vocab, hidden_size=args.hidden,
                                  intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                                  num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                  max_position_embeddings=max(1024, args.max_len))
    hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
    from rl_engine import kernels

    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = from_pretrained(d, dtype=dtype, device=device)
        kernels.set_batch_invariant(True)  # model.batch_invariant: the same weights, invariant ops
        ours_invariant = from_pretrained(d, dtype=dtype, device=device)
        kernels.set_batch_invariant(False)
    hf = hf.to(device)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.seqs,), generator=gen).tolist()
    seqs = [torch.randint(0, args.vocab, (n,), generator=gen).to(device) for n in lengths]

    # Ours: one packed batch, no padding.
    input_ids = torch.cat(seqs)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    cu = torch.tensor([0] + lengths, device=device).cumsum(0).to(torch.int32)
    targets = torch.roll(input_ids, -1)

    def step(model) -> None:
        model.zero_grad(set_to_none=True)
        h = model.hidden_states(input_ids, positions=positions, cu_seqlens=cu)
        lp, _ = model.token_logprobs(h, targets)
        lp.sum().backward()
        sync(device)

    def ours_step():
        step(ours)

    # transformers: the same sequences right-padded to the longest, with an attention mask.
    T = max(lengths)
    padded = torch.zeros(len(seqs), T, dtype=torch.long, device=device)
    mask = torch.zeros(len(seqs), T, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = s
        mask[i, : len(s)] = 1
    padded_targets = torch.roll(padded, -1, dims=1)

    def hf_step():
        hf.zero_grad(set_to_none=True)
        logits = hf(input_ids=padded, attention_mask=mask).logits
        lp = torch.log_softmax(logits.float(), -1).gather(-1, padded_targets[..., None]).squeeze(-1)
        (lp * mask).sum().backward()
        sync(device)

    # A GPU needs a large product to reach its peak.
    peak_fn, peak_flops = matmul_peak_step(8192 if device.type == "cuda" else 1536, dtype=dtype, device=device)
    times = interleaved_best({"ours": ours_step, "hf": hf_step, "peak": peak_fn,
                              "ours_batch_invariant": lambda: step(ours_invariant)}, repeats=args.repeats)
    t_ours, t_hf, peak = times["ours"], times["hf"], peak_flops / times["peak"]
    tokens = sum(lengths)
    flops = model_flops(ours.config, lengths)
    emit({
        "benchmark": "train_step",
        "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                  "vocab": args.vocab, "params_M": round(sum(p.numel() for p in ours.parameters()) / 1e6, 2)},
        "batch": {"seqs": args.seqs, "real_tokens": tokens, "padded_tokens": len(seqs) * T,
                  "min_len": min(lengths), "max_len": max(lengths)},
        "device": str(device), "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "packed_tokens_per_s": round(tokens / t_ours, 1),
        "transformers_padded_tokens_per_s": round(tokens / t_hf, 1),
        "speedup_vs_transformers_padded": round(t_hf / t_ours, 2),
        "target_speedup": 1.5,
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "achieved_gflops": round(flops / t_ours / 1e9, 1),
        "fraction_of_matmul_peak": round(flops / t_ours / peak, 3),
        # model.batch_invariant on the same batch: its cost as a time ratio (> 1: slower)
        "batch_invariant_tokens_per_s": round(tokens / times["ours_batch_invariant"], 1),
        "batch_invariant_time_over_default": round(times["ours_batch_invariant"] / t_ours, 2),
    })


if __name__ == "__main__":
    main()
