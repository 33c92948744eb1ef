"""Sharded training checkpoints: each rank writes its boxes of the global tensors; load reshards.

A parameter shard is described as *boxes*: rectangular blocks of a global tensor, named as in the
Hugging Face checkpoint where one exists (`model.layers.3.self_attn.k_proj.weight`) and by our
stacked layout for experts (`model.layers.3.mlp.experts.gate_proj` [E, I, H]), each with its global
shape and offset. The same boxes describe the parameter (fp32 master value) and its two AdamW
moments. Every box is written once in the world: by one of the data-parallel ranks holding it
(spread round-robin), by the first of the tp ranks holding a replicated tensor, never by the last
stage's copy of a tied embedding. Loading into any layout reads, for each of its own boxes, the
overlapping parts of the saved boxes (so tp, pp, ep and dp may all change).

Layout of a checkpoint directory: `rank{r}.safetensors` (tensors `{key}/{kind}`, kind in param,
exp_avg, exp_avg_sq; plus this rank's RNG state), `rank{r}.json` (global shape and offset of each
tensor), and `metadata.json` (step, layout, model config with the router knobs transformers has no
key for, caller's extra state), written last. The directory is built as `{path}.partial` and renamed
into place, so a checkpoint is there whole or not at all; each file is itself written to a temp name,
fsynced and renamed.

`write_checkpoint` writes, in one process, the checkpoint that a run of any layout would save, from
tensors given by a callback (meta-device model chunks of each rank say which boxes it holds):
`rl-engine convert` uses it to turn a Hugging Face directory or another checkpoint into any layout.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from rl_engine.policy.checkpoint import ROUTER_KNOBS
from rl_engine.policy.config import ModelConfig
from rl_engine.policy.layers import ColumnParallelLinear
from rl_engine.policy.model import CausalLM
from rl_engine.policy.moe import MoEBlock
from rl_engine.policy.optimizer import STATE_KINDS, DistributedOptimizer
from rl_engine.policy.parallel import ParallelGroups, check_layout, check_model_layout, rank_coords
from rl_engine.policy.pipeline import split_layers


@dataclass
class Box:
    key: str
    tensor: torch.Tensor  # the local parameter (or buffer) holding the box
    index: tuple  # slices of `tensor` that form the box
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    replica_primary: bool  # this rank's copy is the one written among tp / tied replicas
    is_expert: bool = False
    is_buffer: bool = False


def model_boxes(model: CausalLM) -> list[Box]:
    """The boxes of one model chunk, in a fixed order."""
    g, cfg = model.groups, model.config
    boxes: list[Box] = []
    tp0 = g.tp_rank == 0

    def whole(key: str, t: torch.Tensor, *, buffer: bool = False) -> None:
        boxes.append(Box(key, t, (), tuple(t.shape), (0,) * t.dim(), tp0, is_buffer=buffer))

    def vocab(key: str, emb, primary: bool) -> None:
        n = emb.vocab_end - emb.vocab_start
        boxes.append(Box(key, emb.weight, (slice(0, n),), (emb.vocab_size, emb.weight.shape[1]),
                         (emb.vocab_start, 0), primary))

    def column(pre: str, lin: ColumnParallelLinear, names: list[str]) -> None:
        for part, name in enumerate(names):
            start, n, rep = sum(lin.local_sizes[:part]), lin.local_sizes[part], lin.replicas[part]
            row0 = g.tp_rank // rep * n
            for kind, t in (("weight", lin.weight), ("bias", lin.bias)):
                if t is not None:
                    boxes.append(Box(f"{pre}{name}.{kind}", t, (slice(start, start + n),),
                                     (lin.output_sizes[part], *t.shape[1:]), (row0, *[0] * (t.dim() - 1)),
                                     g.tp_rank % rep == 0))

    def row(key: str, t: torch.Tensor) -> None:
        cols = t.shape[1]
        boxes.append(Box(key, t, (), (t.shape[0], cols * g.tp_size), (0, g.tp_rank * cols), True))

    def mlp(pre: str, m) -> None:
        column(pre, m.gate_up_proj, ["gate_proj", "up_proj"])
        row(pre + "down_proj.weight", m.down_proj.weight)

    def decoder_layer(layer, pre: str) -> None:
        whole(pre + "input_layernorm.weight", layer.input_layernorm.weight)
        whole(pre + "post_attention_layernorm.weight", layer.post_attention_layernorm.weight)
        attn = layer.self_attn
        if cfg.is_mla:  # replicated down-projections and norms; up-projections split by heads
            for name in ("q_a_proj", "q_a_layernorm", "kv_a_proj_with_mqa", "kv_a_layernorm"):
                if getattr(attn, name) is not None:
                    whole(f"{pre}self_attn.{name}.weight", getattr(attn, name).weight)
            for name in ("q_proj", "q_b_proj", "kv_b_proj"):
                if getattr(attn, name) is not None:
                    column(pre + "self_attn.", getattr(attn, name), [name])
        else:
            column(pre + "self_attn.", attn.qkv_proj, ["q_proj", "k_proj", "v_proj"])
        row(pre + "self_attn.o_proj.weight", attn.o_proj.weight)
        if getattr(attn, "q_norm", None) is not None:
            whole(pre + "self_attn.q_norm.weight", attn.q_norm.weight)
            whole(pre + "self_attn.k_norm.weight", attn.k_norm.weight)
        m = layer.mlp
        if isinstance(m, MoEBlock):
            whole(pre + "mlp.gate.weight", m.gate)
            il, E = m.inter_local, cfg.num_experts
            off = (m.expert_start, g.tp_rank * il, 0)
            for name, rows in (("gate_proj", slice(0, il)), ("up_proj", slice(il, 2 * il))):
                boxes.append(Box(pre + f"mlp.experts.{name}", m.w13, (slice(None), rows),
                                 (E, il * g.tp_size, m.w13.shape[2]), off, True, is_expert=True))
            boxes.append(Box(pre + "mlp.experts.down_proj", m.w2, (), (E, m.w2.shape[1], il * g.tp_size),
                             (m.expert_start, 0, g.tp_rank * il), True, is_expert=True))
            dsv3 = cfg.model_type == "deepseek_v3"
            if m.shared_expert is not None:
                mlp(pre + ("mlp.shared_experts." if dsv3 else "mlp.shared_expert."), m.shared_expert)
            if m.shared_expert_gate is not None:
                whole(pre + "mlp.shared_expert_gate.weight", m.shared_expert_gate)
            if m.expert_bias is not None:
                whole(pre + ("mlp.gate.e_score_correction_bias" if dsv3 else "mlp.expert_bias"), m.expert_bias,
                      buffer=True)
        else:
            mlp(pre + "mlp.", m)

    if model.embed_tokens is not None:
        vocab("model.embed_tokens.weight", model.embed_tokens, primary=model.is_first_stage)
    for layer in model.layers:
        decoder_layer(layer, f"model.layers.{layer.layer_idx}.")
    for mtp in model.mtp_layers:  # DeepSeek's MTP layers, under the index after the last layer
        pre = f"model.layers.{mtp.layer_idx}."
        decoder_layer(mtp.block, pre)
        for name, module in (("enorm", mtp.enorm), ("hnorm", mtp.hnorm), ("eh_proj", mtp.eh_proj),
                             ("shared_head.norm", mtp.post_norm)):
            whole(f"{pre}{name}.weight", module.weight)
    if model.is_last_stage:
        whole("model.norm.weight", model.norm.weight)
        if not cfg.tie_word_embeddings:
            vocab("lm_head.weight", model.lm_head.shard, primary=True)
    return boxes


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _barrier(groups) -> None:
    if groups.world_group is not None:
        dist.barrier(group=groups.world_group)


def owned_boxes(chunks: list[CausalLM]) -> list[Box]:
    """The boxes this rank writes: each box once in the world, by one of the data-parallel ranks
    holding it (round-robin over the box order), by its primary tp / tied-embedding replica."""
    g = chunks[0].groups
    out = []
    for i, box in enumerate(b for c in chunks for b in model_boxes(c)):
        dp_size, dp_rank = (g.edp_size, g.edp_rank) if box.is_expert else (g.dp_cp_size, g.dp_cp_rank)
        if box.replica_primary and i % dp_size == dp_rank:
            out.append(box)
    return out


def box_kinds(box: Box) -> tuple[str, ...]:
    return ("param",) if box.is_buffer else STATE_KINDS


def _write_rank(directory: str, rank: int, tensors: dict[str, torch.Tensor], meta: dict[str, dict]) -> None:
    file = os.path.join(directory, f"rank{rank:05d}.safetensors")
    save_file(tensors, file + ".tmp")
    _fsync(file + ".tmp")
    os.replace(file + ".tmp", file)
    _atomic_json(os.path.join(directory, f"rank{rank:05d}.json"), meta)


def _metadata(config: ModelConfig, g: ParallelGroups, *, virtual_stages: int, step: int, extra: dict | None) -> dict:
    return {
        "step": step, "world_size": g.world_size, "extra": extra or {}, "model_config": config.to_hf_dict(),
        "rl_engine_config": {k: getattr(config, k) for k in ROUTER_KNOBS if getattr(config, k)},
        "layout": {"tp": g.tp_size, "cp": g.cp_size, "pp": g.pp_size, "dp": g.dp_size, "ep": g.ep_size,
                   "virtual_stages": virtual_stages, "sequence_parallel": g.sequence_parallel},
    }


def _commit_dir(tmp: str, path: str, metadata: dict) -> None:
    """metadata.json last, then the directory renamed into place (the previous one kept until then)."""
    _atomic_json(os.path.join(tmp, "metadata.json"), metadata)
    old = path.rstrip("/") + ".old"
    if os.path.exists(path):  # keep the previous checkpoint until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(path: str, chunks: list[CausalLM], optimizer: DistributedOptimizer, *, step: int,
                    extra: dict | None = None) -> None:
    """Collective over the world: write the full training state of every rank."""
    g = chunks[0].groups
    state = optimizer.gather_state()
    tmp = path.rstrip("/") + ".partial"
    if g.world_rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier(g)
    tensors: dict[str, torch.Tensor] = {"rng/torch_cpu": torch.get_rng_state()}
    meta: dict[str, dict] = {}
    for box in owned_boxes(chunks):
        for kind in box_kinds(box):
            source = box.tensor if box.is_buffer else state[kind][id(box.tensor)]
            name = f"{box.key}/{kind}"
            tensors[name] = source[box.index].contiguous().clone()
            meta[name] = {"global_shape": list(box.global_shape), "offset": list(box.offset)}
    _write_rank(tmp, g.world_rank, tensors, meta)
    _barrier(g)
    if g.world_rank == 0:
        _commit_dir(tmp, path, _metadata(chunks[0].config, g, virtual_stages=len(chunks), step=step, extra=extra))
    _barrier(g)


def layout_groups(rank: int, *, tp: int, pp: int, dp: int, ep: int) -> ParallelGroups:
    """Rank `rank`'s view of a layout without process groups (enough to build its model chunks on the
    meta device and list their boxes; no collective can run)."""
    c = rank_coords(rank, tp=tp, pp=pp, ep=ep, dp=dp)
    return ParallelGroups(tp_size=tp, tp_rank=c["tp"], pp_size=pp, pp_rank=c["pp"], dp_size=dp, dp_rank=c["dp"],
                          ep_size=ep, ep_rank=c["ep"], edp_size=dp // ep, edp_rank=c["edp"], world_size=tp * pp * dp,
                          world_rank=rank)


# read(key, kind, offset, shape, global_shape) -> the fp32 block `shape` at `offset` of the global tensor `key`
BoxReader = Callable[[str, str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], torch.Tensor]


def write_checkpoint(path: str, config: ModelConfig, read: BoxReader, *, tp: int = 1, pp: int = 1, dp: int = 1,
                     ep: int = 1, virtual_stages: int = 1, step: int = 0, extra: dict | None = None,
                     rng_state: Callable[[int], torch.Tensor] | None = None) -> None:
    """In this process, the sharded checkpoint a `tp x pp x dp` (`ep`) run of `config` would save, each
    box's blocks (param, exp_avg, exp_avg_sq; param alone for buffers) from `read`. Layers are split
    evenly over the pipeline stages (as ParallelTrainer does without `layers_per_stage`). `rng_state(rank)`
    gives each rank's saved CPU RNG state (default: a generator seeded with 0)."""
    check_layout(tp=tp, pp=pp, ep=ep, dp=dp, world_size=tp * pp * dp)
    check_model_layout(config, tp=tp, pp=pp, ep=ep, virtual_stages=virtual_stages)
    ranges = split_layers(config.num_layers, pp * virtual_stages)
    tmp = path.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    g = None
    for rank in range(tp * pp * dp):
        g = layout_groups(rank, tp=tp, pp=pp, dp=dp, ep=ep)
        chunks = [CausalLM(config, groups=g, device="meta", layer_range=ranges[c * pp + g.pp_rank])
                  for c in range(virtual_stages)]
        rng = rng_state(rank) if rng_state is not None else torch.Generator().manual_seed(0).get_state()
        tensors: dict[str, torch.Tensor] = {"rng/torch_cpu": rng}
        meta: dict[str, dict] = {}
        for box in owned_boxes(chunks):
            shape = tuple(box.tensor[box.index].shape)
            for kind in box_kinds(box):
                name = f"{box.key}/{kind}"
                block = read(box.key, kind, box.offset, shape, box.global_shape)
                if tuple(block.shape) != shape:
                    raise ValueError(f"{name}: got a block of shape {tuple(block.shape)} at offset {box.offset}, "
                                     f"rank {rank} holds {shape} of the global {box.global_shape}")
                tensors[name] = block.to(torch.float32).contiguous()
                meta[name] = {"global_shape": list(box.global_shape), "offset": list(box.offset)}
        _write_rank(tmp, rank, tensors, meta)
    _commit_dir(tmp, path, _metadata(config, g, virtual_stages=virtual_stages, step=step, extra=extra))


