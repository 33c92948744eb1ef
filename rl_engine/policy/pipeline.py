"""Pipeline parallelism: layer split over stages, 1F1B and interleaved 1F1B over packed micro-batches.

A schedule is a plain list of actions per rank, `("F" | "B", model_chunk, micro_batch)`, made by a
pure function (testable without processes: `simulate` checks that a set of per-rank schedules cannot
deadlock). The runner executes one rank's list: sends are asynchronous (isend, waited at the end of
the step), receives block; each activation is preceded by its shape, because packed micro-batches
have a different token count each. Tags name (micro-batch, virtual stage, kind), so messages never
match the wrong receive. With virtual stages, rank r holds model chunks for virtual stages r,
r + pp, r + 2pp, ... (Megatron's interleaving); virtual stage 0 embeds, the last one computes
log-probs and the loss. Every rank of a pipeline receives the same micro-batches (positions and
cu_seqlens are needed at every stage; targets and loss inputs at the last). Under context
parallelism the ranks of a cp group receive the same micro-batches too; each runs its `CPShard` of
every micro-batch through the stages, and the loss function sees the gathered log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rl_engine.kernels.grad_mode import trainer_pass
from rl_engine.policy import comm
from rl_engine.policy.context_parallel import CPShard
from rl_engine.policy.moe import RoutingRecord
from rl_engine.policy.parallel import ParallelGroups


@dataclass(kw_only=True)
class MicroBatch:
    """Packed variable-length sequences: `input_ids`, `positions`, `targets` [T] and `cu_seqlens`
    [S + 1]; `loss_inputs` holds whatever the loss function reads (advantages, masks, behavior
    log-probs...), aligned with the tokens. `attention` (an `AttentionContext` such as
    `SharedPrefixAttention`) replaces cu_seqlens in every attention layer when set."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    targets: torch.Tensor
    loss_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    temperature: float = 1.0
    routing: RoutingRecord | None = None
    attention: Any = None

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])


LossFn = Callable[[torch.Tensor, torch.Tensor, MicroBatch], torch.Tensor]
"""(logprobs [T] fp32, entropy [T] fp32, micro_batch) -> this micro-batch's share of the global
loss, already divided by global counts: micro-batch and data-parallel gradients are summed."""

Action = tuple[str, int, int]  # ("F" | "B", model chunk, micro-batch)


def split_layers(num_layers: int, num_stages: int, layers_per_stage: list[int] | None = None) -> list[tuple[int, int]]:
    """Layer ranges of the (virtual) stages: given counts, or even with the remainder on the stages
    after the first (which also holds the embedding)."""
    if layers_per_stage is None:
        if num_stages > num_layers:
            raise ValueError(f"{num_stages} pipeline stages exceed the number of layers ({num_layers})")
        base, rem = divmod(num_layers, num_stages)
        layers_per_stage = [base + (1 if 1 <= i <= rem else 0) for i in range(num_stages)]
    if len(layers_per_stage) != num_stages or sum(layers_per_stage) != num_layers or min(layers_per_stage) < 1:
        raise ValueError(f"layers_per_stage {layers_per_stage} must have {num_stages} positive entries summing to "
                         f"the number of layers ({num_layers})")
    bounds = [0]
    for n in layers_per_stage:
        bounds.append(bounds[-1] + n)
    return list(zip(bounds[:-1], bounds[1:]))


def schedule_1f1b(pp: int, rank: int, num_micro: int) -> list[Action]:
    warmup = min(pp - rank - 1, num_micro)
    acts: list[Action] = [("F", 0, m) for m in range(warmup)]
    for i in range(num_micro - warmup):
        acts += [("F", 0, warmup + i), ("B", 0, i)]
    acts += [("B", 0, m) for m in range(num_micro - warmup, num_micro)]
    return acts


