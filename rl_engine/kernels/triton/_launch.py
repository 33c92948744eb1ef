"""Launch helpers shared by the Triton kernels: block sizes and program counts."""

from __future__ import annotations

import torch
import triton


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def num_warps_for(block_elements: int) -> int:
    """Warps per program for a program touching `block_elements` values (ignored by the interpreter)."""
    return max(1, min(8, block_elements // 256))


def persistent_programs(device: torch.device, work_items: int) -> int:
    """Programs for a persistent loop over `work_items` rows: a few per SM on CUDA, 2 elsewhere."""
    if device.type == "cuda":
        per_device = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        per_device = 2  # the interpreter runs programs one after another; keep few
    return max(1, min(work_items, per_device))


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last_dim] with a unit last stride (a view when possible)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()
