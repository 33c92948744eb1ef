"""The trainer-facing API of the parallel policy: one object per rank that builds its model chunks,
owns the distributed optimizer and runs a training step over micro-batches.

    groups = ParallelGroups.build(tp=2, cp=1, pp=2, ep=1, sequence_parallel=True)   # collective
    trainer = ParallelTrainer.from_pretrained(hf_dir, groups=groups,
                                              optim=OptimizerConfig(lr=1e-6, weight_decay=0.01),
                                              virtual_stages=1, dtype=torch.bfloat16)
    for step in ...:
        # this rank's micro-batches: ranks of one (pp, tp) pipeline get the same list; data-parallel
        # ranks get different ones. Each is packed sequences (MicroBatch: input_ids, positions,
        # cu_seqlens, targets, loss_inputs). Under sequence parallelism pad T to a multiple of tp.
        def loss_fn(logprobs, entropy, mb):       # [T] fp32 each, on the last pipeline stage
            # this micro-batch's share of the global loss: divide by counts fixed before the
            # split (e.g. the number of loss tokens of the whole step over all dp ranks)
            return -(logprobs * mb.loss_inputs["advantages"]).sum() / global_tokens
        metrics = trainer.train_step(micro_batches, loss_fn)
        # {"loss": global sum of loss_fn over all micro-batches and dp ranks, "grad_norm", "step", ...}
    trainer.save_checkpoint(dir, extra={"data_cursor": 7})    # collective; any layout can load it
    trainer.load_checkpoint(dir)                              # returns the saved metadata

`forward_logprobs(micro_batches)` recomputes log-probs without gradients (on the last stage).
Layers are split evenly over pp * virtual_stages stages unless `layers_per_stage` says otherwise.
Under context parallelism (groups.cp_size > 1) the ranks of a cp group take the same micro-batches
and split each one's tokens (`cp_comm`: "ring" or "allgather" attention; `cp_min_tokens` > 0:
dynamic CP, shorter sequences kept whole on one rank; see context_parallel.py).
MoE routers add their aux / z losses to the gradient by themselves (scaled by 1 / global number of
micro-batches), and the aux-loss-free bias is updated after each optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rl_engine.policy import comm
from rl_engine.policy.checkpoint import load_hf_weights
from rl_engine.policy.config import ModelConfig
from rl_engine.policy.context_parallel import check_cp_options
from rl_engine.policy.dist_checkpoint import load_checkpoint, save_checkpoint
from rl_engine.policy.model import CausalLM
from rl_engine.policy.moe import MoEBlock
from rl_engine.policy.optimizer import DistributedOptimizer, OptimizerConfig
from rl_engine.policy.parallel import ParallelGroups, check_model_layout
from rl_engine.policy.pipeline import LossFn, MicroBatch, PipelineRunner, split_layers

__all__ = ["MicroBatch", "OptimizerConfig", "ParallelTrainer"]


class ParallelTrainer:
    def __init__(
        self,
        config: ModelConfig,
        *,
        groups: ParallelGroups,
        optim: OptimizerConfig,
        dtype: torch.dtype = torch.float32,
        virtual_stages: int = 1,
        layers_per_stage: list[int] | None = None,
        hf_path: str | None = None,
        seed: int = 0,
        cp_comm: str = "ring",
        cp_min_tokens: int = 0,
    ) -> None:
        g = groups
        check_model_layout(config, tp=g.tp_size, pp=g.pp_size, ep=g.ep_size, virtual_stages=virtual_stages)
        check_cp_options(config, cp=g.cp_size, cp_comm=cp_comm, cp_min_tokens=cp_min_tokens)
        if virtual_stages > 1 and g.pp_size == 1:
            raise ValueError(f"virtual_stages ({virtual_stages}) > 1 needs pp > 1")
        self.config, self.groups = config, groups
        ranges = split_layers(config.num_layers, g.pp_size * virtual_stages, layers_per_stage)
        # Same seed on every rank: replicated parameters start equal across tp / dp without a
        # broadcast. (Shards of a random init depend on the layout; load weights to compare layouts.)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.chunks = [CausalLM(config, groups=g, dtype=dtype, layer_range=ranges[c * g.pp_size + g.pp_rank])
                           for c in range(virtual_stages)]
        if hf_path is not None:
            for chunk in self.chunks:
                load_hf_weights(chunk, hf_path)
        self._tie_embeddings()
        params = [p for c in self.chunks for p in c.parameters()]
        self.optimizer = DistributedOptimizer(params, g, optim)
        self.runner = PipelineRunner(self.chunks, g, cp_comm=cp_comm, cp_min_tokens=cp_min_tokens)
        self.moe_blocks = [m for c in self.chunks for m in c.modules() if isinstance(m, MoEBlock)]

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "ParallelTrainer":
        return cls(ModelConfig.from_pretrained(path), hf_path=path, **kwargs)

    def _tie_embeddings(self) -> None:
        """Tied embeddings over pp: the last stage's copy starts from the first stage's and their
        gradients are summed (optimizer), so they stay equal."""
        g = self.groups
        if not self.config.tie_word_embeddings or g.pp_size == 1:
            return
        tied = []
        if g.is_first_stage:
            tied.append(self.chunks[0].embed_tokens.weight)
        if g.is_last_stage:
            tied.append(self.chunks[-1].embed_tokens.weight)
            tied[-1].tied_copy = True
        for p in tied:
            p.tied_embedding = True
            with torch.no_grad():
                comm.broadcast(p.data, src=g.pp_ranks[0], group=g.embedding_group)

    @property
    def step(self) -> int:
        return self.optimizer.step_count

    def train_step(self, micro_batches: list[MicroBatch], loss_fn: LossFn, *,
                   apply: Callable[[], bool] | None = None) -> dict[str, float]:
        """Forward/backward over every micro-batch (1F1B across pipeline stages), grad sync,
        clipping and one AdamW step. Collective over the world. `apply` (called on every rank after
        the backward passes, may be collective) returning False discards the gradients instead: no
        step, the router biases unchanged, `applied` False in the result."""
        g = self.groups
        self._check_expert_lockstep(micro_batches)
        counts = comm.all_reduce(torch.tensor([len(micro_batches), sum(mb.num_tokens for mb in micro_batches)],
                                              dtype=torch.float64), g.dp_group)
        for m in self.moe_blocks:
            m.aux_loss_scale = 1.0 / float(counts[0])
        for c in self.chunks:
            c.train()
        losses = self.runner.run(micro_batches, loss_fn)
        applied = apply is None or apply()
        if applied:
            self.optimizer.finish_grad_sync()
            stats = self.optimizer.step()
            for m in self.moe_blocks:
                m.update_expert_bias(g.dp_cp_group)
        else:
            self.optimizer.zero_grad()
            stats = {"grad_norm": 0.0}
            for m in self.moe_blocks:
                if m.tokens_per_expert is not None:
                    m.tokens_per_expert.zero_()
        # every cp rank computed the whole micro-batches' loss (from gathered log-probs): count one
        loss = torch.tensor([float(sum(losses)) if losses and g.tp_rank == 0 and g.cp_rank == 0 else 0.0],
                            dtype=torch.float64)
        for group in (g.dp_group, g.pp_group, g.tp_group, g.cp_group):
            loss = comm.all_reduce(loss, group)
        return {"loss": float(loss), "grad_norm": stats["grad_norm"], "step": self.step, "applied": applied,
                "num_micro_batches": int(counts[0]), "num_tokens": int(counts[1])}

    def _check_expert_lockstep(self, micro_batches: list[MicroBatch]) -> None:
        """Expert parallelism exchanges tokens in every MoE layer of every pass, so the ranks of an
        ep group (different data-parallel ranks) must run the same number of micro-batches."""
        g = self.groups
        if g.ep_group is None or not self.moe_blocks:
            return
        n = torch.tensor([len(micro_batches), -len(micro_batches)], dtype=torch.int64)
        comm.all_reduce(n, g.ep_group, op=torch.distributed.ReduceOp.MAX)
        if int(n[0]) != -int(n[1]):
            raise ValueError(f"expert parallelism needs the same number of micro-batches on every rank of an ep "
                             f"group; they range from {-int(n[1])} to {int(n[0])} (this rank: {len(micro_batches)}). "
                             "Balance the micro-batch counts across data-parallel ranks (an empty-loss pad is fine)")

    @torch.no_grad()
    def forward_logprobs(self, micro_batches: list[MicroBatch]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(logprobs, entropy) [T] of each micro-batch, on the last pipeline stage ([] elsewhere)."""
        self._check_expert_lockstep(micro_batches)
        return self.runner.run(micro_batches, None, forward_only=True)

    @torch.no_grad()
    def forward_logits(self, micro_batches: list[MicroBatch]) -> list[torch.Tensor]:
        """Full [T, vocab] logits of each micro-batch on the last stage (tests, evaluation)."""
        return self.runner.run(micro_batches, None, forward_only=True,
                               last_stage_fn=lambda model, h, mb: model.compute_logits(h))

    def save_checkpoint(self, path: str, *, extra: dict | None = None) -> None:
        save_checkpoint(path, self.chunks, self.optimizer, step=self.step, extra=extra)

    def load_checkpoint(self, path: str) -> dict:
        return load_checkpoint(path, self.chunks, self.optimizer)
