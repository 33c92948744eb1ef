"""Hugging Face checkpoints: import a model directory into `CausalLM`, export one transformers loads.

One table, built from the model itself, maps every Hugging Face tensor name to a loader (which takes
the full tensor and keeps this rank's slice) and an exporter. Fused projections (our qkv and gate/up)
load from split tensors; split experts load into our stacked expert tensors, and the fused expert
layout (`experts.gate_up_proj` / `experts.down_proj`) loads too. Every tensor the model needs must
be found with the right shape, and every tensor in the checkpoint must be used: mismatches are
errors that name the tensor.

Aux-loss-free MoE balancing (DeepSeek-V3 style: the `expert_bias` buffers and `router_bias_update_rate`)
has no place in the transformers configs and models we export (qwen2_moe, qwen3_moe, mixtral), so
`save_pretrained` writes it to a side file, `rl_engine_extras.safetensors` (the buffers, plus our
training-only router knobs in its metadata); transformers ignores the file, and `from_pretrained` /
`load_hf_weights` read it back.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rl_engine.config import InputError, parse_json
from rl_engine.policy.config import ModelConfig
from rl_engine.policy.layers import ColumnParallelLinear, _copy_checked
from rl_engine.policy.model import CausalLM
from rl_engine.policy.parallel import SINGLE, ParallelGroups

# Tensors some checkpoints carry that hold nothing we need (recomputed buffers).
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
MTP_SHARED = re.compile(r"model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight$")
EXTRAS_FILE = "rl_engine_extras.safetensors"
ROUTER_KNOBS = ("router_bias_update_rate", "router_z_loss_coef")  # ModelConfig fields transformers has no key for


@dataclass
class WeightEntry:
    load: Callable[[torch.Tensor], None]
    export: Callable[[], torch.Tensor]


def _col_part(layer: ColumnParallelLinear, part: int, kind: str, name: str) -> WeightEntry:
    def load(t: torch.Tensor) -> None:
        if kind == "weight":
            layer.load_part(part, weight=t, name=name)
        else:
            start = sum(layer.local_sizes[:part])
            _copy_checked(layer.bias[start:start + layer.local_sizes[part]], layer.shard_of(t, part), name)

    def export() -> torch.Tensor:
        return layer.full_part(part, layer.weight if kind == "weight" else layer.bias).detach()

    return WeightEntry(load, export)


def _param(p: torch.nn.Parameter, name: str) -> WeightEntry:
    return WeightEntry(lambda t: _copy_checked(p, t, name), lambda: p.detach())


def _expert_slice(p: torch.nn.Parameter, e: int, rows: slice | None, cols: slice | None, name: str,
                  shard: Callable[[torch.Tensor], torch.Tensor]) -> WeightEntry:
    def view() -> torch.Tensor:
        v = p[e]
        if rows is not None:
            v = v[rows]
        if cols is not None:
            v = v[:, cols]
        return v

    return WeightEntry(lambda t: _copy_checked(view(), shard(t), name), lambda: view().detach())


def weight_table(model: CausalLM) -> dict[str, WeightEntry]:
    """Hugging Face tensor name -> how to load and export it, for the layers this rank holds."""
    cfg = model.config
    g = model.groups
    table: dict[str, WeightEntry] = {}
    if model.is_first_stage:
        emb = model.embed_tokens
        table["model.embed_tokens.weight"] = WeightEntry(
            lambda t: emb.load_full(t, "model.embed_tokens.weight"), lambda: emb.local_real_rows().detach())
    for layer in model.layers:
        table.update(_layer_entries(layer, f"model.layers.{layer.layer_idx}.", cfg, g))
    for mtp in model.mtp_layers:
        table.update(_mtp_entries(model, mtp, f"model.layers.{mtp.layer_idx}.", cfg, g))
    if model.is_last_stage:
        table["model.norm.weight"] = _param(model.norm.weight, "model.norm.weight")
        if not cfg.tie_word_embeddings:
            head = model.lm_head.shard
            table["lm_head.weight"] = WeightEntry(lambda t: head.load_full(t, "lm_head.weight"),
                                                  lambda: head.local_real_rows().detach())
        elif not model.is_first_stage:
            # Last stage of a pipeline with tied embeddings: its copy loads from the embedding.
            emb = model.embed_tokens
            table["model.embed_tokens.weight"] = WeightEntry(
                lambda t: emb.load_full(t, "model.embed_tokens.weight"), lambda: emb.local_real_rows().detach())
    return table


def _mlp_entries(mlp, pre: str) -> dict[str, WeightEntry]:
    return {
        pre + "gate_proj.weight": _col_part(mlp.gate_up_proj, 0, "weight", pre + "gate_proj.weight"),
        pre + "up_proj.weight": _col_part(mlp.gate_up_proj, 1, "weight", pre + "up_proj.weight"),
        pre + "down_proj.weight": WeightEntry(lambda t: mlp.down_proj.load_full(t, pre + "down_proj.weight"),
                                              lambda: mlp.down_proj.weight.detach()),
    }


def _layer_entries(layer, pre: str, cfg: ModelConfig, g: ParallelGroups) -> dict[str, WeightEntry]:
    """One decoder layer's tensors under `pre` (a main layer's, or an MTP layer's block)."""
    table: dict[str, WeightEntry] = {}
    attn = layer.self_attn
    table[pre + "input_layernorm.weight"] = _param(layer.input_layernorm.weight, pre + "input_layernorm.weight")
    table[pre + "post_attention_layernorm.weight"] = _param(layer.post_attention_layernorm.weight,
                                                             pre + "post_attention_layernorm.weight")
    if cfg.is_mla:
        table.update(_mla_entries(attn, pre + "self_attn."))
    else:
        for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            n = pre + f"self_attn.{proj}."
            table[n + "weight"] = _col_part(attn.qkv_proj, part, "weight", n + "weight")
            if cfg.qkv_bias:
                table[n + "bias"] = _col_part(attn.qkv_proj, part, "bias", n + "bias")
    table[pre + "self_attn.o_proj.weight"] = WeightEntry(
        lambda t, a=attn, n=pre + "self_attn.o_proj.weight": a.o_proj.load_full(t, n), lambda a=attn: a.o_proj.weight.detach())
    if getattr(attn, "q_norm", None) is not None:
        table[pre + "self_attn.q_norm.weight"] = _param(attn.q_norm.weight, pre + "self_attn.q_norm.weight")
        table[pre + "self_attn.k_norm.weight"] = _param(attn.k_norm.weight, pre + "self_attn.k_norm.weight")
    if layer.is_moe:
        table.update(_moe_entries(layer.mlp, pre, cfg, g))
    else:
        table.update(_mlp_entries(layer.mlp, pre + "mlp."))
    return table


