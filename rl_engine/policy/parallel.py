"""Process groups travel as one explicit object.

`ParallelGroups` holds the tensor-, context-, pipeline-, expert- and data-parallel groups of one
rank. The parallel layers take it at construction; nothing reads a global. At world size 1 every
group is `None` and every collective collapses to the identity, so a single process runs the same code.

Layout (Megatron's order: tp, cp, ep, dp, pp; tp fastest): `world = tp * cp * dp * pp` and
    rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank)).
Context parallelism shards the tokens of each micro-batch, not the weights: the ranks of a cp group
hold the same parameters and the same micro-batches, so gradients are summed and the optimizer
sharded over the `dp * cp` ranks of one (tp, pp) position (`dp_cp_group`), with
    dp_cp_rank = cp_rank + cp * dp_rank.
Expert parallelism is carved out of those dp * cp ranks, as in Megatron: `ep` divides `dp * cp`, and
    dp_cp_rank = ep_rank + ep * edp_rank,
so the ranks of an ep group hold different experts and different tokens, and the expert weights are
data-parallel over the `edp = dp * cp / ep` ranks holding the same experts. Expert weights are tensor
parallel over the same tp group as the dense layers (Megatron's expert-tp = tp).
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
    cp_size: int = 1
    cp_rank: int = 0
    cp_group: dist.ProcessGroup | None = None
    cp_ranks: tuple[int, ...] = (0,)  # global ranks of this rank's cp group, cp-rank order (the ring)
    pp_size: int = 1
    pp_rank: int = 0
    pp_group: dist.ProcessGroup | None = None
    pp_ranks: tuple[int, ...] = (0,)  # global ranks of this rank's pipeline, stage order (for p2p)
    dp_size: int = 1
    dp_rank: int = 0
    dp_group: dist.ProcessGroup | None = None
    # The dp * cp ranks of this (tp, pp) position: gradient sums and optimizer shards of dense params.
    dp_cp_group: dist.ProcessGroup | None = None
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: dist.ProcessGroup | None = None
    # Data-parallel group of expert parameters (ranks holding the same experts).
    edp_size: int = 1
    edp_rank: int = 0
    edp_group: dist.ProcessGroup | None = None
    # First and last pipeline stage of this pipeline (tied embeddings); None unless pp > 1.
    embedding_group: dist.ProcessGroup | None = None
    world_size: int = 1
    world_rank: int = 0
    world_group: dist.ProcessGroup | None = None
    sequence_parallel: bool = False

    @classmethod
    def single(cls) -> "ParallelGroups":
        return cls()

    @classmethod
    def build(cls, *, tp: int = 1, cp: int = 1, pp: int = 1, ep: int = 1, dp: int | None = None,
              sequence_parallel: bool = False) -> "ParallelGroups":
        """The groups of this rank from the initialised default process group (collective: every
        rank calls it with the same arguments). `dp=None` takes what the world leaves."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        dp = check_layout(tp=tp, cp=cp, pp=pp, ep=ep, dp=dp, world_size=world)
        if world == 1:
            return cls(sequence_parallel=sequence_parallel)
        mine: dict[str, tuple[int, ...]] = {}
        handles: dict[str, dist.ProcessGroup | None] = {}
        # new_group is collective over the world: every rank creates every group, in one order.
        for kind, members in all_group_ranks(tp=tp, cp=cp, pp=pp, ep=ep, dp=dp).items():
            if kind == "dp_cp" and cp == 1:  # the dp group itself
                continue
            for ranks in members:
                pg = dist.new_group(list(ranks)) if len(ranks) > 1 else None
                if rank in ranks:
                    mine[kind], handles[kind] = ranks, pg
        coords = rank_coords(rank, tp=tp, cp=cp, pp=pp, ep=ep, dp=dp)
        if cp == 1:
            handles["dp_cp"] = handles["dp"]
        return cls(
            tp_size=tp, tp_rank=coords["tp"], tp_group=handles["tp"],
            cp_size=cp, cp_rank=coords["cp"], cp_group=handles["cp"], cp_ranks=mine["cp"],
            pp_size=pp, pp_rank=coords["pp"], pp_group=handles["pp"], pp_ranks=mine["pp"],
            dp_size=dp, dp_rank=coords["dp"], dp_group=handles["dp"], dp_cp_group=handles["dp_cp"],
            ep_size=ep, ep_rank=coords["ep"], ep_group=handles["ep"],
            edp_size=dp * cp // ep, edp_rank=coords["edp"], edp_group=handles["edp"],
            embedding_group=handles.get("embedding"),
            world_size=world, world_rank=rank, world_group=dist.group.WORLD,
            sequence_parallel=sequence_parallel,
        )

    def __post_init__(self) -> None:
        if self.sequence_parallel and self.tp_size == 1:
            raise ValueError("sequence_parallel=True needs tensor_parallel_size > 1 (got 1)")
        if self.sequence_parallel and self.cp_size > 1:
            raise ValueError(f"sequence_parallel with cp ({self.cp_size}) > 1 is not supported: a cp rank's "
                             "token count need not be a multiple of tp; turn sequence_parallel off")

    @property
    def dp_cp_size(self) -> int:
        return self.dp_size * self.cp_size

    @property
    def dp_cp_rank(self) -> int:
        return self.cp_rank + self.cp_size * self.dp_rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


