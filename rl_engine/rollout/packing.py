"""Sequence packing: samples -> data-parallel ranks -> micro-batches bounded by a token budget.

Two greedy steps, chosen for being simple, deterministic and provably close to optimal: samples go
to dp ranks by LPT (longest first, each to the least-loaded rank, so rank loads differ by at most
one sample's length), then each rank packs its samples into micro-batches by first-fit decreasing.
Every rank then gets the SAME number of micro-batches (padded with empty ones), because pipeline
schedules and gradient-accumulation loops run in lockstep across ranks. Sequences are never split.

`build_packed_batch` turns one micro-batch into the flat tensors the model and loss take:
input_ids[T], positions[T] (restarting at 0 per sequence), cu_seqlens[n+1] (int32), seq_ids[T],
and any per-token / per-sample values gathered to [T].
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

TokenList = Sequence[int] | torch.Tensor


def concat_values(pieces: Sequence[TokenList], *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`torch.cat([torch.as_tensor(p).reshape(-1) for p in pieces])` for pieces that are Python lists of
    numbers or tensors, `.to(dtype)` when `dtype` is set. Non-empty lists go through one numpy conversion
    for them all, ~6x faster than a torch.as_tensor per list (a step packs ~1k of them): int64 for ints,
    torch's default float dtype for floats (as torch.as_tensor), or straight to `dtype` when it is int64,
    bool or float32 (no type to infer: ~4x faster again for ints; the same values for lists of ints or
    bools, and of floats into float32; a float into an int or bool converts from the Python float itself);
    anything else (an empty list, whose float32 torch.cat would promote the others to, a tensor, ints past
    int64) takes torch's way."""
    lists = bool(pieces) and all(isinstance(p, list) and p for p in pieces)
    if lists and dtype in _NUMPY_DTYPES:
        with np.errstate(over="ignore"):  # a float past float32 becomes inf, as torch's cast
            return torch.from_numpy(np.fromiter(itertools.chain.from_iterable(pieces), dtype=_NUMPY_DTYPES[dtype],
                                                count=sum(map(len, pieces))))
    out = _concat_inferred(pieces, lists=lists)
    return out if dtype is None else out.to(dtype)


_NUMPY_DTYPES = {torch.int64: np.int64, torch.bool: np.bool_, torch.float32: np.float32}


def _concat_inferred(pieces: Sequence[TokenList], *, lists: bool) -> torch.Tensor:
    if lists:
        values = np.asarray(list(itertools.chain.from_iterable(pieces)))
        if values.dtype.kind == "f":
            return torch.from_numpy(values).to(torch.get_default_dtype())
        if values.dtype.kind in "ib":  # (ints past int64 make an object array: the general path below)
            return torch.from_numpy(values.astype(np.int64, copy=False) if values.dtype.kind == "i" else values)
    return torch.cat([torch.as_tensor(p).reshape(-1) for p in pieces])


@dataclass(frozen=True, kw_only=True)
class PackPlan:
    """micro_batches[rank][i] lists the sample indices of rank's i-th micro-batch (may be empty)."""

    micro_batches: list[list[list[int]]]
    max_tokens_per_micro_batch: int

    @property
    def num_micro_batches(self) -> int:
        return len(self.micro_batches[0])

    def tokens_per_rank(self, seq_lengths: Sequence[int]) -> list[int]:
        return [sum(seq_lengths[i] for mb in rank for i in mb) for rank in self.micro_batches]


def plan_micro_batches(
    seq_lengths: Sequence[int], *, max_tokens_per_micro_batch: int, dp_size: int = 1
) -> PackPlan:
    """Assign samples (by their total token length) to dp ranks and micro-batches."""
    if max_tokens_per_micro_batch <= 0:
        raise ValueError(f"max_tokens_per_micro_batch ({max_tokens_per_micro_batch}) must be > 0")
    if dp_size <= 0:
        raise ValueError(f"dp_size ({dp_size}) must be > 0")
    for index, length in enumerate(seq_lengths):
        if length <= 0:
            raise ValueError(f"sample {index} has length {length}; every sample needs at least one token")
        if length > max_tokens_per_micro_batch:
            raise ValueError(
                f"sample {index} has {length} tokens, more than max_tokens_per_micro_batch "
                f"({max_tokens_per_micro_batch}); raise the budget to at least {length} or cap the "
                "prompt + response length"
            )
    # Longest first; ties by index so the plan is deterministic.
    order = sorted(range(len(seq_lengths)), key=lambda i: (-seq_lengths[i], i))
    per_rank = _assign_ranks_lpt(order, seq_lengths, dp_size)
    micro_batches = [
        _first_fit_decreasing(samples, seq_lengths, max_tokens_per_micro_batch) for samples in per_rank
    ]
    num = max(1, max(len(mbs) for mbs in micro_batches))
    for mbs in micro_batches:
        mbs.extend([] for _ in range(num - len(mbs)))
    return PackPlan(micro_batches=micro_batches, max_tokens_per_micro_batch=max_tokens_per_micro_batch)


