"""Layout descriptors: where every piece of every global tensor lives on every rank.

A rank's layout is a list of local tensors (parameters and buffers of its model chunks), each holding
one or more *pieces*: rectangular blocks of a global tensor (named as in the Hugging Face checkpoint,
stacked for experts), with the block's global offset and its offset inside the local tensor. That one
shape says everything a reshard needs: the split dimension (a piece narrower than its global tensor),
fused parts and their interleaving (several pieces in one local tensor, e.g. `[q_r | k_r | v_r]`),
replication (the same piece on several ranks: tp-replicated norms and KV heads, data-parallel copies,
the tied embedding of the last pipeline stage), expert ownership (the offset on the expert dim), the
pipeline stage and the dtype.

Main design choice: the pieces are not written a second time here. They come from
`rl_engine.policy.dist_checkpoint.model_boxes`, the same description the sharded checkpoint uses,
evaluated on a model built on the `meta` device for any (tp, pp, ep) coordinates, so a planner knows
every rank's layout without the rank existing, and a live model is checked against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rl_engine.policy.config import ModelConfig
from rl_engine.policy.dist_checkpoint import model_boxes
from rl_engine.policy.model import CausalLM
from rl_engine.policy.parallel import ParallelGroups, check_model_layout, rank_coords
from rl_engine.policy.pipeline import split_layers

LocalName = str  # "<chunk>.<parameter name>", e.g. "0.layers.3.self_attn.qkv_proj.weight"


@dataclass(frozen=True)
class Piece:
    """One rectangular block of global tensor `key`, stored in local tensor `local`."""

    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]  # where the block starts in the global tensor
    shape: tuple[int, ...]
    local: LocalName
    local_offset: tuple[int, ...]  # where the block starts in the local tensor
    split_over: tuple[str | None, ...]  # per dim: the group it is split over ("tp", "ep") or None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TensorLayout:
    """One local tensor of one rank: its shape, dtype, pipeline stage and the pieces it holds."""

    name: LocalName
    shape: tuple[int, ...]
    dtype: torch.dtype
    stage: int  # pipeline rank (0 for an engine)
    layers: tuple[int, int]  # layer range of the chunk it belongs to
    is_expert: bool
    is_buffer: bool
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class RankLayout:
    rank: int
    coords: tuple[tuple[str, int], ...]  # e.g. (("tp", 1), ("pp", 0), ("dp", 0), ("ep", 0))
    tensors: dict[LocalName, TensorLayout]

    def describe(self) -> list[str]:
        """Human-readable lines, one per piece (for error messages and debugging)."""
        return [f"{t.name} {tuple(t.shape)} {t.dtype}: {p.key}[{p.offset} + {p.shape}] of {p.global_shape} "
                f"split {p.split_over}" for t in self.tensors.values() for p in t.pieces]


def _split_over(key: str, shape: tuple[int, ...], global_shape: tuple[int, ...], is_expert: bool) -> tuple:
    out = []
    for d, (n, g) in enumerate(zip(shape, global_shape)):
        out.append(None if n == g else ("ep" if is_expert and d == 0 else "tp"))
    return tuple(out)


def model_layout(chunks: list[CausalLM], *, rank: int = 0, coords: dict[str, int] | None = None) -> RankLayout:
    """The layout of a rank's model chunks (live or on the meta device)."""
    tensors: dict[LocalName, TensorLayout] = {}
    for c, model in enumerate(chunks):
        names = {id(p): n for n, p in model.named_parameters()}
        names.update({id(b): n for n, b in model.named_buffers()})
        by_local: dict[LocalName, list[Piece]] = {}
        meta: dict[LocalName, tuple] = {}
        for box in model_boxes(model):
            local = f"{c}.{names[id(box.tensor)]}"
            shape = tuple(box.tensor[box.index].shape)
            local_offset = tuple((s.start or 0) if isinstance(s, slice) else 0 for s in box.index)
            local_offset += (0,) * (box.tensor.dim() - len(local_offset))
            by_local.setdefault(local, []).append(Piece(
                key=box.key, global_shape=tuple(box.global_shape), offset=tuple(box.offset), shape=shape,
                local=local, local_offset=local_offset,
                split_over=_split_over(box.key, shape, tuple(box.global_shape), box.is_expert)))
            meta[local] = (tuple(box.tensor.shape), box.tensor.dtype, box.is_expert, box.is_buffer)
        for local, pieces in by_local.items():
            shape, dtype, is_expert, is_buffer = meta[local]
            tensors[local] = TensorLayout(name=local, shape=shape, dtype=dtype, stage=model.groups.pp_rank,
                                          layers=model.layer_range, is_expert=is_expert, is_buffer=is_buffer,
                                          pieces=tuple(pieces))
    return RankLayout(rank=rank, coords=tuple(sorted((coords or {}).items())), tensors=tensors)


