"""Buckets in memory: the sender's segments, the receiver's staged copy, and what each side checks.

A bucket travels as its segments, one per transfer, each a contiguous tensor of the destination dtype
and the transfer's shape. A sender makes them either as views of its own parameters (zero copy when
the block is contiguous and no cast is needed: the ZMQ transport sends those as frames) or packed into
one flat buffer at 64-byte aligned offsets (the torch.distributed transport sends one message per
bucket). A receiver gets the same segments back, checks them against the plan (count, dtype, shape)
and the sender's checksum, and only then copies them into the engine's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from rl_engine.weight_sync.checksum import checksum
from rl_engine.weight_sync.layout import LocalName
from rl_engine.weight_sync.plan import Bucket, Transfer


class WeightSyncError(RuntimeError):
    """An update was refused or failed; the engine keeps serving its previous weights."""


@dataclass
class Probe:
    """A fixed sequence and the trainer's log-probs of its tokens 1..T-1 (under `temperature`)."""

    token_ids: torch.Tensor  # [T] int64
    logprobs: torch.Tensor  # [T - 1] float32
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.token_ids.dim() != 1 or self.logprobs.shape != (self.token_ids.numel() - 1,):
            raise ValueError(f"a probe needs token_ids [T] and logprobs [T - 1], got {tuple(self.token_ids.shape)} "
                             f"and {tuple(self.logprobs.shape)}")


@dataclass
class Update:
    """What a receiver transport hands over: segments and sender checksums of each bucket."""

    version: int
    segments: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    checksums: dict[int, str] = field(default_factory=dict)  # as sent
    received: dict[int, str] = field(default_factory=dict)  # computed on arrival (overlapping the transfer)
    # Buckets whose bytes arrived inside a message with a verified AES-GMAC tag (ZMQ with the run's
    # signer): that keyed check covers every byte, so the unkeyed checksum is not computed for them.
    tagged: set[int] = field(default_factory=set)
    probe: Probe | None = None
    zero_copy: bool = False
    problem: str | None = None  # found by the transport (malformed or missing messages)
    problem_bucket: int | None = None  # the bucket `problem` is about, when it is about one
    # How the verified update goes into the engine, returning an undo: set by transports that stage it in
    # memory the engine can serve from (no copy). None: copy the segments into the engine's tensors.
    install: Callable[[], Callable[[], None]] | None = None


def source_view(t: Transfer, tensors: dict[LocalName, torch.Tensor]) -> torch.Tensor:
    return tensors[t.src_local].detach()[t.src_index()]


def segments_of(bucket: Bucket, tensors: dict[LocalName, torch.Tensor]) -> list[torch.Tensor]:
    """The bucket's segments on the sender: views of the parameters where possible, else copies."""
    out = []
    for t in bucket.transfers:
        v = source_view(t, tensors)
        if v.dtype != t.dst_dtype:
            v = v.to(t.dst_dtype)
        out.append(v.contiguous())
    return out


def pack_into(bucket: Bucket, tensors: dict[LocalName, torch.Tensor], out: torch.Tensor) -> list[torch.Tensor]:
    """Copy (and cast) the bucket's blocks into `out` (uint8, >= bucket.nbytes); returns the segment views."""
    segs = segment_views(bucket, out)
    for t, seg in zip(bucket.transfers, segs):
        seg.copy_(source_view(t, tensors))
    return segs


def segment_views(bucket: Bucket, buf: torch.Tensor) -> list[torch.Tensor]:
    """Views of a packed bucket buffer (uint8) as the transfers' typed blocks."""
    return [buf[o:o + t.nbytes].view(t.dst_dtype).view(t.shape) for t, o in zip(bucket.transfers, bucket.offsets)]


def check_segments(bucket: Bucket, segs: list[torch.Tensor], sent_checksum: str | None,
                   received_checksum: str | None = None) -> str | None:
    """None if the received segments match the plan and the sender's checksum, else the problem.
    `received_checksum`: the segments' checksum if the transport already computed it on arrival."""
    if len(segs) != len(bucket.transfers):
        return f"bucket {bucket.index} has {len(segs)} tensors, the plan has {len(bucket.transfers)}"
    for t, s in zip(bucket.transfers, segs):
        if s.dtype != t.dst_dtype or tuple(s.shape) != t.shape:
            return (f"bucket {bucket.index}: {t.key!r} block arrived as {s.dtype} {tuple(s.shape)}, the plan says "
                    f"{t.dst_dtype} {t.shape}")
    if sent_checksum is not None:
        got = received_checksum or checksum(segs)
        if got != sent_checksum:
            return (f"checksum mismatch in bucket {bucket.index} (source rank {bucket.src_rank} -> destination rank "
                    f"{bucket.dst_rank}, {bucket.nbytes} bytes, first tensor {bucket.transfers[0].key!r}): "
                    f"sent {sent_checksum}, received {got}")
    return None


def apply_segments(bucket: Bucket, segs: list[torch.Tensor], tensors: dict[LocalName, torch.Tensor],
                   backup: list[torch.Tensor] | None = None) -> None:
    """Copy verified segments into the destination tensors (saving the old blocks into `backup`)."""
    with torch.no_grad():
        for t, s in zip(bucket.transfers, segs):
            dst = tensors[t.dst_local][t.dst_index()]
            if backup is not None:
                backup.append(dst.clone())
            dst.copy_(s)


def restore_segments(buckets: list[Bucket], backup: list[torch.Tensor], tensors: dict[LocalName, torch.Tensor]) -> None:
    with torch.no_grad():
        old = iter(backup)
        for b in buckets:
            for t in b.transfers:
                saved = next(old, None)
                if saved is None:
                    return
                tensors[t.dst_local][t.dst_index()].copy_(saved)
