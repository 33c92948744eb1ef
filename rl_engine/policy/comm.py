"""Autograd-aware collectives for tensor and sequence parallelism (Megatron's "mappings").

Each function is the identity when the group is None (world size 1), so the model code is the same
at every size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather_dim(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    world = dist.get_world_size(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
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
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
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
    if group is not None:
        dist.all_reduce(x, op=op, group=group)
    return x