SINGLE = ParallelGroups.single()


def check_layout(*, tp: int, pp: int, ep: int, dp: int | None, world_size: int, cp: int = 1) -> int:
    """Validate the sizes against the world; returns dp. Errors name the numbers."""
    for name, v in (("tp", tp), ("cp", cp), ("pp", pp), ("ep", ep), ("dp", dp)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    cp_text = f" x cp ({cp})" if cp > 1 else ""
    if dp is None:
        if world_size % (tp * cp * pp):
            raise ValueError(f"world size ({world_size}) is not divisible by tp ({tp}){cp_text} x pp ({pp}) = "
                             f"{tp * cp * pp}")
        dp = world_size // (tp * cp * pp)
    if tp * cp * pp * dp != world_size:
        raise ValueError(f"tp ({tp}){cp_text} x pp ({pp}) x dp ({dp}) = {tp * cp * pp * dp} is not the world "
                         f"size ({world_size})")
    if (dp * cp) % ep:
        what = f"dp ({dp})" if cp == 1 else f"dp ({dp}) x cp ({cp}) = {dp * cp}"
        raise ValueError(f"ep ({ep}) must divide {what}: expert parallelism is carved out of data "
                         f"{'' if cp == 1 else 'and context '}parallelism (world {world_size} = tp {tp}{cp_text} x "
                         f"pp {pp} x dp {dp})")
    return dp


def check_model_layout(config, *, tp: int = 1, pp: int = 1, ep: int = 1, virtual_stages: int = 1) -> None:
    """Validate a layout against a `ModelConfig`; errors name the numbers and the fix."""
    if config.num_heads % tp:
        raise ValueError(f"num_attention_heads ({config.num_heads}) must be divisible by tp ({tp})")
    kv = config.num_kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        raise ValueError(f"num_key_value_heads ({kv}) must be divisible by tp ({tp}), or divide it "
                         f"(then each KV head is replicated on tp / num_key_value_heads ranks)")
    has_dense_mlp = len(config.moe_layers) < config.num_layers
    if has_dense_mlp and config.intermediate_size % tp:
        raise ValueError(f"intermediate_size ({config.intermediate_size}) must be divisible by tp ({tp})")
    stages = pp * virtual_stages
    if stages > config.num_layers:
        raise ValueError(f"pp ({pp}) x virtual stages ({virtual_stages}) = {stages} exceeds the number of "
                         f"layers ({config.num_layers}): every pipeline stage needs at least one layer")
    if config.is_moe:
        if config.num_experts % ep:
            raise ValueError(f"num_experts ({config.num_experts}) must be divisible by ep ({ep})")
        if config.moe_intermediate_size % tp:
            raise ValueError(f"moe_intermediate_size ({config.moe_intermediate_size}) must be divisible by tp ({tp})")
    elif ep > 1:
        raise ValueError(f"ep ({ep}) > 1 needs a mixture-of-experts model; {config.model_type!r} is dense")


def rank_coords(rank: int, *, tp: int, pp: int, ep: int, dp: int, cp: int = 1) -> dict[str, int]:
    tp_rank = rank % tp
    cp_rank = (rank // tp) % cp
    dp_rank = (rank // (tp * cp)) % dp
    dcp = cp_rank + cp * dp_rank  # position among the dp * cp ranks; ep is carved out of it
    return {"tp": tp_rank, "cp": cp_rank, "dp": dp_rank, "pp": rank // (tp * cp * dp), "ep": dcp % ep,
            "edp": dcp // ep}


def all_group_ranks(*, tp: int, pp: int, ep: int, dp: int, cp: int = 1) -> dict[str, list[tuple[int, ...]]]:
    """Every group of each kind as tuples of global ranks (pure: unit-testable without processes)."""

    def r(t: int, dcp: int, p: int) -> int:  # dcp = cp_rank + cp * dp_rank
        return t + tp * (dcp + cp * dp * p)

    dcp_size = dp * cp
    edp = dcp_size // ep
    out: dict[str, list[tuple[int, ...]]] = {
        "tp": [tuple(r(t, dcp, p) for t in range(tp)) for p in range(pp) for dcp in range(dcp_size)],
        "cp": [tuple(r(t, c + cp * d, p) for c in range(cp)) for p in range(pp) for d in range(dp)
               for t in range(tp)],
        "dp": [tuple(r(t, c + cp * d, p) for d in range(dp)) for p in range(pp) for c in range(cp)
               for t in range(tp)],
        "dp_cp": [tuple(r(t, dcp, p) for dcp in range(dcp_size)) for p in range(pp) for t in range(tp)],
        "pp": [tuple(r(t, dcp, p) for p in range(pp)) for dcp in range(dcp_size) for t in range(tp)],
        "ep": [tuple(r(t, e + ep * e2, p) for e in range(ep)) for p in range(pp) for e2 in range(edp)
               for t in range(tp)],
        "edp": [tuple(r(t, e + ep * e2, p) for e2 in range(edp)) for p in range(pp) for e in range(ep)
                for t in range(tp)],
    }
    if pp > 1:
        out["embedding"] = [(ranks[0], ranks[-1]) for ranks in out["pp"]]
    return out
