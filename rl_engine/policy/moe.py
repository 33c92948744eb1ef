"""Mixture-of-experts block: router, top-k routing, experts, optional shared expert.

The experts of a layer are two stacked parameters, `w13` [E_local, 2 * I, H] (gate and up fused) and
`w2` [E_local, H, I], so that import, export and weight sync deal with two tensors per layer rather
than 3·E. Token dispatch is a local sort by expert id here; expert parallelism swaps in a dispatcher
that moves tokens between ranks with all_to_all (`expert_parallel.py`) and keeps this math.

Routing can be recorded and replayed (`RoutingRecord`): RL routing replay makes training use the
experts the inference engine chose at rollout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from rl_engine import kernels
from rl_engine.kernels.cpu import packed_linear
from rl_engine.kernels.grad_mode import training_kernels
from rl_engine.policy import comm, expert_parallel
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


# rows of a slice of SwiGLUMLP's inference forward over many rows (a prefill): its [rows, 2 I] intermediate is
# 1.5 MiB at I = 768 (the ~3.5M model), near a 1 MiB L2 rather than the whole step's 12 MiB in L3. In the engine's
# batch-64 prefill 256 and 128 rows measured alike (257 / 260 ms against 288 ms unsliced)
MLP_ROW_CHUNK = 256


class SwiGLUMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, *, groups: ParallelGroups, dtype, device=None) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(hidden, [intermediate, intermediate], groups=groups, bias=False,
                                                 dtype=dtype, device=device)
        self.down_proj = RowParallelLinear(intermediate, hidden, groups=groups, bias=False, dtype=dtype, device=device)
        self.bind_kernels(self.down_proj.weight.device)

    def bind_kernels(self, device: torch.device) -> None:
        self._silu_and_mul = kernels.resolve("silu_and_mul", device)
        self._silu_and_mul_train = kernels.resolve("silu_and_mul_train", device)  # the trainer's forwards

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP's output, or residual + it when `residual` is given (fused into the last matmul)."""
        train = training_kernels()
        silu_and_mul = self._silu_and_mul_train if train else self._silu_and_mul
        if residual is not None and x.dim() == 2 and x.shape[0] > MLP_ROW_CHUNK and self._row_chunks(x, residual):
            # a prefill's MLP by slices of rows: each slice's intermediate is read back from L2, not L3 (the
            # ~3.5M batch-64 prefill 288 -> 257 ms); the same bits, each row's products its own sums on the
            # small GEMM's panels (`reads_panels`)
            out = torch.empty_like(residual)
            starts = list(range(0, x.shape[0], MLP_ROW_CHUNK))
            if x.shape[0] - starts[-1] == 1:  # a one-row slice would take the C++ gemv (its own sums): no slice of one
                starts.pop()
            for s, e in zip(starts, starts[1:] + [x.shape[0]]):
                out[s:e] = self.down_proj(silu_and_mul(self.gate_up_proj(x[s:e])), residual[s:e])
            return out
        gate_up = self.gate_up_proj(x)
        if train:  # gate_up is read by SwiGLU alone: its backward may write d gate_up over it
            return self.down_proj(silu_and_mul(gate_up, overwrite_input=True), residual)
        return self.down_proj(silu_and_mul(gate_up), residual)

    def _row_chunks(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        """Whether the forward may take x's rows in slices with unchanged bits: one rank, no bias, both products
        (the last with its residual) on the small GEMM's panels (row-independent sums), no autograd."""
        return (self.gate_up_proj.groups.tp_size == 1 and self.gate_up_proj.bias is None
                and not torch.is_grad_enabled() and packed_linear.reads_panels(x, self.gate_up_proj.weight)
                and packed_linear.reads_panels(x, self.down_proj.weight, residual))


class _AttachAuxLoss(torch.autograd.Function):
    """Forward identity on the block output; backward also feeds d(aux)/d(aux) = scale into the
    router's aux loss (Megatron's MoEAuxLossAutoScaler), so the user's loss need not know of it."""

    @staticmethod
    def forward(ctx, out, aux, scale):
        ctx.save_for_backward(aux)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, g):
        (aux,) = ctx.saved_tensors
        return g, torch.full_like(aux, ctx.scale), None