def _mtp_entries(model: CausalLM, mtp, pre: str, cfg: ModelConfig, g: ParallelGroups) -> dict[str, WeightEntry]:
    """A DeepSeek MTP layer: its norms, eh_proj, shared_head.norm and decoder block. The checkpoint's
    copies of the embedding and LM head under the same prefix are not loaded (the model's own are
    used, as transformers' MtpModel does: `MTP_SHARED`); `save_pretrained` writes them as copies
    (DeepSeek's layout, which other loaders expect)."""
    table = _layer_entries(mtp.block, pre, cfg, g)
    for name, module in (("enorm", mtp.enorm), ("hnorm", mtp.hnorm), ("eh_proj", mtp.eh_proj),
                         ("shared_head.norm", mtp.post_norm)):
        table[f"{pre}{name}.weight"] = _param(module.weight, f"{pre}{name}.weight")
    return table


def _mla_entries(attn, pre: str) -> dict[str, WeightEntry]:
    """Multi-head latent attention: replicated down-projections and norms, column-parallel up-projections."""
    table = {}
    for name in ("q_a_proj", "kv_a_proj_with_mqa"):
        module = getattr(attn, name)
        if module is not None:
            table[f"{pre}{name}.weight"] = _param(module.weight, f"{pre}{name}.weight")
    for name in ("q_a_layernorm", "kv_a_layernorm"):
        module = getattr(attn, name)
        if module is not None:
            table[f"{pre}{name}.weight"] = _param(module.weight, f"{pre}{name}.weight")
    for name in ("q_proj", "q_b_proj", "kv_b_proj"):
        module = getattr(attn, name)
        if module is not None:
            table[f"{pre}{name}.weight"] = _col_part(module, 0, "weight", f"{pre}{name}.weight")
    return table


