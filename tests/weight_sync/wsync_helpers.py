"""Shared pieces of the weight-sync tests: tiny model configs, random checkpoints, sharded models built
through the Hugging Face loader (an implementation independent of the layout descriptors), a stand-in
engine, and byte-level comparisons."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rl_engine.launch.gloo import serve_store
from rl_engine.policy import CausalLM, ModelConfig, ParallelGroups, load_hf_weights
from rl_engine.policy.parallel import rank_coords
from rl_engine.policy.pipeline import split_layers
from rl_engine.weight_sync import EngineLayout, TrainLayout

# vocab 61: padded rows under tp; 1 KV head: replicated K/V under tp 2; tied embeddings: the last pipeline
# stage holds a copy.
DENSE = ModelConfig(model_type="qwen3", vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=4,
                    num_heads=4, num_kv_heads=1, head_dim=8, tie_word_embeddings=True, qk_norm=True, qkv_bias=True,
                    max_position_embeddings=256, max_context_len=256)
UNTIED = ModelConfig(model_type="qwen2", vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=False, qkv_bias=True,
                     max_position_embeddings=256, max_context_len=256)
MOE = ModelConfig(model_type="qwen2_moe", vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True, max_position_embeddings=256,
                  max_context_len=256, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                  shared_expert_intermediate_size=32, moe_layers=[0, 1], norm_topk_prob=False,
                  router_bias_update_rate=0.01)
MODELS = {"dense": DENSE, "untied": UNTIED, "moe": MOE}

# How long one side of a multi-process test waits for the other: a guard against a hang, not a measurement.
# Under heavy load on 2 cores a rank may take minutes to train a step and save while its peer waits; at 120 s
# a receiver timed out of one update, which failed these tests' later expectations (the receiver now drops
# an abandoned update's late messages: test_wsync_abandoned.py).
WAIT_S = 600


def write_weights(directory: str, config: ModelConfig, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = CausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3)
    model.save_pretrained(directory)
    return directory


def source_chunks(config: ModelConfig, layout: TrainLayout, rank: int, path: str | None) -> list[CausalLM]:
    """One training rank's chunks, loaded from a checkpoint by the HF loader (no process group needed)."""
    c = rank_coords(rank, tp=layout.tp, pp=layout.pp, ep=layout.ep, dp=layout.dp)
    groups = ParallelGroups(tp_size=layout.tp, tp_rank=c["tp"], pp_size=layout.pp, pp_rank=c["pp"],
                            ep_size=layout.ep, ep_rank=c["ep"], dp_size=layout.dp, dp_rank=c["dp"])
    ranges = split_layers(config.num_layers, layout.pp * layout.virtual_stages)
    chunks = [CausalLM(config, groups=groups, dtype=layout.dtype, layer_range=ranges[v * layout.pp + c["pp"]])
              for v in range(layout.virtual_stages)]
    for chunk in chunks:
        if path is not None:
            load_hf_weights(chunk, path)
    return chunks


def engine_model(config: ModelConfig, layout: EngineLayout, rank: int, path: str | None) -> CausalLM:
    """One engine rank's model: loaded from `path`, or zeroed (to be filled by a sync)."""
    tp_rank, ep_rank = rank % layout.tp, (rank // layout.tp) % layout.ep
    groups = ParallelGroups(tp_size=layout.tp, tp_rank=tp_rank, ep_size=layout.ep, ep_rank=ep_rank,
                            dp_size=layout.ep, dp_rank=ep_rank)
    model = CausalLM(config, groups=groups, dtype=layout.dtype)
    if path is not None:
        load_hf_weights(model, path)
    else:
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                t.zero_()
    return model


class FakeEngine:
    """The engine's weight-update surface without the engine (pure layout tests)."""

    def __init__(self, model: CausalLM) -> None:
        self.model = model
        self.weights_version = 0

    def update_weights(self, apply=None, *, version=None, recompute_kv=False) -> int:
        new = self.weights_version + 1 if version is None else version
        if new <= self.weights_version:
            raise ValueError(f"weights version must increase: current {self.weights_version}, got {version}")
        if apply is not None:
            with torch.no_grad():
                apply(self.model)
        self.weights_version = new
        return new


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def state_bytes(model: CausalLM) -> dict[str, torch.Tensor]:
    out = {n: raw(p) for n, p in model.named_parameters()}
    out.update({n: raw(b) for n, b in model.named_buffers() if n != "inv_freq"})
    return out


def assert_same_bytes(a: CausalLM, b: CausalLM, *, what: str = "") -> None:
    sa, sb = state_bytes(a), state_bytes(b)
    assert sa.keys() == sb.keys(), sorted(set(sa) ^ set(sb))
    bad = [n for n in sa if not torch.equal(sa[n], sb[n])]
    assert not bad, f"{what}: tensors differ: {bad[:6]}"


def micro_batches(config: ModelConfig, *, num: int = 2, seed: int = 1):
    """Deterministic packed micro-batches (even token counts) with advantages for `loss_fn`."""
    from rl_engine.policy.pipeline import MicroBatch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        lengths = [6, 8]
        ids = torch.randint(0, config.vocab_size, (sum(lengths) + 1,), generator=gen)
        T = sum(lengths)
        out.append(MicroBatch(input_ids=ids[:T], positions=torch.cat([torch.arange(n) for n in lengths]),
                              cu_seqlens=torch.tensor([0, lengths[0], T], dtype=torch.int32), targets=ids[1:],
                              loss_inputs={"advantages": torch.randn(T, generator=gen)}))
    return out


def publish(store, key: str, address: str) -> None:
    store.set(f"address/{key}", address)


def lookup(store, key: str) -> str:
    """The address `publish`ed under `key` (waits for it up to the store's timeout)."""
    return store.get(f"address/{key}").decode()


def loss_fn(logprobs: torch.Tensor, entropy: torch.Tensor, mb) -> torch.Tensor:
    return -(logprobs * mb.loss_inputs["advantages"]).sum() / 64.0


def spawn_for_facts(run, *, nprocs: int, out_dir: str, paths: dict) -> dict[int, dict]:
    """Run `run(rank, out_dir, paths, store_port)` on `nprocs` processes; returns each rank's facts. The ranks
    meet at a TCP store this process serves on a port bound before they start (`rl_engine.launch.gloo.
    serve_store`): their process groups rendezvous under a prefix of it and each receiver publishes there the
    address it bound (`publish` / `lookup`), so no port is picked free and bound later by another process."""
    store = serve_store(nprocs)
    try:
        mp.spawn(run, args=(out_dir, paths, store.port), nprocs=nprocs, join=True)
    finally:
        del store
    merged: dict[int, dict] = {}
    for r in range(nprocs):
        with open(os.path.join(out_dir, f"facts{r}.json")) as f:
            merged[r] = json.load(f)
    return merged


def finish_rank(out_dir: str, rank: int, facts: dict, *, in_train_world: bool) -> None:
    """Write a rank's facts; training ranks then leave their process group together."""
    with open(os.path.join(out_dir, f"facts{rank}.json"), "w") as f:
        json.dump(facts, f)
    if in_train_world:
        dist.barrier()
        dist.destroy_process_group()
