"""Shared pieces of the multi-process tests: tiny models written as HF checkpoints, deterministic
packed micro-batches, a loss normalised by global counts, and the layout runner used in workers."""

from __future__ import annotations

import json
import os

import torch

from rl_engine.policy import CausalLM, ModelConfig
from rl_engine.policy.optimizer import OptimizerConfig
from rl_engine.policy.parallel import ParallelGroups
from rl_engine.policy.pipeline import MicroBatch
from rl_engine.policy.parallel_trainer import ParallelTrainer

DENSE = ModelConfig(model_type="qwen3", vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=4,
                    num_heads=4, num_kv_heads=1, head_dim=8, tie_word_embeddings=True, qk_norm=True,
                    qkv_bias=True, max_position_embeddings=256, max_context_len=256)
MOE = ModelConfig(model_type="qwen2_moe", vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, max_position_embeddings=256,
                  max_context_len=256, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                  shared_expert_intermediate_size=32, moe_layers=[0, 1], norm_topk_prob=False,
                  router_aux_loss_coef=0.01, router_z_loss_coef=0.001, router_bias_update_rate=0.01)
MODELS = {"dense": DENSE, "moe": MOE}
OPTIM = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, clip_grad=0.5, bucket_elements=3000)


def write_weights(directory: str, kind: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = CausalLM(MODELS[kind])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    model.save_pretrained(directory)
    return directory


def micro_batches(kind: str, *, num: int = 4, seed: int = 1, even: bool = True) -> list[MicroBatch]:
    cfg = MODELS[kind]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        lengths = torch.randint(3, 14, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist()
        if even and sum(lengths) % 2:
            lengths[-1] += 1
        ids = torch.randint(0, cfg.vocab_size, (sum(lengths) + 1,), generator=gen)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
        T = sum(lengths)
        out.append(MicroBatch(input_ids=ids[:T], positions=torch.cat([torch.arange(n) for n in lengths]),
                              cu_seqlens=cu, targets=ids[1:],
                              loss_inputs={"advantages": torch.randn(T, generator=gen),
                                           "mask": (torch.rand(T, generator=gen) > 0.2).float()}))
    total = sum(float(mb.loss_inputs["mask"].sum()) for mb in out)
    for mb in out:
        mb.loss_inputs["normaliser"] = torch.tensor(total)
    return out


def loss_fn(logprobs: torch.Tensor, entropy: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
    li = mb.loss_inputs
    per_token = -logprobs * li["advantages"] - 0.01 * entropy + 0.1 * logprobs.pow(2)
    return (per_token * li["mask"]).sum() / li["normaliser"]


def build_trainer(spec: dict, weights: str) -> ParallelTrainer:
    groups = ParallelGroups.build(tp=spec.get("tp", 1), pp=spec.get("pp", 1), ep=spec.get("ep", 1),
                                  sequence_parallel=spec.get("sp", False))
    return ParallelTrainer(MODELS[spec["kind"]], groups=groups, optim=OptimizerConfig(**OPTIM), hf_path=weights,
                           virtual_stages=spec.get("v", 1))


def my_micro_batches(trainer: ParallelTrainer, kind: str) -> list[MicroBatch]:
    g = trainer.groups
    return micro_batches(kind)[g.dp_rank::g.dp_size]


def write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def run_layout(spec: dict, weights: str, out_dir: str, *, steps: int = 3) -> ParallelTrainer:
    """Train `steps` steps in the layout `spec` (tp, pp, ep, sp, v, kind), save a checkpoint to
    out_dir/<name> and the losses to out_dir/<name>.json; returns the trainer."""
    trainer = build_trainer(spec, weights)
    mbs = my_micro_batches(trainer, spec["kind"])
    losses = [trainer.train_step(mbs, loss_fn)["loss"] for _ in range(steps)]
    trainer.save_checkpoint(os.path.join(out_dir, spec["name"]))
    if trainer.groups.world_rank == 0:
        write_json(os.path.join(out_dir, spec["name"] + ".json"), losses)
    return trainer


def compare_to_single(out_dir: str, name: str, single: str) -> tuple[float, float]:
    """(max loss diff over steps, max param diff) of layout `name` against the single-process run."""
    from rl_engine.policy.dist_checkpoint import read_full_tensors

    with open(os.path.join(out_dir, name + ".json")) as f:
        losses = json.load(f)
    with open(os.path.join(out_dir, single + ".json")) as f:
        ref = json.load(f)
    a, b = read_full_tensors(os.path.join(out_dir, name)), read_full_tensors(os.path.join(out_dir, single))
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    assert len(losses) == len(ref)
    return (max(abs(x - y) for x, y in zip(losses, ref)), max((a[k] - b[k]).abs().max().item() for k in a))
