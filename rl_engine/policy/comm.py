"""Collectives of the policy: autograd-aware mappings for tensor, sequence and expert parallelism
(Megatron's "mappings"), and the plain collectives the optimizer and pipeline use.

Each function is the identity when the group is None (world size 1), so the model code is the same
at every size. Every collective of `rl_engine.policy` goes through this module, which counts the
bytes each rank puts on the wire per kind of collective (`COUNTER`, off unless a benchmark turns it
on): the one place to measure communication without patching torch.distributed.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist


class CommCounter:
    """Bytes this rank puts on the wire per collective kind, with ring algorithms (all-reduce of n
    bytes over p ranks: 2(p-1)/p n; all-gather of a local n: (p-1) n; reduce-scatter of n:
    (p-1)/p n; all_to_all and send: the bytes that leave the rank). A process-wide tally by
    design: statistics for benchmarks, not state any computation reads."""

    def __init__(self) -> None:
        self.enabled = False
        self.bytes: dict[str, float] = defaultdict(float)

    def add(self, kind: str, x: torch.Tensor, group=None, factor: str = "one") -> None:
        if not self.enabled:
            return
        n = x.numel() * x.element_size()
        p = 1 if group is None else dist.get_world_size(group)
        scale = {"one": 1.0, "all_reduce": 2 * (p - 1) / p, "all_gather": p - 1.0, "reduce_scatter": (p - 1) / p}
        self.bytes[kind] += n * scale[factor]

    def add_bytes(self, kind: str, nbytes: float) -> None:
        if self.enabled:
            self.bytes[kind] += nbytes

    @contextmanager
    def counting(self):
        self.bytes.clear()
        self.enabled = True
        try:
            yield self.bytes
        finally:
            self.enabled = False


COUNTER = CommCounter()
# torch >= 2.10 renamed the flat-tensor collectives (the old names warn).
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce outside autograd; identity without a group."""
    if group is not None:
        COUNTER.add("all_reduce", x, group, "all_reduce")
        dist.all_reduce(x, op=op, group=group)
    return x


def all_gather_into(out: torch.Tensor, x: torch.Tensor, group, *, kind: str = "all_gather") -> None:
    """out [world * n] <- concatenation of every rank's x [n] (flat)."""
    COUNTER.add(kind, x, group, "all_gather")
    _ALL_GATHER(out, x, group=group)


def reduce_scatter_into(out: torch.Tensor, x: torch.Tensor, group, *, kind: str = "reduce_scatter") -> None:
    """out [n] <- this rank's slice of the sum over ranks of x [world * n]."""
    COUNTER.add(kind, x, group, "reduce_scatter")
    _REDUCE_SCATTER(out, x, group=group)


def isend(x: torch.Tensor, dst: int, *, tag: int, group=None, kind: str = "send"):
    """Asynchronous send to global rank `dst` (within `group` when given: its own tag space)."""
    COUNTER.add(kind, x)
    return dist.isend(x, dst=dst, tag=tag, group=group)


def irecv(x: torch.Tensor, src: int, *, tag: int, group=None):
    """Asynchronous receive from global rank `src` into x."""
    return dist.irecv(x, src=src, tag=tag, group=group)


def recv(x: torch.Tensor, src: int, *, tag: int) -> torch.Tensor:
    dist.recv(x, src=src, tag=tag)
    return x


def broadcast(x: torch.Tensor, src: int, group) -> torch.Tensor:
    if group is not None:
        COUNTER.add("broadcast", x)
        dist.broadcast(x, src=src, group=group)
    return x


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    return all_reduce(x, group)


def _all_gather_dim(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    world = dist.get_world_size(group)
    x = x.contiguous()
    if dim == 0:
        out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        all_gather_into(out, x, group)
        return out
    COUNTER.add("all_gather", x, group, "all_gather")
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _split_dim(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    return x.chunk(world, dim=dim)[rank].contiguous()


def _reduce_scatter_first(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    if x.shape[0] % world:
        raise ValueError(
            f"sequence parallel needs the token count ({x.shape[0]}) divisible by the "
            f"tensor-parallel size ({world}); pad the packed batch to a multiple of {world}"
        )
    out = torch.empty((x.shape[0] // world, *x.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter_into(out, x.contiguous(), group)
    return out


class _CopyToRegion(torch.autograd.Function):
    """Forward identity, backward all-reduce (input of a column-parallel layer)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """Forward all-reduce, backward identity (output of a row-parallel layer)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromRegion(torch.autograd.Function):
    """Forward all-gather on the last dim, backward split (gathering column-parallel outputs)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_dim(x, group, dim=-1)

    @staticmethod
    def backward(ctx, g):
        return _split_dim(g, ctx.group, dim=-1), None


class _GatherSequence(torch.autograd.Function):
    """Sequence parallel: forward all-gather on tokens, backward reduce-scatter."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_dim(x, group, dim=0)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_first(g, ctx.group), None


class _ReduceScatterSequence(torch.autograd.Function):
    """Sequence parallel: forward reduce-scatter on tokens, backward all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_first(x, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather_dim(g, ctx.group, dim=0), None


class _ScatterSequence(torch.autograd.Function):
    """Sequence parallel: forward keep this rank's token slice, backward all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_dim(x, group, dim=0)

    @staticmethod
    def backward(ctx, g):
        return _all_gather_dim(g, ctx.group, dim=0), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if group is None else _CopyToRegion.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if group is None else _ReduceFromRegion.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if group is None else _GatherFromRegion.apply(x, group)


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return x if group is None else _GatherSequence.apply(x, group)


def reduce_scatter_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return x if group is None else _ReduceScatterSequence.apply(x, group)


def scatter_sequence(x: torch.Tensor, group) -> torch.Tensor:
    return x if group is None else _ScatterSequence.apply(x, group)


def all_reduce_no_grad(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce outside autograd (statistics such as max/sum in vocab-parallel softmax)."""
    return all_reduce(x, group, op)


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    row_bytes = x[:1].numel() * x.element_size()
    COUNTER.add_bytes("all_to_all", (sum(in_splits) - in_splits[dist.get_rank(group)]) * row_bytes)
    dist.all_to_all_single(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows of x go to ranks by `in_splits`; backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        return _all_to_all(g, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, *, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Differentiable uneven all_to_all over the first dim (expert-parallel token dispatch)."""
    return x if group is None else _AllToAll.apply(x, out_splits, in_splits, group)


def all_to_all_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """counts [world, n] int64: row r goes to rank r; returns what every rank sent here, [world, n]."""
    if group is None:
        return counts
    return _all_to_all(counts, [1] * counts.shape[0], [1] * counts.shape[0], group)
