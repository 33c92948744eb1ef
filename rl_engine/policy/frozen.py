"""A frozen second model in the trainer's processes: a reference policy (KL regularisation) or a
distillation teacher. It is sharded like the trainer (the same `ParallelGroups`, the same split of
layers over pipeline stages), holds no gradients and no optimizer state, and scores the trainer's
own packed micro-batches with no-grad forward passes (log-probs on the last pipeline stage).

    ref = FrozenPolicy.from_pretrained(path, groups=trainer.groups, dtype=torch.float32)
    ref_logprobs = ref.forward_logprobs(micro_batches)   # [T] each, on the last stage; [] elsewhere
"""

from __future__ import annotations

import torch

from rl_engine.policy import comm
from rl_engine.policy.checkpoint import load_hf_weights
from rl_engine.policy.config import ModelConfig
from rl_engine.policy.model import CausalLM
from rl_engine.policy.offload import HostOffload, in_use
from rl_engine.policy.parallel import ParallelGroups, check_model_layout
from rl_engine.policy.pipeline import MicroBatch, PipelineRunner, split_layers

__all__ = ["FrozenPolicy"]


class FrozenPolicy:
    def __init__(self, config: ModelConfig, *, path: str, groups: ParallelGroups, dtype: torch.dtype = torch.float32,
                 virtual_stages: int = 1, layers_per_stage: list[int] | None = None, offload: bool = False,
                 device: str = "cpu") -> None:
        """`offload`: weights in host memory between `forward_logprobs` calls (`ref.offload: cpu`)."""
        g = groups
        check_model_layout(config, tp=g.tp_size, pp=g.pp_size, ep=g.ep_size, virtual_stages=virtual_stages)
        self.config, self.groups = config, groups
        ranges = split_layers(config.num_layers, g.pp_size * virtual_stages, layers_per_stage)
        self.chunks = [CausalLM(config, groups=g, dtype=dtype, layer_range=ranges[c * g.pp_size + g.pp_rank])
                       for c in range(virtual_stages)]
        for chunk in self.chunks:
            load_hf_weights(chunk, path)
            chunk.requires_grad_(False)
        if config.tie_word_embeddings and g.pp_size > 1:  # the last stage's copy is the first stage's
            tied = ([self.chunks[0].embed_tokens.weight] if g.is_first_stage else []) + (
                [self.chunks[-1].embed_tokens.weight] if g.is_last_stage else [])
            for p in tied:
                comm.broadcast(p.data, src=g.pp_ranks[0], group=g.embedding_group)
        self.runner = PipelineRunner(self.chunks, g)
        self.offload = HostOffload(self.chunks, device=device) if offload else None

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "FrozenPolicy":
        return cls(ModelConfig.from_pretrained(path), path=path, **kwargs)

    @torch.no_grad()
    def forward_logprobs(self, micro_batches: list[MicroBatch]) -> list[torch.Tensor]:
        """Log-probs [T] of each micro-batch's targets at its temperature, on the last pipeline stage
        ([] elsewhere). Collective over the pipeline (and tp / ep) groups, like the trainer's pass."""
        with in_use(self.offload):
            return [lp for lp, _ in self.runner.run(micro_batches, None, forward_only=True)]