@dataclass(frozen=True, kw_only=True)
class TrainLayout:
    """The source: a Megatron-ordered training world (`rank = tp_rank + tp * (dp_rank + dp * pp_rank)`).
    A context-parallel world is the same with dp = dp x cp (`rank = tp_rank + tp * (cp_rank + cp * (dp_rank
    + dp * pp_rank))`): its cp ranks hold whole replicas, so `of` counts them as data-parallel ones."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    virtual_stages: int = 1
    layers_per_stage: tuple[int, ...] | None = None
    dtype: torch.dtype = torch.float32

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @classmethod
    def of(cls, groups: ParallelGroups, *, dtype: torch.dtype, virtual_stages: int = 1,
           layers_per_stage: tuple[int, ...] | None = None) -> "TrainLayout":
        return cls(tp=groups.tp_size, pp=groups.pp_size, dp=groups.dp_cp_size, ep=groups.ep_size, dtype=dtype,
                   virtual_stages=virtual_stages, layers_per_stage=layers_per_stage)

    def rank_layout(self, config: ModelConfig, rank: int) -> RankLayout:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"source rank {rank} is outside the training world of {self.world_size} ranks")
        c = rank_coords(rank, tp=self.tp, pp=self.pp, ep=self.ep, dp=self.dp)
        # Layouts depend on (tp, pp, ep) coordinates only: dp replicas share one (cached) layout.
        layout = _meta_layout(config, self.tp, c["tp"], self.pp, c["pp"], self.ep, c["ep"], self.virtual_stages,
                              self.layers_per_stage, self.dtype)
        return RankLayout(rank=rank, coords=tuple(sorted(c.items())), tensors=layout.tensors)


@dataclass(frozen=True, kw_only=True)
class EngineLayout:
    """The destination: `replicas` engines of `tp * ep` ranks each; rank = replica * tp * ep + ep_rank * tp
    + tp_rank (an engine holds every layer: no pipeline)."""

    tp: int = 1
    ep: int = 1
    replicas: int = 1
    dtype: torch.dtype = torch.float32

    @property
    def world_size(self) -> int:
        return self.tp * self.ep * self.replicas

    def rank_layout(self, config: ModelConfig, rank: int) -> RankLayout:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"destination rank {rank} is outside the {self.world_size} engine ranks")
        tp_rank, ep_rank, replica = rank % self.tp, (rank // self.tp) % self.ep, rank // (self.tp * self.ep)
        layout = _meta_layout(config, self.tp, tp_rank, 1, 0, self.ep, ep_rank, 1, None, self.dtype)
        coords = {"replica": replica, "tp": tp_rank, "ep": ep_rank}
        return RankLayout(rank=rank, coords=tuple(sorted(coords.items())), tensors=layout.tensors)

    def replica_of(self, rank: int) -> int:
        return rank // (self.tp * self.ep)


_CACHE: dict[tuple, RankLayout] = {}


def _meta_layout(config: ModelConfig, tp: int, tp_rank: int, pp: int, pp_rank: int, ep: int, ep_rank: int,
                 virtual_stages: int, layers_per_stage: tuple[int, ...] | None, dtype: torch.dtype) -> RankLayout:
    # ModelConfig is a mutable dataclass (unhashable): its repr is the cache key.
    key = (repr(config), tp, tp_rank, pp, pp_rank, ep, ep_rank, virtual_stages, layers_per_stage, dtype)
    if key not in _CACHE:
        if len(_CACHE) > 1024:
            _CACHE.clear()
        _CACHE[key] = _build_meta_layout(config, tp, tp_rank, pp, pp_rank, ep, ep_rank, virtual_stages,
                                         layers_per_stage, dtype)
    return _CACHE[key]


def _build_meta_layout(config: ModelConfig, tp: int, tp_rank: int, pp: int, pp_rank: int, ep: int, ep_rank: int,
                       virtual_stages: int, layers_per_stage: tuple[int, ...] | None, dtype: torch.dtype) -> RankLayout:
    try:
        check_model_layout(config, tp=tp, pp=pp, ep=ep, virtual_stages=virtual_stages)
    except ValueError as e:
        raise ValueError(f"layout cannot be mapped: {e}") from None
    ranges = split_layers(config.num_layers, pp * virtual_stages, list(layers_per_stage) if layers_per_stage else None)
    groups = ParallelGroups(tp_size=tp, tp_rank=tp_rank, pp_size=pp, pp_rank=pp_rank, ep_size=ep, ep_rank=ep_rank,
                            dp_size=ep, dp_rank=ep_rank)
    chunks = [CausalLM(config, groups=groups, dtype=dtype, device="meta", layer_range=ranges[v * pp + pp_rank])
              for v in range(virtual_stages)]
    return model_layout(chunks)


def local_tensors(chunks: list[CausalLM]) -> dict[LocalName, torch.Tensor]:
    """The live tensors of a rank's chunks under their layout names."""
    out: dict[LocalName, torch.Tensor] = {}
    for c, model in enumerate(chunks):
        for n, t in [*model.named_parameters(), *model.named_buffers()]:
            out[f"{c}.{n}"] = t
    return out


def check_matches(expected: RankLayout, chunks: list[CausalLM], *, side: str) -> dict[LocalName, torch.Tensor]:
    """Check a live model against the layout a plan was made for; returns its tensors by layout name.
    Errors name the first tensor that differs and both descriptions."""
    live = model_layout(chunks)
    tensors = local_tensors(chunks)
    missing = sorted(set(expected.tensors) - set(live.tensors))
    if missing:
        raise ValueError(f"{side} rank {expected.rank}: the model lacks tensor(s) {missing[:5]} that the plan for "
                         f"layout {dict(expected.coords)} expects; was the model built with another layout?")
    extra = sorted(set(live.tensors) - set(expected.tensors))
    if extra:
        raise ValueError(f"{side} rank {expected.rank}: the model has tensor(s) {extra[:5]} the plan for layout "
                         f"{dict(expected.coords)} does not know; was the model built with another layout?")
    for name, want in expected.tensors.items():
        got = live.tensors[name]
        if (got.shape, got.dtype, got.pieces) != (want.shape, want.dtype, want.pieces):
            raise ValueError(f"{side} rank {expected.rank}: tensor {name!r} is {tuple(got.shape)} {got.dtype} but the "
                             f"plan expects {tuple(want.shape)} {want.dtype} (layout {dict(expected.coords)}); pieces "
                             f"{[(p.key, p.offset, p.shape) for p in got.pieces][:3]} vs "
                             f"{[(p.key, p.offset, p.shape) for p in want.pieces][:3]}")
    return tensors
