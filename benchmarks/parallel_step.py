"""Training-step throughput and communication per parallel layout, against single-process.

    python benchmarks/parallel_step.py [--steps 3] [--layouts tp2,pp2,...] [--out result.json]

Runs each layout in fresh gloo processes on CPU (same model, same global batch) plus the
single-process run as the baseline of the same invocation, and prints JSON: tokens/s per layout and
its ratio to single-process, and bytes communicated per step (summed over ranks, counted by
`rl_engine.policy.comm.COUNTER` around every collective) next to the analytic volume of the layout
(main terms only: activations, pipeline p2p, grad sync, ZeRO reduce-scatter / all-gather, expert
all_to_all expected under uniform routing; scalars are ignored). On a machine with fewer cores than
ranks, throughput measures oversubscription more than parallelism: compare layouts of one size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from rl_engine.policy import ModelConfig
from rl_engine.policy.comm import COUNTER
from rl_engine.launch.gloo import spawn
from rl_engine.policy.moe import MoEBlock
from rl_engine.policy.optimizer import OptimizerConfig
from rl_engine.policy.parallel import SINGLE, ParallelGroups
from rl_engine.policy.pipeline import MicroBatch
from rl_engine.policy.parallel_trainer import ParallelTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_helpers import parse_args  # noqa: E402

DENSE = ModelConfig(model_type="qwen3", vocab_size=2048, hidden_size=128, intermediate_size=384, num_layers=4,
                    num_heads=8, num_kv_heads=2, head_dim=16, tie_word_embeddings=True, qk_norm=True,
                    max_position_embeddings=1024, max_context_len=1024)
MOE = ModelConfig(model_type="qwen3_moe", vocab_size=2048, hidden_size=128, intermediate_size=384, num_layers=4,
                  num_heads=8, num_kv_heads=2, head_dim=16, qk_norm=True, max_position_embeddings=1024,
                  max_context_len=1024, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=96,
                  moe_layers=[0, 1, 2, 3], router_aux_loss_coef=0.01)
LAYOUTS = {
    "tp2": dict(world=2, tp=2), "tp2_sp": dict(world=2, tp=2, sp=True), "pp2": dict(world=2, pp=2),
    "pp2_interleaved": dict(world=2, pp=2, v=2), "dp2": dict(world=2), "ep2": dict(world=2, ep=2, moe=True),
    "tp2_pp2": dict(world=4, tp=2, pp=2), "tp2_ep2": dict(world=4, tp=2, ep=2, moe=True),
}


def make_batches(config: ModelConfig, *, num: int = 4, tokens: int = 512) -> list[MicroBatch]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(num):
        lengths = [tokens // 4 - 16, tokens // 4 + 16, tokens // 2]
        ids = torch.randint(0, config.vocab_size, (tokens + 1,), generator=gen)
        cu = torch.tensor([0, *torch.cumsum(torch.tensor(lengths), 0).tolist()], dtype=torch.int32)
        out.append(MicroBatch(input_ids=ids[:-1], positions=torch.cat([torch.arange(n) for n in lengths]),
                              cu_seqlens=cu, targets=ids[1:], loss_inputs={"adv": torch.randn(tokens, generator=gen)}))
    return out


def loss_fn(logprobs, entropy, mb):
    return -(logprobs * mb.loss_inputs["adv"]).sum() / (4 * 512)


def analytic_bytes(trainer: ParallelTrainer, mbs: list[MicroBatch]) -> float:
    """This rank's expected wire bytes for one step (ring collectives), main terms only."""
    g, cfg = trainer.groups, trainer.config
    b = trainer.chunks[0].dtype.itemsize
    tp, H = g.tp_size, cfg.hidden_size
    ring = 2 * (tp - 1) / tp
    T = sum(mb.num_tokens for mb in mbs)
    total = 0.0
    for chunk in trainer.chunks:
        # All-reduce equivalents of [T, H] per layer: attention in/out and MLP (or MoE + shared) in/out.
        n = sum(2 + (2 if isinstance(layer.mlp, MoEBlock) and layer.mlp.shared_expert else 0) + 2
                for layer in chunk.layers)
        n += chunk.is_first_stage + chunk.is_last_stage  # embedding output, LM-head input
        total += ring * n * T * H * b + (ring * 4 * T * 4 if chunk.is_last_stage else 0)  # + softmax stats
        stage = trainer.runner._stage(trainer.chunks.index(chunk))
        t_local = T // tp if g.sequence_parallel else T
        total += (stage < trainer.runner.num_stages - 1) * (t_local * H * b + 16 * len(mbs))  # activations
        total += (stage > 0) * t_local * H * b  # gradients back
        for layer in chunk.layers:
            if isinstance(layer.mlp, MoEBlock) and g.ep_size > 1:
                ep, k = g.ep_size, cfg.num_experts_per_tok
                total += len(mbs) * (ep - 1) * layer.mlp.num_local_experts * 8  # counts
                total += 4 * T * k * (ep - 1) / ep * H * b  # dispatch + combine, forward + backward
    params = trainer.optimizer.params
    partial = sum(p.numel() for p in params if getattr(p, "tp_partial_grad", False))
    replicated = sum((e - s) * p[0].numel() for p in params for s, e, _ in getattr(p, "tp_replicated_rows", ()))
    total += ring * partial * 4 + (tp - 1) * replicated * 4
    if g.embedding_group is not None and cfg.tie_word_embeddings and (g.is_first_stage or g.is_last_stage):
        total += sum(p.numel() for p in params if getattr(p, "tied_embedding", False)) * 4
    for buf in trainer.optimizer.buffers:
        d = 1 if buf.group is None else torch.distributed.get_world_size(buf.group)
        N = buf.grad.numel()
        total += (d - 1) / d * N * 4 + (d - 1) * N / d * b
    return total