class _SavedIndex:
    """Where each saved box lives, read from the rank*.json files."""

    def __init__(self, path: str) -> None:
        if not os.path.isfile(os.path.join(path, "metadata.json")):
            raise FileNotFoundError(f"{path!r} is not a complete sharded checkpoint (no metadata.json)")
        with open(os.path.join(path, "metadata.json")) as f:
            self.metadata = json.load(f)
        self.entries: dict[str, list[tuple[str, list[int], list[int]]]] = {}
        for meta_file in sorted(glob.glob(os.path.join(path, "rank*.json"))):
            file = meta_file[:-5] + ".safetensors"
            with open(meta_file) as f:
                for name, m in json.load(f).items():
                    self.entries.setdefault(name, []).append((file, m["global_shape"], m["offset"]))
        self._handles: dict[str, object] = {}

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def read_into(self, name: str, target: torch.Tensor, offset: tuple[int, ...], global_shape: tuple[int, ...]) -> None:
        """Fill `target` (the box at `offset`) from every saved box overlapping it."""
        if name not in self.entries:
            raise ValueError(f"checkpoint lacks tensor {name!r}")
        filled = 0
        for file, gshape, goff in self.entries[name]:
            if tuple(gshape) != tuple(global_shape):
                raise ValueError(f"{name!r}: checkpoint global shape {tuple(gshape)} != model's {tuple(global_shape)}")
            sl = self._handle(file).get_slice(name)
            sshape = sl.get_shape()
            lo = [max(a, b) for a, b in zip(offset, goff)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(offset, target.shape, goff, sshape)]
            if any(h <= l_ for l_, h in zip(lo, hi)):
                continue
            src = sl[tuple(slice(l_ - b, h - b) for l_, h, b in zip(lo, hi, goff))]
            dst = target[tuple(slice(l_ - a, h - a) for l_, h, a in zip(lo, hi, offset))]
            dst.copy_(src.reshape(dst.shape))
            filled += dst.numel()
        if filled != target.numel():
            raise ValueError(f"{name!r}: the checkpoint covers {filled} of the {target.numel()} elements this rank needs")