def schedule_interleaved(pp: int, rank: int, num_micro: int, virtual: int) -> list[Action]:
    """Megatron's interleaved 1F1B: micro-batches go through the chunks in groups of pp."""
    if num_micro % pp:
        raise ValueError(f"the interleaved schedule needs the number of micro-batches ({num_micro}) to be a "
                         f"multiple of pp ({pp})")
    total = num_micro * virtual

    def chunk(k: int, forward: bool) -> int:
        c = (k % (pp * virtual)) // pp
        return c if forward else virtual - 1 - c

    def micro(k: int) -> int:
        return (k // (pp * virtual)) * pp + (k % (pp * virtual)) % pp

    warmup = total if num_micro == pp else min((pp - rank - 1) * 2 + (virtual - 1) * pp, total)
    acts: list[Action] = [("F", chunk(k, True), micro(k)) for k in range(warmup)]
    for k in range(total - warmup):
        acts += [("F", chunk(k + warmup, True), micro(k + warmup)), ("B", chunk(k, False), micro(k))]
    acts += [("B", chunk(k, False), micro(k)) for k in range(total - warmup, total)]
    return acts


def make_schedule(pp: int, rank: int, num_micro: int, virtual: int = 1) -> list[Action]:
    return schedule_1f1b(pp, rank, num_micro) if virtual == 1 else schedule_interleaved(pp, rank, num_micro, virtual)


def simulate(schedules: list[list[Action]], pp: int) -> bool:
    """True when the per-rank schedules finish under async sends and blocking receives."""
    done: set[tuple[str, int, int]] = set()  # (kind, virtual stage, micro-batch)
    pos = [0] * pp
    stages = pp * (1 + max(c for s in schedules for _, c, _ in s))
    progress = True
    while progress:
        progress = False
        for r in range(pp):
            while pos[r] < len(schedules[r]):
                kind, c, m = schedules[r][pos[r]]
                s = c * pp + r
                ready = (s == 0 or ("F", s - 1, m) in done) if kind == "F" else \
                    ("F", s, m) in done and (s == stages - 1 or ("B", s + 1, m) in done)
                if not ready:
                    break
                done.add((kind, s, m))
                pos[r] += 1
                progress = True
    return all(p == len(s) for p, s in zip(pos, schedules))


class PipelineRunner:
    """Runs one rank's schedule over its model chunks (one chunk per virtual stage it holds)."""

    def __init__(self, chunks: list, groups: ParallelGroups, *, cp_comm: str = "ring", cp_min_tokens: int = 0) -> None:
        self.chunks = chunks
        self.groups = groups
        self.cp_comm, self.cp_min_tokens = cp_comm, cp_min_tokens
        self.virtual = len(chunks)
        self.num_stages = groups.pp_size * self.virtual

    def _stage(self, chunk: int) -> int:
        return chunk * self.groups.pp_size + self.groups.pp_rank

    def _peer(self, stage: int) -> int:
        return self.groups.pp_ranks[stage % self.groups.pp_size]

    def _tag(self, micro: int, stage: int, kind: int) -> int:
        """Unique per (micro-batch, receiving stage, kind: 0 shape, 1 activation, 2 gradient)."""
        return (micro * self.num_stages + stage) * 3 + kind

    def _send(self, x: torch.Tensor, stage: int, micro: int, *, grad: bool, pending: list) -> None:
        dst = self._peer(stage)
        x = x.detach().contiguous()
        if not grad:  # activations carry their shape first; a gradient has its activation's shape
            shape = torch.tensor(x.shape, dtype=torch.int64)
            pending.append((comm.isend(shape, dst, tag=self._tag(micro, stage, 0)), shape))
        pending.append((comm.isend(x, dst, tag=self._tag(micro, stage, 2 if grad else 1)), x))

    def _recv_activation(self, stage: int, micro: int, dtype: torch.dtype) -> torch.Tensor:
        src = self._peer(stage - 1)
        shape = comm.recv(torch.empty(2, dtype=torch.int64), src, tag=self._tag(micro, stage, 0))
        return comm.recv(torch.empty(shape.tolist(), dtype=dtype), src, tag=self._tag(micro, stage, 1))

    def run(self, micro_batches: list[MicroBatch], loss_fn: LossFn | None, *, forward_only: bool = False,
            last_stage_fn: Callable | None = None):
        """Forward and backward of every micro-batch. Returns, on the last stage, the detached losses
        (with `forward_only`: `last_stage_fn(model, hidden, micro_batch)` of each micro-batch,
        by default its (logprobs, entropy)); elsewhere []."""
        g = self.groups
        M = len(micro_batches)
        if forward_only:
            acts = [("F", c, m) for m in range(M) for c in range(self.virtual)]
        else:
            acts = make_schedule(g.pp_size, g.pp_rank, M, self.virtual)
        saved: dict[tuple[int, int], tuple] = {}
        results: dict[int, object] = {}
        pending: list = []
        shards: dict[int, CPShard] = {}  # cp > 1: this rank's part of each micro-batch
        dtype = self.chunks[0].dtype
        for kind, c, m in acts:
            s = self._stage(c)
            model, mb = self.chunks[c], micro_batches[m]
            if kind == "F":
                x_in = None
                if s > 0:
                    x_in = self._recv_activation(s, m, dtype).requires_grad_(not forward_only)
                shard = self._shard(shards, m, mb, model) if g.cp_size > 1 else None
                with torch.set_grad_enabled(not forward_only), trainer_pass():
                    if shard is None:
                        out = model.hidden_states(mb.input_ids if s == 0 else None, positions=mb.positions,
                                                  cu_seqlens=mb.cu_seqlens, routing=mb.routing, inputs_embeds=x_in,
                                                  attn_context=mb.attention)
                    else:
                        out = model.hidden_states(shard.input_ids if s == 0 else None, positions=shard.positions,
                                                  attn_context=shard.attention, routing=mb.routing,
                                                  inputs_embeds=x_in)
                    if s == self.num_stages - 1:
                        if forward_only:
                            if shard is None:
                                results[m] = (last_stage_fn or _logprobs)(model, out, mb)
                            else:  # computed on this rank's tokens, gathered to the micro-batch's order
                                local = (last_stage_fn or _logprobs)(model, out, shard.local_micro_batch(mb))
                                results[m] = tuple(map(shard.gather, local)) if isinstance(local, tuple) \
                                    else shard.gather(local)
                            continue
                        targets = mb.targets if shard is None else shard.targets
                        lp, ent = model.token_logprobs(out, targets, temperature=mb.temperature)
                        if shard is not None:  # the loss sees the whole micro-batch (context_parallel.py)
                            lp, ent = shard.gather(lp), shard.gather(ent)
                        out = loss_fn(lp, ent, mb)
                        results[m] = out.detach()
                    else:
                        self._send(out, s + 1, m, grad=False, pending=pending)
                if not forward_only:
                    saved[(c, m)] = (x_in, out)
            else:
                x_in, out = saved.pop((c, m))
                if s == self.num_stages - 1:
                    out.backward()
                else:
                    grad = comm.recv(torch.empty_like(out), self._peer(s + 1), tag=self._tag(m, s, 2))
                    torch.autograd.backward(out, grad)
                if s > 0:
                    self._send(x_in.grad, s - 1, m, grad=True, pending=pending)
        for work, _ in pending:
            work.wait()
        return [results[m] for m in range(M)] if results else []

    def _shard(self, shards: dict, m: int, mb: MicroBatch, model) -> CPShard:
        if m not in shards:
            if mb.attention is not None:
                raise ValueError("a micro-batch with its own attention context (shared-prefix training) cannot "
                                 f"run under context parallelism (cp={self.groups.cp_size}); use cp=1")
            model.check_packed(mb.positions, mb.cu_seqlens)
            shards[m] = CPShard(mb.input_ids, mb.positions, mb.cu_seqlens, mb.targets, self.groups,
                                comm_mode=self.cp_comm, min_tokens=self.cp_min_tokens)
        return shards[m]


def _logprobs(model, hidden: torch.Tensor, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    return model.token_logprobs(hidden, mb.targets, temperature=mb.temperature)
