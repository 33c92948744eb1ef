"""Process groups travel as one explicit object.

`ParallelGroups` holds the tensor-, pipeline-, expert- and data-parallel groups of one rank. The
parallel layers take it at construction; nothing reads a global. At world size 1 every group is
`None` and every collective collapses to the identity, so a single process runs the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True, kw_only=True)
class ParallelGroups:
    """One rank's view of the parallel layout. Sizes are 1 and groups None when not parallel."""

    tp_size: int = 1
    tp_rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    pp_size: int = 1
    pp_rank: int = 0
    pp_group: dist.ProcessGroup | None = None
    dp_size: int = 1
    dp_rank: int = 0
    dp_group: dist.ProcessGroup | None = None
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: dist.ProcessGroup | None = None
    # Data-parallel group of expert parameters (ranks holding the same experts).
    edp_size: int = 1
    edp_rank: int = 0
    edp_group: dist.ProcessGroup | None = None
    sequence_parallel: bool = False

    @classmethod
    def single(cls) -> "ParallelGroups":
        return cls()

    def __post_init__(self) -> None:
        if self.sequence_parallel and self.tp_size == 1:
            raise ValueError("sequence_parallel=True needs tensor_parallel_size > 1 (got 1)")


SINGLE = ParallelGroups.single()