def load_checkpoint(path: str, chunks: list[CausalLM], optimizer: DistributedOptimizer | None = None) -> dict:
    """Load into this rank's chunks (and optimizer) whatever the saved layout; returns metadata.json.
    Without an optimizer only the parameters are loaded (e.g. for evaluation or inference)."""
    index = _SavedIndex(path)
    g = chunks[0].groups
    params = [p for c in chunks for p in c.parameters()]
    state = {k: {id(p): torch.zeros(p.shape, dtype=torch.float32) for p in params} for k in STATE_KINDS}
    for box in (b for c in chunks for b in model_boxes(c)):
        if box.is_buffer:
            with torch.no_grad():
                index.read_into(f"{box.key}/param", box.tensor[box.index], box.offset, box.global_shape)
            continue
        for kind in STATE_KINDS if optimizer is not None else ("param",):
            index.read_into(f"{box.key}/{kind}", state[kind][id(box.tensor)][box.index], box.offset, box.global_shape)
    if optimizer is not None:
        optimizer.load_state(state, index.metadata["step"])
    else:
        with torch.no_grad():
            for p in params:
                p.copy_(state["param"][id(p)].to(p.dtype))
    rng_file = os.path.join(path, f"rank{g.world_rank:05d}.safetensors")
    if index.metadata["world_size"] == g.world_size and os.path.isfile(rng_file):
        with safe_open(rng_file, framework="pt") as f:
            torch.set_rng_state(f.get_tensor("rng/torch_cpu"))
    return index.metadata


def checkpoint_reader(path: str) -> BoxReader:
    """A `BoxReader` of a saved checkpoint: each block assembled from the saved boxes overlapping it
    (a tensor it lacks, or saved with another global shape, is a ValueError naming it)."""
    index = _SavedIndex(path)

    def read(key: str, kind: str, offset: tuple[int, ...], shape: tuple[int, ...],
             global_shape: tuple[int, ...]) -> torch.Tensor:
        block = torch.zeros(shape, dtype=torch.float32)
        index.read_into(f"{key}/{kind}", block, offset, global_shape)
        return block

    return read


def read_full_tensors(path: str, kind: str = "param") -> dict[str, torch.Tensor]:
    """Every global tensor of a checkpoint assembled in memory (conversion, tests)."""
    index = _SavedIndex(path)
    out = {}
    for name, entries in index.entries.items():
        key, k = name.rsplit("/", 1)
        if k != kind:
            continue
        full = torch.zeros(entries[0][1], dtype=torch.float32)
        index.read_into(name, full, (0,) * full.dim(), tuple(full.shape))
        out[key] = full
    return out
