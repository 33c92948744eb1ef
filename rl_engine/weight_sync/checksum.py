"""Bucket checksums: fast enough to run on every byte of every update, on both ends.

A bucket's checksum is a 16-byte blake2b digest over, per segment (one segment per transfer, in plan
order): its byte count, S0 = the sum of its little-endian 64-bit words modulo 2^64, S1 = the sum of its
4 KiB block sums weighted by odd numbers (1, 3, 5, ...), and the trailing bytes. Any single changed
byte changes S0 (a change of d * 256^k with 0 < |d| < 256 is never 0 mod 2^64), and a moved or swapped
block changes S1. Sums are order-free modulo 2^64, so the result does not depend on memory alignment
or on how the reduction is vectorised, only on the bytes.

Main design choice: int64 word sums in torch (one read, 6-10 GB/s on one core here, 2-3x memcpy)
rather than a hash over all the bytes (blake2b 0.6, md5 0.5, zlib.crc32 1.5 GB/s measured on this
machine): this guards against corruption and mix-ups, not against an adversary, who would need write
access to the wire anyway.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Sequence, Union

import numpy as np
import torch

BLOCK_WORDS = 512  # 4 KiB blocks for the position weighting
Segment = Union[torch.Tensor, memoryview, bytes, bytearray]


def segment_bytes(segment: Segment) -> np.ndarray:
    """The raw bytes of a segment as a uint8 numpy array (zero copy)."""
    if isinstance(segment, torch.Tensor):
        if not segment.is_contiguous() or segment.device.type != "cpu":
            raise ValueError("checksum segments must be contiguous CPU tensors")
        return segment.detach().reshape(-1).view(torch.uint8).numpy()
    return np.frombuffer(segment, dtype=np.uint8)


def _sums(raw: np.ndarray) -> tuple[int, int, int, int]:
    n = raw.shape[0]
    n8 = n - n % 8
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        # from_numpy starts a fresh storage at the array's first byte, so the int64 view is always
        # allowed; x86 and arm64 load unaligned words fine.
        words = torch.from_numpy(raw[:n8]).view(torch.int64)
    full = (words.shape[0] // BLOCK_WORDS) * BLOCK_WORDS
    blocks = words[:full].view(-1, BLOCK_WORDS).sum(1)  # int64 sums wrap modulo 2^64
    rest = int(words[full:].sum())
    odd = torch.arange(blocks.shape[0], dtype=torch.int64) * 2 + 1
    s0 = int(blocks.sum()) + rest
    s1 = int((blocks * odd).sum()) + (2 * blocks.shape[0] + 1) * rest
    tail = int.from_bytes(raw[n8:].tobytes(), "little")
    mask = (1 << 64) - 1
    return n, s0 & mask, s1 & mask, tail


def checksum(segments: Sequence[Segment]) -> str:
    """Hex digest of a bucket given as its segments, in order."""
    h = hashlib.blake2b(digest_size=16)
    for seg in segments:
        n, s0, s1, tail = _sums(segment_bytes(seg))
        h.update(n.to_bytes(8, "little") + s0.to_bytes(8, "little") + s1.to_bytes(8, "little")
                 + tail.to_bytes(8, "little"))
    return h.hexdigest()