def _moe_entries(moe, pre: str, cfg: ModelConfig, g: ParallelGroups) -> dict[str, WeightEntry]:
    mixtral = cfg.model_type == "mixtral"
    block = pre + ("block_sparse_moe." if mixtral else "mlp.")
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    il = moe.inter_local
    rows_of = lambda t: t.chunk(g.tp_size, dim=0)[g.tp_rank]  # noqa: E731  (intermediate rows)
    cols_of = lambda t: t.chunk(g.tp_size, dim=1)[g.tp_rank]  # noqa: E731
    table = {block + "gate.weight": _param(moe.gate, block + "gate.weight")}
    # Expert parallelism: this rank holds experts [expert_start, expert_start + num_local_experts).
    for local in range(moe.num_local_experts):
        e = moe.expert_start + local
        ep = f"{block}experts.{e}."
        table[ep + f"{names[0]}.weight"] = _expert_slice(moe.w13, local, slice(0, il), None, ep + f"{names[0]}.weight", rows_of)
        table[ep + f"{names[1]}.weight"] = _expert_slice(moe.w13, local, slice(il, 2 * il), None, ep + f"{names[1]}.weight", rows_of)
        table[ep + f"{names[2]}.weight"] = _expert_slice(moe.w2, local, None, None, ep + f"{names[2]}.weight", cols_of)
    if cfg.model_type == "deepseek_v3":
        table[block + "gate.e_score_correction_bias"] = _param(moe.expert_bias, block + "gate.e_score_correction_bias")
        if moe.shared_expert is not None:
            table.update(_mlp_entries(moe.shared_expert, block + "shared_experts."))
    elif moe.shared_expert is not None:
        table.update(_mlp_entries(moe.shared_expert, block + "shared_expert."))
        table[block + "shared_expert_gate.weight"] = _param(moe.shared_expert_gate, block + "shared_expert_gate.weight")
    return table


def _fused_expert_loaders(table: dict[str, WeightEntry], name: str, tensor: torch.Tensor) -> bool:
    """The fused expert layout of transformers 5 (`...experts.gate_up_proj` [E, 2I, H] and
    `...experts.down_proj` [E, H, I]): split it into per-expert tensors we know how to load."""
    m = re.match(r"(.*\.experts)\.(gate_up_proj|down_proj)$", name)
    if not m:
        return False
    base, kind = m.groups()
    mixtral = any(n.startswith(base + ".") and n.endswith(".w1.weight") for n in table)
    gate, up, down = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    for e in range(tensor.shape[0]):
        if f"{base}.{e}.{down}.weight" not in table:
            continue  # an expert of another expert-parallel rank
        if kind == "gate_up_proj":
            g_, u_ = tensor[e].chunk(2, dim=0)
            table[f"{base}.{e}.{gate}.weight"].load(g_)
            table[f"{base}.{e}.{up}.weight"].load(u_)
        else:
            table[f"{base}.{e}.{down}.weight"].load(tensor[e])
    return True


