"""The reshard planner: which slice of which source shard goes to which destination shard, in buckets.

`plan_sync(config, src=TrainLayout(...), dst=EngineLayout(...), bucket_bytes=...)` intersects every
destination piece with the source pieces of the same global tensor. Each overlap becomes a `Transfer`
(a rectangular block: source rank, local tensor and offset -> destination rank, local tensor and
offset). When several source ranks hold the same block (tp-replicated norms and KV heads, data-parallel
replicas, the tied embedding of the last stage) the least-loaded one sends it, unless the destination
is colocated with one of them. Transfers between one (source, destination) pair are packed, in order,
into buckets of at most `bucket_bytes` (a larger block is split along its first dimension).

Main design choice: the plan is a pure function of (model config, layouts, bucket size), computed
identically by every process; peers exchange only bucket indices, checksums and bytes, and compare a
plan fingerprint before moving anything. Nothing is gathered: a source rank sends its own shards and a
destination rank receives only its own, so no rank holds more than its shard (plus one bucket) unless
the destination is one unsharded engine.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Mapping

import torch

from rl_engine.policy.config import ModelConfig
from rl_engine.weight_sync.layout import EngineLayout, LocalName, Piece, RankLayout, TrainLayout

ALIGN = 64  # segment offsets in a packed bucket: aligned for int64 checksums and vector copies


@dataclass(frozen=True)
class Transfer:
    """A block of global tensor `key`: src local tensor [src_offset + shape] -> dst [dst_offset + shape]."""

    key: str
    src_rank: int
    src_local: LocalName
    src_offset: tuple[int, ...]
    dst_rank: int
    dst_local: LocalName
    dst_offset: tuple[int, ...]
    shape: tuple[int, ...]
    src_dtype: torch.dtype
    dst_dtype: torch.dtype  # the wire dtype: the source casts when they differ

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dst_dtype.itemsize

    def src_index(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.src_offset, self.shape))

    def dst_index(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + n) for o, n in zip(self.dst_offset, self.shape))


@dataclass(frozen=True)
class Bucket:
    index: int
    src_rank: int
    dst_rank: int
    transfers: tuple[Transfer, ...]
    offsets: tuple[int, ...]  # byte offset of each transfer's segment in the packed bucket
    nbytes: int  # packed size, alignment padding included


@dataclass
class SyncPlan:
    config: ModelConfig
    src: TrainLayout
    dst: EngineLayout
    bucket_bytes: int
    buckets: list[Bucket]
    src_layouts: dict[int, RankLayout] = field(repr=False)
    dst_layouts: dict[int, RankLayout] = field(repr=False)
    fingerprint: int = 0

    def buckets_from(self, src_rank: int) -> list[Bucket]:
        return [b for b in self.buckets if b.src_rank == src_rank]

    def buckets_to(self, dst_rank: int) -> list[Bucket]:
        return [b for b in self.buckets if b.dst_rank == dst_rank]

    def bytes_sent(self, src_rank: int) -> int:
        return sum(t.nbytes for b in self.buckets_from(src_rank) for t in b.transfers)

    def bytes_received(self, dst_rank: int) -> int:
        return sum(t.nbytes for b in self.buckets_to(dst_rank) for t in b.transfers)

    def model_bytes(self) -> int:
        """Bytes of one whole model in the destination dtype (what one engine replica receives)."""
        seen: dict[str, tuple] = {}
        for layout in self.dst_layouts.values():
            for t in layout.tensors.values():
                for p in t.pieces:
                    seen[p.key] = (p.global_shape, t.dtype)
        return sum(math.prod(s) * d.itemsize for s, d in seen.values())

    def summary(self) -> dict:
        return {"buckets": len(self.buckets), "bucket_bytes": self.bucket_bytes, "model_bytes": self.model_bytes(),
                "max_sent_per_src_rank": max((self.bytes_sent(r) for r in range(self.src.world_size)), default=0),
                "max_received_per_dst_rank": max((self.bytes_received(r) for r in range(self.dst.world_size)),
                                                 default=0)}


def plan_message_bytes(plan: SyncPlan, *, dst_rank: int) -> int:
    """The largest frame a legitimate source sends destination `dst_rank` (one transfer's segment, or
    a probe or control frame), with 1 MiB to spare: the receiver's socket refuses larger ones."""
    largest = max((t.nbytes for b in plan.buckets_to(dst_rank) for t in b.transfers), default=0)
    return max(largest, 1 << 20) + (1 << 20)


def plan_sync(config: ModelConfig, *, src: TrainLayout, dst: EngineLayout, bucket_bytes: int = 32 << 20,
              colocated: Mapping[int, int] | None = None) -> SyncPlan:
    """Plan a sync from every source rank to every destination rank. `colocated` maps a destination rank
    to the source rank in the same process, which then sends it everything it holds."""
    if not isinstance(bucket_bytes, int) or bucket_bytes < ALIGN:
        raise ValueError(f"bucket_bytes must be an integer >= {ALIGN}, got {bucket_bytes!r}")
    colocated = dict(colocated or {})
    src_layouts = {r: src.rank_layout(config, r) for r in range(src.world_size)}
    dst_layouts = {r: dst.rank_layout(config, r) for r in range(dst.world_size)}
    regions = _source_regions(src_layouts)
    load = [0] * src.world_size
    transfers: list[Transfer] = []
    for d, layout in dst_layouts.items():
        for tensor in layout.tensors.values():
            for piece in tensor.pieces:
                transfers += _fill(piece, d, tensor.dtype, regions, load, colocated.get(d))
    buckets = _bucketize(transfers, bucket_bytes)
    plan = SyncPlan(config=config, src=src, dst=dst, bucket_bytes=bucket_bytes, buckets=buckets,
                    src_layouts=src_layouts, dst_layouts=dst_layouts)
    digest = hashlib.blake2b(repr((config, src, dst, bucket_bytes, sorted(colocated.items()),
                                   [(b.src_rank, b.dst_rank, b.nbytes, len(b.transfers)) for b in buckets])).encode(),
                             digest_size=7).digest()
    plan.fingerprint = int.from_bytes(digest, "little")
    return plan


