"""Mixture-of-experts block: router, top-k routing, experts, optional shared expert.

The experts of a layer are two stacked parameters, `w13` [E_local, 2 * I, H] (gate and up fused) and
`w2` [E_local, H, I], so that import, export and weight sync deal with two tensors per layer rather
than 3·E. Token dispatch is a local sort by expert id here; expert parallelism swaps in a dispatcher
that moves tokens between ranks with all_to_all and keeps this module's math.

Routing can be recorded and replayed (`RoutingRecord`): RL routing replay makes training use the
experts the inference engine chose at rollout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from rl_engine import kernels
from rl_engine.policy import comm
from rl_engine.policy.config import ModelConfig
from rl_engine.policy.layers import ColumnParallelLinear, RowParallelLinear
from rl_engine.policy.parallel import ParallelGroups


@dataclass
class RoutingRecord:
    """Per MoE layer, the chosen experts [T, k] of each token.

    mode "record": forward fills `topk_ids`; mode "replay": forward uses them instead of its own
    top-k (the gate still provides the weights of the replayed experts, so gradients flow)."""

    mode: str = "record"
    topk_ids: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("record", "replay"):
            raise ValueError(f"RoutingRecord mode must be 'record' or 'replay', got {self.mode!r}")


class SwiGLUMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, *, groups: ParallelGroups, dtype, device=None) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, [intermediate, intermediate], groups=groups, bias=False,
                                                 dtype=dtype, device=device)
        self.down_proj = RowParallelLinear(intermediate, hidden, groups=groups, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x)))


class MoEBlock(nn.Module):
    """Top-k routed experts (softmax gate, optional renormalisation of the top-k weights)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, groups: ParallelGroups, dtype, device=None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.groups = groups
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        tp = groups.tp_size
        inter = cfg.moe_intermediate_size
        if inter % tp:
            raise ValueError(f"moe_intermediate_size ({inter}) is not divisible by tensor_parallel_size ({tp})")
        self.inter_local = inter // tp
        # Router is replicated: every rank computes the same routing.
        self.gate = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, dtype=dtype, device=device))
        self.w13 = nn.Parameter(torch.empty(cfg.num_experts, 2 * self.inter_local, cfg.hidden_size, dtype=dtype, device=device))
        self.w2 = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, self.inter_local, dtype=dtype, device=device))
        for p in (self.gate, self.w13, self.w2):
            nn.init.normal_(p, std=0.02)
        # The router's gradient arrives through top-k weights whose upstream gradient is partial over
        # tp (each rank holds a slice of every expert): the trainer all-reduces it over tp.
        self.gate.tp_partial_grad = True
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SwiGLUMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, groups=groups,
                                           dtype=dtype, device=device)
            self.shared_expert_gate = nn.Parameter(torch.empty(1, cfg.hidden_size, dtype=dtype, device=device))
            nn.init.normal_(self.shared_expert_gate, std=0.02)

    def route(self, x: torch.Tensor, routing: RoutingRecord | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router_logits [T, E], topk_weights [T, k] in x.dtype, topk_ids [T, k])."""
        router_logits = F.linear(x, self.gate)
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        if routing is not None and routing.mode == "replay":
            topk_ids = routing.topk_ids[self.layer_idx]
            if topk_ids.shape != (x.shape[0], self.top_k):
                raise ValueError(f"replayed routing of layer {self.layer_idx} has shape {tuple(topk_ids.shape)}, "
                                 f"expected {(x.shape[0], self.top_k)}")
            topk_w = probs.gather(1, topk_ids)
        else:
            topk_w, topk_ids = torch.topk(probs, self.top_k, dim=-1)
            if routing is not None:
                routing.topk_ids[self.layer_idx] = topk_ids.detach()
        if self.norm_topk_prob:
            topk_w = topk_w / topk_w.sum(-1, keepdim=True)
        return router_logits, topk_w.to(x.dtype), topk_ids

    def experts(self, x: torch.Tensor, topk_w: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """Sum over chosen experts of weight * expert(x); partial over tp (caller reduces)."""
        T, k = topk_ids.shape
        flat_ids = topk_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        token_of = order // k
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            idx = order[start:start + n]
            tok = token_of[start:start + n]
            h = kernels.silu_and_mul(x[tok] @ self.w13[e].t()) @ self.w2[e].t()
            out = out.index_add(0, tok, h * topk_w.reshape(-1)[idx, None])
            start += n
        return out

    def forward(self, x_in: torch.Tensor, routing: RoutingRecord | None = None) -> torch.Tensor:
        g = self.groups
        x = comm.gather_sequence(x_in, g.tp_group) if g.sequence_parallel else comm.copy_to_tp(x_in, g.tp_group)
        _, topk_w, topk_ids = self.route(x, routing)
        out = self.experts(x, topk_w, topk_ids)
        out = comm.reduce_scatter_sequence(out, g.tp_group) if g.sequence_parallel else comm.reduce_from_tp(out, g.tp_group)
        if self.shared_expert is not None:
            # The shared expert does its own tp communication, so it takes the block's input as is.
            out = out + self.shared_expert(x_in) * torch.sigmoid(F.linear(x_in, self.shared_expert_gate))
        return out