class MoEBlock(nn.Module):
    """Top-k routed experts (softmax gate, optional renormalisation of the top-k weights).

    Training extras, all off at coefficient 0: the load-balancing aux loss (Switch / HF form,
    `E * sum_e f_e P_e` per layer and micro-batch), the router z-loss (mean logsumexp^2), both
    scaled by `aux_loss_scale` (the trainer sets 1 / global number of micro-batches), and the
    aux-loss-free balancing bias (DeepSeek-V3): `expert_bias` is added to the scores for the top-k
    choice only, and `update_expert_bias` moves it toward balanced loads after each step.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, groups: ParallelGroups, dtype, device=None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.groups = groups
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.sigmoid_scores = cfg.scoring_func == "sigmoid"
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.routed_scaling_factor = cfg.routed_scaling_factor
        tp, ep = groups.tp_size, groups.ep_size
        inter = cfg.moe_intermediate_size
        if inter % tp:
            raise ValueError(f"moe_intermediate_size ({inter}) is not divisible by tensor_parallel_size ({tp})")
        if cfg.num_experts % ep:
            raise ValueError(f"num_experts ({cfg.num_experts}) is not divisible by expert_parallel_size ({ep})")
        self.inter_local = inter // tp
        self.num_local_experts = cfg.num_experts // ep
        self.expert_start = groups.ep_rank * self.num_local_experts
        # Router is replicated: every rank computes the same routing.
        self.gate = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, dtype=dtype, device=device))
        self.w13 = nn.Parameter(torch.empty(self.num_local_experts, 2 * self.inter_local, cfg.hidden_size,
                                            dtype=dtype, device=device))
        self.w2 = nn.Parameter(torch.empty(self.num_local_experts, cfg.hidden_size, self.inter_local,
                                           dtype=dtype, device=device))
        for p in (self.gate, self.w13, self.w2):
            nn.init.normal_(p, std=0.02)
        for p in (self.w13, self.w2):
            p.tensor_parallel = True
            p.is_expert = True  # data-parallel over the expert-data-parallel group
        # The router's gradient arrives through top-k weights whose upstream gradient is partial over
        # tp (each rank holds a slice of every expert): the trainer all-reduces it over tp.
        self.gate.tp_partial_grad = True
        self.shared_expert = None
        self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SwiGLUMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, groups=groups,
                                           dtype=dtype, device=device)
            if cfg.shared_expert_gated:
                self.shared_expert_gate = nn.Parameter(torch.empty(1, cfg.hidden_size, dtype=dtype, device=device))
                nn.init.normal_(self.shared_expert_gate, std=0.02)
                if groups.sequence_parallel:
                    self.shared_expert_gate.tp_partial_grad = True
        self.aux_loss_coef = cfg.router_aux_loss_coef
        self.z_loss_coef = cfg.router_z_loss_coef
        self.bias_update_rate = cfg.router_bias_update_rate
        self.aux_loss_scale = 1.0
        # DeepSeek-V3's e_score_correction_bias is this buffer (fp32, as transformers keeps it).
        has_bias = self.bias_update_rate > 0 or cfg.model_type == "deepseek_v3"
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, device=device) if has_bias else None)
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_experts, device=device)
                             if self.bias_update_rate > 0 else None, persistent=False)
        self.bind_kernels(self.gate.device)

    def bind_kernels(self, device: torch.device) -> None:
        self._dense = kernels.resolve("dense", device)  # router, experts and shared-expert gate
        # the experts' SwiGLU: the engine's, or the trainer's (`training_kernels`), as SwiGLUMLP picks
        self._silu_and_mul = kernels.resolve("silu_and_mul", device)
        self._silu_and_mul_train = kernels.resolve("silu_and_mul_train", device)

    def route(self, x: torch.Tensor, routing: RoutingRecord | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router_logits [T, E], probs [T, E] fp32, topk_weights [T, k] in x.dtype, topk_ids [T, k]).
        Sigmoid scoring (DeepSeek-V3) computes the router in fp32 as transformers does; its `probs`
        are the sigmoid scores (normalised over experts only for the aux loss)."""
        if self.sigmoid_scores:
            router_logits = self._dense(x.float(), self.gate.float())
            probs = torch.sigmoid(router_logits)
        else:
            router_logits = self._dense(x, self.gate)
            probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        if routing is not None and routing.mode == "replay":
            topk_ids = routing.topk_ids[self.layer_idx]
            if topk_ids.shape != (x.shape[0], self.top_k):
                raise ValueError(f"replayed routing of layer {self.layer_idx} has shape {tuple(topk_ids.shape)}, "
                                 f"expected {(x.shape[0], self.top_k)}")
        else:
            scores = probs.detach() if self.expert_bias is None else probs.detach() + self.expert_bias
            if self.n_group > 1:
                scores = self._limit_to_groups(scores)
            topk_ids = torch.topk(scores, self.top_k, dim=-1).indices
            if routing is not None:
                routing.topk_ids[self.layer_idx] = topk_ids.detach()
        topk_w = probs.gather(1, topk_ids)
        if self.norm_topk_prob:
            denominator = topk_w.sum(-1, keepdim=True)
            topk_w = topk_w / (denominator + 1e-20 if self.sigmoid_scores else denominator)
        if self.routed_scaling_factor != 1.0:
            topk_w = topk_w * self.routed_scaling_factor
        return router_logits, probs, topk_w.to(x.dtype), topk_ids

    def _limit_to_groups(self, scores: torch.Tensor) -> torch.Tensor:
        """Group-limited routing: scores [T, E] with every expert outside the `topk_group` best of
        the `n_group` groups (a group scores the sum of its two best experts) set to -inf."""
        T = scores.shape[0]
        grouped = scores.view(T, self.n_group, self.num_experts // self.n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, n_group]
        best = group_scores.topk(self.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep[:, :, None], float("-inf")).view(T, self.num_experts)

    def _run_local_experts(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """rows [N, H] grouped by local expert (`counts[e]` rows each) -> expert outputs [N, H]."""
        outs = []
        silu_and_mul = self._silu_and_mul_train if training_kernels() else self._silu_and_mul
        for e, chunk in enumerate(rows.split(counts)):
            if chunk.shape[0]:
                outs.append(self._dense(silu_and_mul(self._dense(chunk, self.w13[e])), self.w2[e]))
        return torch.cat(outs) if outs else rows[:0]

    def experts(self, x: torch.Tensor, topk_w: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """Sum over chosen experts of weight * expert(x); partial over tp (caller reduces). Under
        expert parallelism the rows travel to the rank owning their expert and back (dropless)."""
        T, k = topk_ids.shape
        flat_ids = topk_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)  # rows sorted by expert
        token_of = order // k
        counts = torch.bincount(flat_ids, minlength=self.num_experts)
        rows = x[token_of]
        g = self.groups
        if g.ep_group is None:
            y = self._run_local_experts(rows, counts.tolist())
        else:
            y = expert_parallel.dispatch_compute_combine(rows, counts, self._run_local_experts,
                                                         num_local_experts=self.num_local_experts, group=g.ep_group)
        w = topk_w.reshape(-1)[order]
        return torch.zeros_like(x).index_add(0, token_of, y * w[:, None])

    def _aux_loss(self, router_logits: torch.Tensor, probs: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor | None:
        if not (torch.is_grad_enabled() and (self.aux_loss_coef or self.z_loss_coef)):
            return None
        aux = probs.new_zeros(())
        # Means over the micro-batch's tokens. Under context parallelism this rank holds a part of them:
        # the expert counts and the token count are summed over the cp group (no gradient), and each
        # rank's loss is its tokens' share of the sums, so the cp ranks' gradients add up to the whole.
        counts = torch.bincount(topk_ids.reshape(-1), minlength=self.num_experts).float()
        num_tokens = float(topk_ids.shape[0])
        cp_group = self.groups.cp_group
        if cp_group is not None:
            totals = comm.all_reduce(torch.cat([counts, counts.new_tensor([num_tokens])]), cp_group)
            counts, num_tokens = totals[:-1], float(totals[-1])
        if self.aux_loss_coef:
            frac = counts / num_tokens
            if self.sigmoid_scores:  # DeepSeek-V3's balance loss uses the scores normalised over experts
                probs = probs / probs.sum(-1, keepdim=True)
            aux = aux + self.aux_loss_coef * self.num_experts * (frac * probs.sum(0) / num_tokens).sum()
        if self.z_loss_coef:
            aux = aux + self.z_loss_coef * torch.logsumexp(router_logits.float(), dim=-1).pow(2).sum() / num_tokens
        return aux

    def forward(self, x_in: torch.Tensor, routing: RoutingRecord | None = None) -> torch.Tensor:
        g = self.groups
        x = comm.gather_sequence(x_in, g.tp_group) if g.sequence_parallel else comm.copy_to_tp(x_in, g.tp_group)
        router_logits, probs, topk_w, topk_ids = self.route(x, routing)
        if self.tokens_per_expert is not None and torch.is_grad_enabled():
            self.tokens_per_expert += torch.bincount(topk_ids.reshape(-1), minlength=self.num_experts)
        out = self.experts(x, topk_w, topk_ids)
        aux = self._aux_loss(router_logits, probs, topk_ids)
        if aux is not None:
            # Every tp rank computes the same aux loss and its gradients are summed over tp (gate
            # grad all-reduce, copy_to_tp backward): each rank contributes 1/tp.
            out = _AttachAuxLoss.apply(out, aux, self.aux_loss_scale / g.tp_size)
        out = comm.reduce_scatter_sequence(out, g.tp_group) if g.sequence_parallel else comm.reduce_from_tp(out, g.tp_group)
        if self.shared_expert is not None:
            # The shared expert does its own tp communication, so it takes the block's input as is.
            shared = self.shared_expert(x_in)
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(self._dense(x_in, self.shared_expert_gate))
            out = out + shared
        return out

    @torch.no_grad()
    def update_expert_bias(self, dp_group) -> None:
        """Aux-loss-free balancing: bias += rate * sign(mean load - load), loads summed over the
        step's micro-batches and data-parallel ranks (identical on every rank afterwards)."""
        if self.tokens_per_expert is None:  # no bias, or a fixed one (DeepSeek-V3 at rate 0)
            return
        load = comm.all_reduce(self.tokens_per_expert, dp_group)
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.tokens_per_expert.zero_()