# (key) -> list of (offset, shape, holders [(rank, piece, dtype)])
_Regions = dict[str, list[tuple[tuple[int, ...], tuple[int, ...], list[tuple[int, Piece, torch.dtype]]]]]


def _source_regions(src_layouts: dict[int, RankLayout]) -> _Regions:
    regions: _Regions = {}
    for r, layout in src_layouts.items():
        for tensor in layout.tensors.values():
            for p in tensor.pieces:
                entries = regions.setdefault(p.key, [])
                for off, shape, holders in entries:
                    if (off, shape) == (p.offset, p.shape):
                        holders.append((r, p, tensor.dtype))
                        break
                    if _overlap(off, shape, p.offset, p.shape) is not None:
                        raise ValueError(f"source layout is inconsistent: {p.key!r} block {p.offset}+{p.shape} on rank "
                                         f"{r} partly overlaps block {off}+{shape} of another rank")
                else:
                    entries.append((p.offset, p.shape, [(r, p, tensor.dtype)]))
    return regions


def _overlap(a_off, a_shape, b_off, b_shape) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    lo = tuple(max(a, b) for a, b in zip(a_off, b_off))
    hi = tuple(min(a + n, b + m) for a, n, b, m in zip(a_off, a_shape, b_off, b_shape))
    if any(h <= l_ for l_, h in zip(lo, hi)):
        return None
    return lo, tuple(h - l_ for l_, h in zip(lo, hi))


def _fill(piece: Piece, dst_rank: int, dst_dtype: torch.dtype, regions: _Regions, load: list[int],
          colocated_src: int | None) -> list[Transfer]:
    if piece.key not in regions:
        raise ValueError(f"layout cannot be mapped: destination rank {dst_rank} needs {piece.key!r}, which no source "
                         "rank holds (different model configs on the two sides?)")
    out, covered = [], 0
    for off, shape, holders in regions[piece.key]:
        if holders[0][1].global_shape != piece.global_shape:
            raise ValueError(f"layout cannot be mapped: {piece.key!r} is {holders[0][1].global_shape} on the source "
                             f"side but {piece.global_shape} on the destination side")
        ov = _overlap(off, shape, piece.offset, piece.shape)
        if ov is None:
            continue
        lo, size = ov
        mine = [h for h in holders if h[0] == colocated_src]
        r, src_piece, src_dtype = mine[0] if mine else min(holders, key=lambda h: (load[h[0]], h[0]))
        t = Transfer(key=piece.key, src_rank=r, src_local=src_piece.local,
                     src_offset=tuple(lo_ - o + lo2 for lo_, o, lo2 in zip(lo, off, src_piece.local_offset)),
                     dst_rank=dst_rank, dst_local=piece.local,
                     dst_offset=tuple(lo_ - o + lo2 for lo_, o, lo2 in zip(lo, piece.offset, piece.local_offset)),
                     shape=size, src_dtype=src_dtype, dst_dtype=dst_dtype)
        load[r] += t.nbytes
        covered += math.prod(size)
        out.append(t)
    if covered != piece.numel:
        raise ValueError(f"layout cannot be mapped: the source ranks hold {covered} of the {piece.numel} elements of "
                         f"{piece.key!r} block {piece.offset}+{piece.shape} that destination rank {dst_rank} needs")
    return out


def _split_rows(t: Transfer, bucket_bytes: int) -> list[Transfer]:
    if t.nbytes <= bucket_bytes or t.shape[0] == 1:
        return [t]
    row = t.nbytes // t.shape[0]
    rows = max(1, bucket_bytes // row)
    out = []
    for r0 in range(0, t.shape[0], rows):
        n = min(rows, t.shape[0] - r0)
        out.append(Transfer(key=t.key, src_rank=t.src_rank, src_local=t.src_local,
                            src_offset=(t.src_offset[0] + r0, *t.src_offset[1:]), dst_rank=t.dst_rank,
                            dst_local=t.dst_local, dst_offset=(t.dst_offset[0] + r0, *t.dst_offset[1:]),
                            shape=(n, *t.shape[1:]), src_dtype=t.src_dtype, dst_dtype=t.dst_dtype))
    return out


def _bucketize(transfers: list[Transfer], bucket_bytes: int) -> list[Bucket]:
    pairs: dict[tuple[int, int], list[Transfer]] = {}
    for t in transfers:
        pairs.setdefault((t.src_rank, t.dst_rank), []).extend(_split_rows(t, bucket_bytes))
    buckets: list[Bucket] = []
    for (s, d) in sorted(pairs):
        current: list[Transfer] = []
        offsets: list[int] = []
        size = 0
        for t in pairs[(s, d)]:
            start = -(-size // ALIGN) * ALIGN
            if current and start + t.nbytes > bucket_bytes:
                buckets.append(Bucket(len(buckets), s, d, tuple(current), tuple(offsets), size))
                current, offsets, start = [], [], 0
            current.append(t)
            offsets.append(start)
            size = start + t.nbytes
        if current:
            buckets.append(Bucket(len(buckets), s, d, tuple(current), tuple(offsets), size))
    return buckets
