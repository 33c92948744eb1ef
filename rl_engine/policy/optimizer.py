"""Distributed optimizer (ZeRO-1): contiguous grad buffers in buckets, AdamW on fp32 master shards.

Parameters live as views of one flat buffer per kind (dense params: data-parallel over the dp x cp group;
expert params: over the expert-data-parallel group), and every parameter gets a `main_grad`, a view
of a flat fp32 gradient buffer of the same layout, into which a post-accumulate hook adds each
micro-batch's gradient (so bf16 parameters accumulate in fp32). The buffer is cut into buckets, each
padded to a multiple of the dp size; a step reduce-scatters each bucket (SUM: losses are normalised
by global counts), so rank r owns the r-th slice of every bucket. AdamW runs on the fp32 master copy
of the owned slices (math identical to `torch.optim.AdamW`), and the updated slices are all-gathered
back into the parameter buffer. At dp = 1 the collectives vanish and this is plain AdamW with fp32
master weights.

Before the reduce-scatter, `finish_grad_sync` makes the gradients of each (tp, pp) replica complete:
sums over tp for parameters tagged `tp_partial_grad` (sequence-parallel norms, router), over the
replicas of KV heads (`tp_replicated_rows`), and over the first and last pipeline stage for tied
embeddings (`tied_embedding`). The global grad norm counts each logical element once: elements
replicated over tp are weighted 1/replicas, the last stage's tied copy 0, then one all-reduce over
the world.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rl_engine.kernels.cpu import train_elementwise
from rl_engine.policy import comm
from rl_engine.policy.parallel import ParallelGroups

STATE_KINDS = ("param", "exp_avg", "exp_avg_sq")


@dataclass(kw_only=True)
class OptimizerConfig:
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_grad: float | None = 1.0  # max global grad norm; None: no clipping
    bucket_elements: int = 1 << 22

    def __post_init__(self) -> None:
        if self.lr < 0 or self.eps <= 0 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"bad AdamW settings: lr={self.lr}, betas={self.betas}, eps={self.eps}")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip_grad must be > 0 or None, got {self.clip_grad}")


def _norm_weight(p: torch.nn.Parameter, tp: int) -> torch.Tensor:
    """Per-element weight of p in the global grad norm (1 / number of identical copies in tp, pp)."""
    w = torch.ones(p.shape, dtype=torch.float32)
    if getattr(p, "tied_copy", False):
        return w.zero_().reshape(-1)
    if not getattr(p, "tensor_parallel", False):
        return w.fill_(1.0 / tp).reshape(-1)
    for start, end, rep in getattr(p, "tp_replicated_rows", ()):
        w[start:end] = 1.0 / rep
    return w.reshape(-1)


class _Buffer:
    """Flat param / grad buffers of one data-parallel group, and this rank's shard of them."""

    def __init__(self, params: list[torch.nn.Parameter], group, *, tp: int, bucket_elements: int) -> None:
        self.params, self.group = params, group
        size = 1 if group is None else dist.get_world_size(group)
        rank = 0 if group is None else dist.get_rank(group)
        self.offsets, self.buckets = [], []  # buckets: (start, end) padded ranges
        pos = start = 0
        for i, p in enumerate(params):
            self.offsets.append(pos)
            pos += p.numel()
            if pos - start >= bucket_elements or i == len(params) - 1:
                end = start + math.ceil((pos - start) / size) * size
                self.buckets.append((start, end))
                pos = start = end
        total = pos
        dtype = params[0].dtype
        self.param_data = torch.zeros(total, dtype=dtype)
        self.grad = torch.zeros(total, dtype=torch.float32)
        weights = torch.zeros(total, dtype=torch.float32)
        for p, off in zip(params, self.offsets):
            n = p.numel()
            self.param_data[off:off + n].copy_(p.data.reshape(-1))
            p.data = self.param_data[off:off + n].view(p.shape)
            p.main_grad = self.grad[off:off + n].view(p.shape)
            weights[off:off + n] = _norm_weight(p, tp)
            p.register_post_accumulate_grad_hook(_accumulate_main_grad)
        # Owned slice of each bucket: [start + rank * s, start + (rank + 1) * s).
        self.owned = [(s + rank * ((e - s) // size), s + (rank + 1) * ((e - s) // size)) for s, e in self.buckets]
        self.master = torch.cat([self.param_data[a:b].float() for a, b in self.owned])
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        self.grad_shard = torch.zeros_like(self.master)
        self.norm_weight = torch.cat([weights[a:b] for a, b in self.owned])
        self.shard_slices = []
        o = 0
        for a, b in self.owned:
            self.shard_slices.append(slice(o, o + b - a))
            o += b - a

    def reduce_scatter_grads(self) -> None:
        for (s, e), (a, b), sl in zip(self.buckets, self.owned, self.shard_slices):
            if self.group is None:
                self.grad_shard[sl].copy_(self.grad[s:e])
            else:
                comm.reduce_scatter_into(self.grad_shard[sl], self.grad[s:e], self.group)

    def all_gather_params(self) -> None:
        for (s, e), (a, b), sl in zip(self.buckets, self.owned, self.shard_slices):
            mine = self.master[sl].to(self.param_data.dtype)
            if self.group is None:
                self.param_data[s:e].copy_(mine)
            else:
                comm.all_gather_into(self.param_data[s:e], mine, self.group)

    def full(self, kind: str) -> torch.Tensor:
        """The whole buffer of one optimizer state kind (fp32), gathered over the group."""
        shard = {"param": self.master, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}[kind]
        out = torch.zeros(self.grad.numel(), dtype=torch.float32)
        for (s, e), sl in zip(self.buckets, self.shard_slices):
            if self.group is None:
                out[s:e].copy_(shard[sl])
            else:
                comm.all_gather_into(out[s:e], shard[sl].contiguous(), self.group)
        return out

    def set_full(self, kind: str, full: torch.Tensor) -> None:
        shard = {"param": self.master, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}[kind]
        for (a, b), sl in zip(self.owned, self.shard_slices):
            shard[sl].copy_(full[a:b])


def _accumulate_main_grad(p: torch.nn.Parameter) -> None:
    p.main_grad.add_(p.grad)
    p.grad = None


class DistributedOptimizer:
    """AdamW over the parameters of this rank's model chunks, sharded over data parallelism."""

    def __init__(self, params: list[torch.nn.Parameter], groups: ParallelGroups, config: OptimizerConfig) -> None:
        self.groups, self.config = groups, config
        self.lr = config.lr  # the next step's lr: an lr schedule sets it before each step (not checkpointed)
        self.step_count = 0
        dense = [p for p in params if not getattr(p, "is_expert", False)]
        expert = [p for p in params if getattr(p, "is_expert", False)]
        self.buffers = [_Buffer(ps, grp, tp=groups.tp_size, bucket_elements=config.bucket_elements)
                        for ps, grp in ((dense, groups.dp_cp_group), (expert, groups.edp_group)) if ps]
        self.params = [p for b in self.buffers for p in b.params]

    def zero_grad(self) -> None:
        for b in self.buffers:
            b.grad.zero_()
        for p in self.params:
            p.grad = None

    def finish_grad_sync(self) -> None:
        """Complete each replica's gradients over tp and the tied embedding stages (see module doc)."""
        g = self.groups
        partial = [p for p in self.params if getattr(p, "tp_partial_grad", False)]
        _all_reduce_coalesced([p.main_grad for p in partial], g.tp_group)
        _sum_kv_replicas([p for p in self.params if hasattr(p, "tp_replicated_rows")], g)
        tied = [p for p in self.params if getattr(p, "tied_embedding", False)]
        _all_reduce_coalesced([p.main_grad for p in tied], g.embedding_group)

    def step(self) -> dict[str, float]:
        """Reduce-scatter grads, clip by the global norm, AdamW on the master shard, all-gather.
        Returns {"grad_norm": norm before clipping}."""
        cfg = self.config
        for b in self.buffers:
            b.reduce_scatter_grads()
        sq = sum((b.grad_shard.square() * b.norm_weight).sum() for b in self.buffers)
        sq = comm.all_reduce(torch.as_tensor(sq, dtype=torch.float64).reshape(1), self.groups.world_group)
        grad_norm = float(sq.sqrt())
        clip = 1.0
        if cfg.clip_grad is not None and grad_norm > cfg.clip_grad:
            clip = cfg.clip_grad / (grad_norm + 1e-6)
        self.step_count += 1
        beta1, beta2 = cfg.betas
        bc1 = 1 - beta1 ** self.step_count
        bc2_sqrt = (1 - beta2 ** self.step_count) ** 0.5
        for b in self.buffers:
            grad = b.grad_shard if clip == 1.0 else b.grad_shard * clip
            # The same operations as torch.optim.AdamW (single-tensor path).
            b.master.mul_(1 - self.lr * cfg.weight_decay)
            b.exp_avg.lerp_(grad, 1 - beta1)
            b.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (b.exp_avg_sq.sqrt() / bc2_sqrt).add_(cfg.eps)
            b.master.addcdiv_(b.exp_avg, denom, value=-self.lr / bc1)
            b.all_gather_params()
        self.zero_grad()
        return {"grad_norm": grad_norm}

    # ---- checkpoint state ------------------------------------------------------------------------
    def gather_state(self) -> dict[str, dict[int, torch.Tensor]]:
        """kind -> {id(param): full fp32 tensor shaped like the param}, gathered over dp (collective)."""
        out: dict[str, dict[int, torch.Tensor]] = {k: {} for k in STATE_KINDS}
        for b in self.buffers:
            for kind in STATE_KINDS:
                full = b.full(kind)
                for p, off in zip(b.params, b.offsets):
                    out[kind][id(p)] = full[off:off + p.numel()].view(p.shape)
        return out

    def load_state(self, state: dict[str, dict[int, torch.Tensor]], step: int) -> None:
        """Inverse of `gather_state` (every rank passes the full local tensors); sets params too."""
        for b in self.buffers:
            for kind in STATE_KINDS:
                full = torch.zeros(b.grad.numel(), dtype=torch.float32)
                for p, off in zip(b.params, b.offsets):
                    full[off:off + p.numel()] = state[kind][id(p)].reshape(-1)
                b.set_full(kind, full)
                if kind == "param":
                    b.param_data.copy_(full.to(b.param_data.dtype))
        self.step_count = step


def _all_reduce_coalesced(tensors: list[torch.Tensor], group) -> None:
    if group is None or not tensors:
        return
    flat = comm.all_reduce(torch.cat([t.reshape(-1) for t in tensors]), group)
    o = 0
    for t in tensors:
        t.copy_(flat[o:o + t.numel()].view(t.shape))
        o += t.numel()


def _sum_kv_replicas(params: list[torch.nn.Parameter], g: ParallelGroups) -> None:
    """Rows of a KV head replicated on `rep` consecutive tp ranks: each replica's gradient comes from
    different query heads; sum them within the replica set (one all-gather over tp, no subgroups)."""
    views = [p.main_grad[s:e] for p in params for s, e, _ in p.tp_replicated_rows]
    reps = [rep for p in params for _, _, rep in p.tp_replicated_rows]
    if g.tp_group is None or not views:
        return
    flat = torch.cat([v.reshape(-1) for v in views])
    gathered = torch.empty(g.tp_size * flat.numel(), dtype=flat.dtype)
    comm.all_gather_into(gathered, flat, g.tp_group)
    gathered = gathered.view(g.tp_size, -1)
    o = 0
    for v, rep in zip(views, reps):
        n = v.numel()
        first = g.tp_rank // rep * rep
        v.copy_(gathered[first:first + rep, o:o + n].sum(0).view(v.shape))
        o += n


class MasterWeightsAdamW:
    """`torch.optim.AdamW` for the single-process trainer, stepping fp32 master weights when the model's
    are not fp32 (Megatron's mixed precision; `DistributedOptimizer` does the same on its shards).

    In bf16 an AdamW update smaller than half a unit in the last place of its weight (about lr when the
    weight is near 1: 2^-8 = 0.0039) rounds away, so small learning rates leave the weights unchanged.
    Here each non-fp32 parameter has an fp32 master; `accumulate_grads()` after each micro-batch's backward
    moves the parameters' gradients into the masters' fp32 gradients (so micro-batches add up in fp32;
    whatever is left is moved by `clip_grad_norm_` / `step()`), `step()` runs
    `torch.optim.AdamW` (its fp32 state) on the masters and copies them back, rounded, into the
    parameters: the weights are exactly fp32 AdamW's rounded to bf16 (on CPU the step after the first runs as one
    C++ call with torch's bits, `train_elementwise.adamw_step`). fp32 parameters are their own
    masters, so an fp32 model runs plain `torch.optim.AdamW` (same state dict as before). Anything that
    writes the parameters from outside (a warm start with another optimizer) must call
    `reload_model_params()`; the masters are in `state_dict()` so a resumed run continues exactly."""

    def __init__(self, params, *, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:  # torch.optim.AdamW's defaults
        self.params = list(params)
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().requires_grad_(p.requires_grad)
                        for p in self.params]
        self._pairs = [(p, m) for p, m in zip(self.params, self.masters) if m is not p]
        self.inner = torch.optim.AdamW(self.masters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def accumulate_grads(self) -> None:
        """Move the parameters' gradients into the masters' fp32 ones. Called after each micro-batch's
        backward, the micro-batches' gradients add up in fp32 (as `DistributedOptimizer` adds them into its
        fp32 buffer), not in the parameters' dtype; `clip_grad_norm_` and `step` call it too."""
        for p, m in self._pairs:
            if p.grad is not None:
                g = p.grad.float()
                m.grad = g if m.grad is None else m.grad.add_(g)
                p.grad = None

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` over the (fp32) gradients the next `step()` uses."""
        self.accumulate_grads()
        return torch.nn.utils.clip_grad_norm_(self.masters, max_norm)

    @torch.no_grad()
    def step(self) -> None:
        self.accumulate_grads()
        # torch.optim.AdamW's own step, or the same step's bits in one C++ call where the kernel takes it (CPU fp32
        # masters on the single-tensor path after the first step, which makes the state): kernels/cpu/train_elementwise
        if not train_elementwise.adamw_step(self.inner):
            self.inner.step()
        for p, m in self._pairs:
            p.copy_(m)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)
        for p, _ in self._pairs:
            p.grad = None

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """The parameters were written from outside: take them as the masters."""
        for p, m in self._pairs:
            m.copy_(p)

    def state_dict(self) -> dict:
        """torch.optim's state dict plus "master_weights": like its moments, the live tensors, not copies (a
        clone was a second fp32 copy of the model at each checkpoint): serialize it before the next step."""
        state = self.inner.state_dict()
        if self._pairs:
            state["master_weights"] = [m.detach() for _, m in self._pairs]
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Checked whole before anything is loaded: a state of another model is a ValueError naming what differs."""
        state = dict(state)
        masters = state.pop("master_weights", None)
        if not self._pairs and masters is not None:
            raise ValueError("the optimizer state holds fp32 master weights of a bf16 run: resume it with "
                             "model.dtype=bfloat16")
        if masters is not None:
            if len(masters) != len(self._pairs):
                raise ValueError(f"the optimizer state holds {len(masters)} fp32 master weights, this model has "
                                 f"{len(self._pairs)} non-fp32 parameters: it was saved from another model")
            for i, ((_, m), saved) in enumerate(zip(self._pairs, masters)):
                if saved.shape != m.shape:
                    raise ValueError(f"master weight {i} of the optimizer state has shape {tuple(saved.shape)}, "
                                     f"this model's parameter {tuple(m.shape)}: it was saved from another model")
        self.inner.load_state_dict(state)
        if self._pairs and masters is None:  # a bf16 run's state from before they were kept
            warnings.warn("the optimizer state has no fp32 master weights: they restart from the bf16 weights, "
                          "so this resumed run is not bit-exact")
            self.reload_model_params()
        for (p, m), saved in zip(self._pairs, masters or []):  # counts checked above
            m.copy_(saved)
            p.copy_(m)