def _checkpoint_files(path: str) -> list[str]:
    """The weights files of a model directory; an `InputError` names a missing or unusable one."""
    if not os.path.isdir(path):
        raise InputError(f"model directory {path!r} does not exist")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, "rb") as f:
            weight_map = parse_json(f.read(), index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InputError(f"{index}: expected a 'weight_map' object of tensor name -> file name")
        files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise InputError(f"{index} names {missing[0]}, which does not exist")
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    if any(f.endswith(".bin") for f in os.listdir(path)):
        raise InputError(f"{path!r} holds only pickle .bin weights; convert them to safetensors first "
                         "(transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise InputError(f"no model.safetensors or model.safetensors.index.json in {path!r}")


@contextlib.contextmanager
def _open_safetensors(file: str) -> Iterator[Any]:
    """safe_open, with a truncated or corrupt file (its header does not cover the file, a tensor
    cannot be read) an `InputError` naming it."""
    try:
        with safe_open(file, framework="pt") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise InputError(f"{file}: not a readable safetensors file ({e})") from None


def checkpoint_tensor_names(path: str) -> list[str]:
    """The tensor names of a model directory's weights files (headers only)."""
    names: list[str] = []
    for file in _checkpoint_files(path):
        with _open_safetensors(file) as f:
            names.extend(f.keys())
    return names


def check_hf_files(path: str) -> None:
    """Open the header of every weights file of a model directory (no tensor is read), so that a
    missing, truncated or corrupt file is refused, by name, before any work starts."""
    for file in _checkpoint_files(path):
        with _open_safetensors(file) as f:
            f.keys()


def iter_checkpoint(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    for file in _checkpoint_files(path):
        with _open_safetensors(file) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)  # the consumer's own errors do not pass through this frame


def load_hf_weights(model: CausalLM, path: str, *,
                    tensors: Iterator[tuple[str, torch.Tensor]] | None = None) -> None:
    """Load a model directory's weights, or `tensors` ((HF name, tensor) pairs read from `path`)."""
    table = weight_table(model)
    pending = set(table)
    # A layer outside this pipeline stage's range belongs to another stage.
    lo, hi = model.layer_range
    unexpected = []
    for name, tensor in iter_checkpoint(path) if tensors is None else tensors:
        try:
            if name in table:
                table[name].load(tensor)
                pending.discard(name)
                continue
            fused = _fused_expert_loaders(table, name, tensor)
        except ValueError as e:  # a tensor of the wrong shape (the loaders name it)
            raise InputError(f"checkpoint {path!r}: {e}") from None
        if fused:
            base = name.rsplit(".", 1)[0]
            pending -= {n for n in pending if n.startswith(base + ".")}
        elif IGNORED.match(name) or MTP_SHARED.match(name):
            continue
        else:
            m = re.match(r"model\.layers\.(\d+)\.", name)
            other_stage = m is not None and not lo <= int(m.group(1)) < hi
            other_stage = other_stage or (model.groups.ep_size > 1 and re.search(r"\.experts\.\d+\.", name))
            other_end = name in ("lm_head.weight", "model.norm.weight", "model.embed_tokens.weight")
            if not (other_stage or other_end) and not (name == "lm_head.weight" and model.config.tie_word_embeddings):
                unexpected.append(name)
    if pending:
        missing = sorted(pending)
        raise InputError(f"checkpoint {path!r} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]}")
    if unexpected:
        raise InputError(f"checkpoint {path!r} has {len(unexpected)} tensor(s) this model does not use, "
                         f"e.g. {unexpected[:5]}: is model_type {model.config.model_type!r} right?")
    if tensors is None:
        _load_extras(model, path)


def _expert_biases(model: CausalLM) -> dict[str, torch.Tensor]:
    """The aux-loss-free balancing buffers of this rank's MoE layers, by side-file name."""
    if model.config.model_type == "deepseek_v3":
        return {}  # its e_score_correction_bias lives in the checkpoint proper
    return {f"model.layers.{layer.layer_idx}.mlp.expert_bias": layer.mlp.expert_bias for layer in model.layers
            if layer.is_moe and getattr(layer.mlp, "expert_bias", None) is not None}


def read_extras(path: str) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The router knobs and expert_bias tensors of `path`'s side file ({} and {} when it has none)."""
    file = os.path.join(path, EXTRAS_FILE)
    if not os.path.isfile(file):
        return {}, {}
    with _open_safetensors(file) as f:
        knobs = parse_json((f.metadata() or {}).get("rl_engine_config", "{}"), f"{file} (metadata)")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    if not isinstance(knobs, dict):
        raise InputError(f"{file}: its rl_engine_config metadata must be a JSON object")
    unknown = sorted(set(knobs) - set(ROUTER_KNOBS))
    if unknown:
        raise InputError(f"{file} sets unknown config key(s) {unknown}; known: {list(ROUTER_KNOBS)}")
    return knobs, tensors


def _load_extras(model: CausalLM, path: str) -> None:
    knobs, tensors = read_extras(path)
    mine = _expert_biases(model)
    rate = knobs.get("router_bias_update_rate", 0.0)
    if not mine:
        if tensors and model.config.is_moe:
            raise InputError(f"{os.path.join(path, EXTRAS_FILE)} holds expert_bias buffers (aux-loss-free "
                             f"balancing, router_bias_update_rate={rate}) but the model was built without "
                             f"them: build it with router_bias_update_rate={rate} (from_pretrained does)")
        return
    for name, buf in mine.items():
        if name not in tensors:
            continue  # a checkpoint trained without the bias: it starts at zero
        if tuple(tensors[name].shape) != tuple(buf.shape):
            raise InputError(f"{EXTRAS_FILE}: {name} has shape {tuple(tensors[name].shape)}, the model "
                             f"expects {tuple(buf.shape)}")
        with torch.no_grad():
            buf.copy_(tensors[name])


def from_pretrained(
    path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    groups: ParallelGroups = SINGLE,
    layer_range: tuple[int, int] | None = None,
) -> CausalLM:
    """Build the policy from a Hugging Face model directory (config.json + safetensors, plus our
    side file of router knobs and expert_bias buffers when `save_pretrained` wrote one), or from a
    `.gguf` file (de-quantized by `gguf_import`; its tokenizer needs `convert_gguf`)."""
    if os.fspath(path).endswith(".gguf"):
        from rl_engine.policy.gguf_import import read_gguf

        hf, tensors = read_gguf(os.fspath(path), dtype=torch.float32)
        try:
            config = ModelConfig.from_hf_dict(hf)
        except ValueError as e:
            raise InputError(f"{path}: {e}") from None
        model = CausalLM(config, groups=groups, dtype=dtype, device=device, layer_range=layer_range)
        load_hf_weights(model, os.fspath(path), tensors=tensors)
        return model
    config = ModelConfig.from_pretrained(path)
    knobs, _ = read_extras(path)
    if knobs:
        config = config.replace(**knobs)
    model = CausalLM(config, groups=groups, dtype=dtype, device=device, layer_range=layer_range)
    load_hf_weights(model, path)
    return model


def save_pretrained(model: CausalLM, path: str, *, max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json and safetensors (sharded with an index past `max_shard_bytes`) that
    transformers loads. Needs the whole model on this rank (tp=1, one pipeline stage)."""
    g = model.groups
    if g.tp_size > 1 or not (model.is_first_stage and model.is_last_stage) or g.ep_size > 1:
        raise ValueError("save_pretrained needs the whole model on one rank (tp=1, pp=1, ep=1); "
                         "use the sharded checkpoint and `rl-engine convert` for parallel layouts")
    os.makedirs(path, exist_ok=True)
    tensors = {name: entry.export().contiguous().clone() for name, entry in weight_table(model).items()}
    for mtp in model.mtp_layers:  # DeepSeek's MTP layers carry copies of the shared embedding and head
        tensors[f"model.layers.{mtp.layer_idx}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors[f"model.layers.{mtp.layer_idx}.shared_head.head.weight"] = tensors[
            "model.embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head.weight"].clone()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        _atomic_save(shards[0], os.path.join(path, "model.safetensors"), meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save(shard, os.path.join(path, fname), meta)
            weight_map.update({n: fname for n in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _atomic_write_json(os.path.join(path, "model.safetensors.index.json"),
                           {"metadata": {"total_size": total}, "weight_map": weight_map})
    extras = {name: t.detach().contiguous().clone() for name, t in _expert_biases(model).items()}
    knobs = {k: getattr(model.config, k) for k in ROUTER_KNOBS if getattr(model.config, k)}
    extras_file = os.path.join(path, EXTRAS_FILE)
    if extras or knobs:
        _atomic_save(extras, extras_file, {"format": "pt", "rl_engine_config": json.dumps(knobs)})
    elif os.path.exists(extras_file):
        os.remove(extras_file)  # left by an earlier export into this directory
    hf = model.config.to_hf_dict()
    hf["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    hf.pop("dtype", None)
    _atomic_write_json(os.path.join(path, "config.json"), hf)


def _atomic_save(tensors: dict[str, torch.Tensor], file: str, meta: dict[str, str]) -> None:
    tmp = file + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, file)


def _atomic_write_json(file: str, obj) -> None:
    tmp = file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, file)
