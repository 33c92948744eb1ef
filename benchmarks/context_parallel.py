"""Context parallelism on one packed batch with a long sequence: activation memory per rank,
tokens/s and bytes communicated at cp1 (single process), cp2 ring and cp2 all-gather.

    python benchmarks/context_parallel.py [--long 16384] [--out result.json]

The batch packs one `--long`-token sequence with three short ones. Each layout runs one training step
(forward, backward, AdamW) to warm up and count, then one timed step, in fresh gloo processes on CPU.
Activation memory per rank is the bytes autograd holds for backward at the end of the forward (every
tensor saved for backward, deduplicated by storage, parameters excluded): with one micro-batch that is
the peak of the activations, measured exactly on CPU where no allocator statistics exist. Bytes
communicated are counted by `rl_engine.policy.comm.COUNTER` per collective kind; the attention's own
traffic (ring sends, or the all-gather and reduce-scatter of K/V) is set against its analytic volume
from the split (`analytic_attention_bytes`). Target: activation memory per rank at cp2 <= 0.6 x cp1.
On a machine with fewer cores than ranks, tokens/s measures oversubscription more than parallelism.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from rl_engine.launch.gloo import spawn
from rl_engine.policy import ModelConfig
from rl_engine.policy.comm import COUNTER
from rl_engine.policy.context_parallel import CPPlan
from rl_engine.policy.optimizer import OptimizerConfig
from rl_engine.policy.parallel import SINGLE, ParallelGroups
from rl_engine.policy.parallel_trainer import ParallelTrainer
from rl_engine.policy.pipeline import MicroBatch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_helpers import parse_args  # noqa: E402

SHORT = [512, 300, 200]


def model_config(max_len: int) -> ModelConfig:
    return ModelConfig(model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=2, num_kv_heads=1, head_dim=32, tie_word_embeddings=True, qk_norm=True,
                       max_position_embeddings=max(max_len, *SHORT), max_context_len=max(max_len, *SHORT))


def make_batch(long: int, vocab: int) -> MicroBatch:
    lengths = [long, *SHORT]
    T = sum(lengths)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (T + 1,), generator=gen)
    cu = torch.tensor([0, *torch.cumsum(torch.tensor(lengths), 0).tolist()], dtype=torch.int32)
    return MicroBatch(input_ids=ids[:-1], positions=torch.cat([torch.arange(n) for n in lengths]), cu_seqlens=cu,
                      targets=ids[1:], loss_inputs={"adv": torch.randn(T, generator=gen)})


def loss_fn(logprobs, entropy, mb):
    return -(logprobs * mb.loss_inputs["adv"]).sum() / mb.num_tokens


def analytic_attention_bytes(config: ModelConfig, mb: MicroBatch, *, cp: int, rank: int, comm: str,
                             itemsize: int) -> float:
    """The bytes this rank sends for attention in one step: per layer, K and V of the ring tokens
    ([rows, 2 * num_kv_heads, head_dim]). Ring: cp - 1 shifts forward, cp - 1 again in backward, and cp
    shifts of their fp32 gradients. All-gather: (cp - 1) x the padded rows forward and backward, and a
    reduce-scatter of the fp32 gradients, (cp - 1) / cp of cp padded blocks."""
    plan = CPPlan(mb.cu_seqlens, cp=cp)
    row = 2 * config.num_kv_heads * config.head_dim
    if comm == "ring":
        sent = sum(plan.ring_rows[(rank - s) % cp] for s in range(cp - 1))  # K/V held at steps 0..cp-2
        grads = sum(plan.ring_rows[(rank - s) % cp] for s in range(cp))
        per_layer = 2 * sent * row * itemsize + grads * row * 4
    else:
        width = max(plan.ring_rows)
        per_layer = 2 * (cp - 1) * width * row * itemsize + (cp - 1) * width * row * 4
    return config.num_layers * per_layer


def saved_activation_bytes(trainer: ParallelTrainer, mb: MicroBatch) -> int:
    """Bytes autograd keeps for backward after the forward of `mb` (saved tensors, by storage,
    parameters excluded); runs the forward and backward of one step without an optimizer update."""
    params = {p.untyped_storage().data_ptr() for c in trainer.chunks for p in c.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.nbytes():
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.train_step([mb], loss_fn, apply=lambda: False)
    return sum(storages.values())


def run_layout(trainer: ParallelTrainer, mb: MicroBatch) -> dict:
    memory = saved_activation_bytes(trainer, mb)
    with COUNTER.counting() as counted:
        trainer.train_step([mb], loss_fn)
        counted = dict(counted)
    start = time.perf_counter()
    trainer.train_step([mb], loss_fn)
    return {"activation_bytes": memory, "seconds": time.perf_counter() - start, "bytes": counted}


def _worker(rank: int, world: int, comm: str, long: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    config = model_config(long)
    groups = ParallelGroups.build(cp=world)
    trainer = ParallelTrainer(config, groups=groups, optim=OptimizerConfig(lr=1e-4), cp_comm=comm)
    mb = make_batch(long, config.vocab_size)
    result = run_layout(trainer, mb)
    result["analytic_attention_bytes"] = analytic_attention_bytes(config, mb, cp=world, rank=groups.cp_rank,
                                                                  comm=comm, itemsize=4)
    with open(os.path.join(out_dir, f"{comm}.{rank}.json"), "w") as f:
        json.dump(result, f)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", type=int, default=16384, help="tokens of the long sequence")
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parse_args(parser, argv, smoke={"long": 256})
    torch.set_num_threads(1)
    config = model_config(args.long)
    mb = make_batch(args.long, config.vocab_size)
    tokens = mb.num_tokens
    single = run_layout(ParallelTrainer(config, groups=SINGLE, optim=OptimizerConfig(lr=1e-4)), mb)
    result = {"sequence_lengths": [args.long, *SHORT], "tokens_per_step": tokens, "cores": os.cpu_count(),
              "threads_per_rank": 1, "dtype": "float32",
              "cp1": {"activation_bytes_per_rank": single["activation_bytes"],
                      "tokens_per_s": round(tokens / single["seconds"], 1)}}
    with tempfile.TemporaryDirectory() as out_dir:
        for comm in ("ring", "allgather"):
            spawn(_worker, args.cp, comm, args.long, out_dir, threads=1)
            ranks = [json.load(open(os.path.join(out_dir, f"{comm}.{r}.json"))) for r in range(args.cp)]
            peak = max(r["activation_bytes"] for r in ranks)
            kinds = sorted({k for r in ranks for k in r["bytes"]})
            by_kind = {k: int(sum(r["bytes"].get(k, 0.0) for r in ranks)) for k in kinds}
            attention_kinds = ("cp_ring",) if comm == "ring" else ("cp_all_gather", "cp_reduce_scatter")
            analytic = sum(r["analytic_attention_bytes"] for r in ranks)
            result[f"cp{args.cp}_{comm}"] = {
                "activation_bytes_per_rank": peak,
                "activation_bytes_by_rank": [r["activation_bytes"] for r in ranks],
                "memory_vs_cp1": round(peak / single["activation_bytes"], 4),
                "tokens_per_s": round(tokens / max(r["seconds"] for r in ranks), 1),
                "bytes_per_step_by_collective": by_kind,
                "attention_bytes_analytic": int(analytic),
                "attention_bytes_measured": int(sum(by_kind.get(k, 0) for k in attention_kinds)),
            }
            row = result[f"cp{args.cp}_{comm}"]
            row["attention_measured_over_analytic"] = round(row["attention_bytes_measured"] / analytic, 4)
    result["target_memory_vs_cp1"] = 0.6
    result["meets_target"] = all(result[f"cp{args.cp}_{c}"]["memory_vs_cp1"] <= 0.6 for c in ("ring", "allgather"))
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