def _measure(trainer: ParallelTrainer, mbs: list[MicroBatch], steps: int) -> tuple[float, float, dict]:
    trainer.train_step(mbs, loss_fn)  # warm-up
    with COUNTER.counting() as counted:
        trainer.train_step(mbs, loss_fn)
        counted = dict(counted)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(mbs, loss_fn)
    return (time.perf_counter() - start) / steps, analytic_bytes(trainer, mbs), counted


def _worker(rank: int, world: int, name: str, steps: int, out_dir: str) -> None:
    spec = LAYOUTS[name]
    config = MOE if spec.get("moe") else DENSE
    groups = ParallelGroups.build(tp=spec.get("tp", 1), pp=spec.get("pp", 1), ep=spec.get("ep", 1),
                                  sequence_parallel=spec.get("sp", False))
    trainer = ParallelTrainer(config, groups=groups, optim=OptimizerConfig(lr=1e-4), virtual_stages=spec.get("v", 1))
    mbs = make_batches(config)[groups.dp_rank::groups.dp_size]
    seconds, analytic, counted = _measure(trainer, mbs, steps)
    with open(os.path.join(out_dir, f"{name}.{rank}.json"), "w") as f:
        json.dump({"seconds": seconds, "analytic": analytic, "measured": counted}, f)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--out", default=None)
    args = parse_args(parser, argv, smoke={"steps": 1, "layouts": "tp2"})
    torch.set_num_threads(1)
    tokens = sum(mb.num_tokens for mb in make_batches(DENSE))
    baseline = {}
    for kind, config in (("dense", DENSE), ("moe", MOE)):
        trainer = ParallelTrainer(config, groups=SINGLE, optim=OptimizerConfig(lr=1e-4))
        baseline[kind] = tokens / _measure(trainer, make_batches(config), args.steps)[0]
    result = {"tokens_per_step": tokens, "cores": os.cpu_count(), "threads_per_rank": 1,
              "single_process_tokens_per_s": baseline, "layouts": {}}
    with tempfile.TemporaryDirectory() as out_dir:
        for name in args.layouts.split(","):
            spec = LAYOUTS[name]
            spawn(_worker, spec["world"], name, args.steps, out_dir)
            ranks = [json.load(open(os.path.join(out_dir, f"{name}.{r}.json"))) for r in range(spec["world"])]
            tps = tokens / max(r["seconds"] for r in ranks)
            measured = sum(sum(r["measured"].values()) for r in ranks)
            analytic = sum(r["analytic"] for r in ranks)
            by_kind: dict[str, float] = {}
            for r in ranks:
                for k, v in r["measured"].items():
                    by_kind[k] = by_kind.get(k, 0.0) + v
            result["layouts"][name] = {
                "world_size": spec["world"], "tokens_per_s": round(tps, 1),
                "vs_single_process": round(tps / baseline["moe" if spec.get("moe") else "dense"], 3),
                "bytes_per_step": int(measured), "analytic_bytes_per_step": int(analytic),
                "measured_over_analytic": round(measured / analytic, 4) if analytic else None,
                "bytes_by_collective": {k: int(v) for k, v in sorted(by_kind.items())},
            }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