def _assign_ranks_lpt(order: list[int], seq_lengths: Sequence[int], dp_size: int) -> list[list[int]]:
    """Longest-processing-time greedy: each sample (longest first) to the least-loaded rank."""
    heap = [(0, rank) for rank in range(dp_size)]  # (tokens, rank): ties go to the lower rank
    per_rank: list[list[int]] = [[] for _ in range(dp_size)]
    for index in order:
        load, rank = heapq.heappop(heap)
        per_rank[rank].append(index)
        heapq.heappush(heap, (load + seq_lengths[index], rank))
    return per_rank


def _first_fit_decreasing(samples: list[int], seq_lengths: Sequence[int], budget: int) -> list[list[int]]:
    """`samples` arrive longest first; each goes into the first micro-batch with room for it."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for index in samples:
        length = seq_lengths[index]
        for b, load in enumerate(loads):
            if load + length <= budget:
                bins[b].append(index)
                loads[b] += length
                break
        else:
            bins.append([index])
            loads.append(length)
    return [sorted(b) for b in bins]


@dataclass(kw_only=True)
class PackedBatch:
    """One micro-batch as flat tensors over its T tokens (n sequences)."""

    sample_indices: list[int]
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, 0..len-1 within each sequence
    cu_seqlens: torch.Tensor  # [n+1] int32
    seq_ids: torch.Tensor  # [T] int64, local sequence index 0..n-1
    max_seqlen: int
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [T]

    @property
    def num_seqs(self) -> int:
        return len(self.sample_indices)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def build_packed_batch(
    sample_indices: Sequence[int],
    *,
    token_ids: Sequence[TokenList],
    per_token: Mapping[str, Sequence[TokenList]] | None = None,
    per_sample: Mapping[str, Sequence[float] | torch.Tensor] | None = None,
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> PackedBatch:
    """Flatten the samples `sample_indices` of the full batch.

    token_ids[i] is sample i's full token list (prompt + response). per_token[name][i] must have
    the same length (e.g. loss_mask, behavior_logprobs, policy_versions); per_sample[name][i] is
    one value broadcast to all of sample i's tokens (e.g. advantages). `dtypes[name]`: per_token[name]'s
    values in that dtype (`concat_values`)."""
    indices = list(sample_indices)
    seqs = [torch.as_tensor(token_ids[i], dtype=torch.int64).reshape(-1) for i in indices]
    lengths = torch.tensor([s.numel() for s in seqs], dtype=torch.int64)
    cu_seqlens = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    seq_ids = torch.repeat_interleave(torch.arange(len(seqs)), lengths)
    starts = (cu_seqlens[:-1].long())[seq_ids]  # [T] start offset of each token's sequence
    positions = torch.arange(int(lengths.sum())) - starts
    values: dict[str, torch.Tensor] = {}
    for name, per_sample_lists in (per_token or {}).items():
        parts = [per_sample_lists[i] for i in indices]
        for local, (i, part) in enumerate(zip(indices, parts)):
            n = len(part) if isinstance(part, list) else torch.as_tensor(part).numel()
            if n != seqs[local].numel():
                raise ValueError(f"per_token[{name!r}] of sample {i} has {n} values but the sample has "
                                 f"{seqs[local].numel()} tokens")
        values[name] = concat_values(parts, dtype=(dtypes or {}).get(name)) if parts else torch.empty(0)
    for name, sample_values in (per_sample or {}).items():
        chosen = torch.as_tensor(sample_values)[torch.tensor(indices, dtype=torch.int64)]
        values[name] = torch.repeat_interleave(chosen, lengths)
    return PackedBatch(
        sample_indices=indices,
        input_ids=torch.cat(seqs) if seqs else torch.empty(0, dtype=torch.int64),
        positions=positions,
        cu_seqlens=cu_seqlens,
        seq_ids=seq_ids,
        max_seqlen=int(lengths.max()) if len(seqs) else 0,
        values=values,
    )
