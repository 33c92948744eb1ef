"""Protocol messages and metrics over torch.distributed, inside the trainer group.

Rank 0 receives commands from the coordinator and broadcasts them; in colocated mode the leader of
each data-parallel engine sends its results to rank 0. Messages travel as `protocol.encode` frames
packed into one uint8 tensor (no pickle, unlike `broadcast_object_list`) and are decoded with the same
validation as on a socket. `reduce_metrics_over` combines per-rank loss metrics in a fixed key order.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from rl_engine import protocol as P


def pack_message(msg: P.Message) -> torch.Tensor:
    """[u64 number of frames][u64 length of each frame][frames...] as a uint8 tensor."""
    frames = [bytes(f) for f in P.encode(msg)]
    header = struct.pack(f"<{1 + len(frames)}Q", len(frames), *(len(f) for f in frames))
    return torch.frombuffer(bytearray(header + b"".join(frames)), dtype=torch.uint8)


def unpack_message(data: torch.Tensor) -> P.Message:
    raw = memoryview(data.numpy()).cast("B")
    (count,) = struct.unpack_from("<Q", raw, 0)
    lengths = struct.unpack_from(f"<{count}Q", raw, 8)
    frames, pos = [], 8 * (1 + count)
    for n in lengths:
        frames.append(raw[pos:pos + n])
        pos += n
    return P.decode(frames)


def broadcast_message(msg: P.Message | None, *, src: int = 0, group: dist.ProcessGroup | None = None) -> P.Message:
    """Collective: `src` passes the message, every other rank None; all return it."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        assert msg is not None
        return msg
    is_src = dist.get_rank() == src
    data = pack_message(msg) if is_src else None
    size = torch.tensor([data.numel() if is_src else 0], dtype=torch.int64)
    dist.broadcast(size, src=src, group=group)
    if not is_src:
        data = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(data, src=src, group=group)
    return msg if is_src else unpack_message(data)


def send_messages(msgs: Sequence[P.Message], *, dst: int) -> None:
    dist.send(torch.tensor([len(msgs)], dtype=torch.int64), dst=dst)
    for msg in msgs:
        data = pack_message(msg)
        dist.send(torch.tensor([data.numel()], dtype=torch.int64), dst=dst)
        dist.send(data, dst=dst)


def recv_messages(*, src: int) -> list[P.Message]:
    count = torch.empty(1, dtype=torch.int64)
    dist.recv(count, src=src)
    out = []
    for _ in range(int(count)):
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src=src)
        data = torch.empty(int(size), dtype=torch.uint8)
        dist.recv(data, src=src)
        out.append(unpack_message(data))
    return out


def reduce_metrics_over(local: Mapping[str, float], keys: Sequence[str], *, contributes: bool,
                        group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """Sum (max for `*_max` keys) of `local` over the ranks with `contributes` (e.g. one tp rank of
    each last pipeline stage), collective over `group`; every rank passes the same `keys`."""
    values = torch.tensor([float(local.get(k, 0.0)) if contributes else 0.0 for k in keys], dtype=torch.float64)
    is_max = torch.tensor([k.endswith("_max") for k in keys])
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        sums = values.where(~is_max, torch.zeros_like(values))
        maxes = values.where(is_max, torch.full_like(values, -torch.inf))
        dist.all_reduce(sums, group=group)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
        values = torch.where(is_max, maxes, sums)
    return {k: float(v) for k, v in zip(keys, values)}
