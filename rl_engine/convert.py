"""`rl-engine convert SRC DST`: Hugging Face directories, sharded checkpoints of any layout, and a
run's training checkpoints, from one to another.

The kind of SRC is read from its files:
  hf        a Hugging Face model directory (config.json + safetensors)
  sharded   our sharded checkpoint (metadata.json + rank*.safetensors) of any tp/pp/dp/ep layout
  step      a training checkpoint `<output_dir>/checkpoints/step_<k>`: its `trainer/` sharded
            checkpoint (actors runs) or its `model.pt` + `optimizer.pt` (single-process runs)
  run       a run's output directory: its newest committed checkpoint (`checkpoints/latest.json`)
`--to hf` (the default unless SRC is hf) writes a directory transformers loads: config.json,
safetensors, the MoE side file of router knobs and expert_bias buffers when the model has them
(`policy/checkpoint.py`), and the tokenizer, chat template and generation config copied from the
run's model directory (or `--tokenizer DIR`). `--to sharded` (the default for an hf SRC) writes the
checkpoint a `--tp x --pp x --dp` (`--ep`, `--virtual-stages`) run would save, one process doing
every rank's files (`dist_checkpoint.write_checkpoint`): parameters as fp32 masters, the AdamW moments
when SRC has them (a sharded or single-process checkpoint; zeros from an hf SRC, as a fresh
optimizer), its step. A sharded SRC is resharded box by box without assembling the model; the others
go through the whole model in memory once. `--from-gguf FILE DST` writes the Hugging Face directory of
a llama.cpp GGUF file, de-quantized, with its tokenizer and chat template (`policy/gguf_import.py`).

Every mismatch is an `InputError` naming the tensor and both shapes; DST must not exist yet (the
output is built beside it and renamed into place).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Any

import torch

from rl_engine.config import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
MODEL_FILES = ("config.json", "rl_engine_extras.safetensors")  # written by save_pretrained itself


@dataclass(frozen=True, kw_only=True)
class Source:
    kind: str  # "hf" | "sharded" | "single" (a single-process step)
    path: str  # the directory holding the weights
    assets: str | None  # a model directory whose tokenizer files go with an HF export
    described: str  # how the source is named in messages


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a Hugging Face model directory, a sharded checkpoint, a training checkpoint "
                               "(<output_dir>/checkpoints/step_<k>) or a run's output directory (its newest checkpoint)")
    p.add_argument("dst", nargs="?", help="the directory to write (must not exist)")
    p.add_argument("--from-gguf", metavar="FILE", default=None,
                   help="convert a GGUF file instead: `convert --from-gguf FILE DST` writes DST as a Hugging Face "
                        "directory (--dtype float32, the default, or bfloat16)")
    p.add_argument("--to", choices=("hf", "sharded"), default=None,
                   help="hf: a Hugging Face directory; sharded: our checkpoint in --tp/--pp/--dp/--ep "
                        "(default: sharded for an hf source, hf otherwise)")
    for name, text in (("tp", "tensor"), ("pp", "pipeline"), ("dp", "data"), ("ep", "expert")):
        p.add_argument(f"--{name}", type=int, default=1, help=f"--to sharded: {text}-parallel size (default 1)")
    p.add_argument("--virtual-stages", type=int, default=1, help="--to sharded: interleaved pipeline chunks per rank")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="--to hf: the weights' dtype (default: the dtype config.json names, else float32)")
    p.add_argument("--tokenizer", default=None,
                   help="--to hf: copy the tokenizer and other non-weight files from this model directory "
                        "(default: the run's model directory, when SRC is a training checkpoint)")


def main(args: argparse.Namespace) -> int:
    if args.from_gguf is not None:
        return _from_gguf(args)
    if args.dst is None:
        raise InputError("convert needs SRC and DST (or --from-gguf FILE DST)")
    source = detect_source(args.src)
    to = args.to or ("sharded" if source.kind == "hf" else "hf")
    if os.path.exists(args.dst):
        raise InputError(f"{args.dst} already exists; remove it or give another destination")
    if to == "hf":
        if (args.tp, args.pp, args.dp, args.ep, args.virtual_stages) != (1, 1, 1, 1, 1):
            raise InputError("--tp/--pp/--dp/--ep/--virtual-stages describe a sharded destination; with --to hf "
                             "leave them out")
        assets = args.tokenizer or source.assets
        if args.tokenizer is not None and not os.path.isdir(args.tokenizer):
            raise InputError(f"--tokenizer {args.tokenizer!r} is not a directory")
        to_hf(source, args.dst, dtype=args.dtype, assets=assets)
        if assets is None:
            print(f"note: {args.dst} has no tokenizer ({source.described} names no model directory); copy one in, "
                  "or convert again with --tokenizer DIR", file=sys.stderr)
    else:
        if args.dtype is not None or args.tokenizer is not None:
            raise InputError("--dtype and --tokenizer apply to --to hf; a sharded checkpoint holds fp32 masters")
        to_sharded(source, args.dst, tp=args.tp, pp=args.pp, dp=args.dp, ep=args.ep,
                   virtual_stages=args.virtual_stages)
    print(f"wrote {args.dst} ({to}) from {source.described}")
    return 0


def _from_gguf(args: argparse.Namespace) -> int:
    from rl_engine.policy.gguf_import import convert_gguf

    dst = args.src  # `--from-gguf FILE DST`: the one positional is the destination
    if args.dst is not None or args.to not in (None, "hf") or args.tokenizer is not None:
        raise InputError("convert --from-gguf FILE DST takes one destination and writes a Hugging Face directory; "
                         "leave out SRC, --to and --tokenizer (convert DST to a sharded checkpoint afterwards)")
    if (args.tp, args.pp, args.dp, args.ep, args.virtual_stages) != (1, 1, 1, 1, 1):
        raise InputError("--tp/--pp/--dp/--ep/--virtual-stages describe a sharded destination, not --from-gguf")
    if args.dtype not in (None, "float32", "bfloat16"):
        raise InputError(f"--from-gguf: --dtype {args.dtype} is not offered; use float32 or bfloat16")
    convert_gguf(args.from_gguf, dst, dtype=DTYPES[args.dtype or "float32"])
    print(f"wrote {dst} (hf) from GGUF file {args.from_gguf}")
    return 0


# ---- sources -------------------------------------------------------------------------------------
def detect_source(path: str) -> Source:
    from rl_engine import run_checkpoint

    if not os.path.isdir(path):
        raise InputError(f"convert: {path!r} is not a directory")
    if os.path.isfile(os.path.join(path, run_checkpoint.LATEST)):  # given the checkpoints/ directory
        path = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(run_checkpoint.checkpoints_root(path), run_checkpoint.LATEST)):
        newest = run_checkpoint.latest(path)
        if newest is None:
            raise InputError(f"convert: {path} is a run directory with no committed checkpoint")
        return _step_source(newest, described=f"{path} (its newest checkpoint, {newest})")
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return Source(kind="sharded", path=path, assets=None, described=f"sharded checkpoint {path}")
    if os.path.isfile(os.path.join(path, "trainer", "metadata.json")) or os.path.isfile(os.path.join(path, "model.pt")):
        return _step_source(path, described=f"training checkpoint {path}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return Source(kind="hf", path=path, assets=path, described=f"Hugging Face directory {path}")
    raise InputError(f"convert: {path} is none of: a Hugging Face directory (config.json), a sharded checkpoint "
                     "(metadata.json), a training checkpoint (checkpoints/step_<k> with trainer/ or model.pt) or a "
                     "run directory (checkpoints/latest.json)")


def _step_source(step_dir: str, *, described: str) -> Source:
    """A training checkpoint; the run's model directory (for the tokenizer) from the run's config."""
    from rl_engine.run_checkpoint import verify

    verify(step_dir)  # every file against the manifest before anything reads it
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(step_dir)))
    trainer = os.path.join(step_dir, "trainer")
    if os.path.isfile(os.path.join(trainer, "metadata.json")):  # an actors run: the resolved config
        config_file = os.path.join(run_dir, "actors", "config.yaml")
        model_path = _config_model_path(config_file, run_dir)
        return Source(kind="sharded", path=trainer, assets=model_path, described=described)
    model_path = _config_model_path(os.path.join(step_dir, "trainer_state.json"), run_dir)
    if model_path is None:
        raise InputError(f"{step_dir}: its trainer_state.json names no model directory to read the model's config "
                         "from")
    return Source(kind="single", path=step_dir, assets=model_path, described=described)


def _config_model_path(config_file: str, run_dir: str) -> str | None:
    """model.path of a run's config (trainer_state.json's `config`, or actors/config.yaml); a builtin
    preset was written to <run>/init_model, a real builtin or .gguf file converted into the cache
    (builtin_models). None when the file or directory is gone."""
    from rl_engine.builtin_models import REAL_MODELS, resolve_model_path
    from rl_engine.config import read_yaml_file

    if not os.path.isfile(config_file):
        return None
    if config_file.endswith(".json"):
        with open(config_file) as f:
            config = json.load(f).get("config", {})
    else:
        config = read_yaml_file(config_file)
    path = (config.get("model") or {}).get("path")
    if isinstance(path, str) and path.startswith("builtin:") and path.split(":", 1)[1] not in REAL_MODELS:
        path = os.path.join(run_dir, "init_model")
    elif isinstance(path, str) and (path.startswith("builtin:") or path.endswith(".gguf")):
        path = resolve_model_path(path, output_dir=run_dir, seed=0)  # a GGUF model: its converted cache directory
    return path if isinstance(path, str) and os.path.isfile(os.path.join(path, "config.json")) else None


# ---- the whole model in this process ----------------------------------------------------------------
def _sharded_config(path: str):
    from rl_engine.policy import ModelConfig

    with open(os.path.join(path, "metadata.json")) as f:
        meta = json.load(f)
    try:
        config = ModelConfig.from_hf_dict(meta["model_config"])
    except ValueError as e:
        raise InputError(f"{path}/metadata.json: {e}") from None
    return config.replace(**meta.get("rl_engine_config", {})), meta


def _single_config(source: Source):
    from rl_engine.policy import ModelConfig
    from rl_engine.policy.checkpoint import read_extras

    knobs, _ = read_extras(source.assets)
    return ModelConfig.from_pretrained(source.assets).replace(**knobs)


def load_model(source: Source, dtype: torch.dtype):
    """(the whole model at world size 1 in `dtype`, {id(param): {kind: moment}} or None, Adam step)."""
    from rl_engine.policy import CausalLM, from_pretrained
    from rl_engine.policy.dist_checkpoint import load_checkpoint

    if source.kind == "hf":
        return from_pretrained(source.path, dtype=dtype), None, 0
    if source.kind == "sharded":
        config, _ = _sharded_config(source.path)
        model = CausalLM(config, dtype=dtype)
        try:
            meta = load_checkpoint(source.path, [model])
        except ValueError as e:  # a tensor missing or of another global shape (named)
            raise InputError(f"{source.path}: {e}") from None
        return model, None, int(meta["step"])
    model = CausalLM(_single_config(source), dtype=dtype)
    state = _torch_load(os.path.join(source.path, "model.pt"))
    _load_state_dict_checked(model, state, where=os.path.join(source.path, "model.pt"))
    moments, step = _adamw_moments(model, os.path.join(source.path, "optimizer.pt"))
    return model, moments, step


def _torch_load(file: str) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # of any type: a damaged or foreign file
        raise InputError(f"{file} cannot be read ({type(e).__name__}: {e})") from None


def _load_state_dict_checked(model, state: dict, *, where: str) -> None:
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    if missing or unexpected:
        raise InputError(f"{where}: does not match the model built from its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(ours[name].shape):
            raise InputError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(ours[name].shape)}")
    model.load_state_dict(state)


def _adamw_moments(model, file: str) -> tuple[dict[int, dict[str, torch.Tensor]] | None, int]:
    """torch.optim.AdamW's moments by parameter (its state is indexed in model.parameters() order), and a
    bf16 run's fp32 master weights as "param" (`MasterWeightsAdamW`: one per parameter, in that order)."""
    if not os.path.isfile(file):
        return None, 0
    saved = _torch_load(file)
    state, masters = saved["state"], saved.get("master_weights")
    params = list(model.parameters())
    if masters is not None and len(masters) != len(params):
        raise InputError(f"{file}: {len(masters)} master weights for a model of {len(params)} parameters")
    moments, step = {}, 0
    for index, p in enumerate(params):
        if masters is not None:
            if tuple(masters[index].shape) != tuple(p.shape):
                raise InputError(f"{file}: master weight {index} has shape {tuple(masters[index].shape)}, the "
                                 f"parameter {tuple(p.shape)}")
            moments.setdefault(id(p), {})["param"] = masters[index]
        if index in state:
            s = state[index]
            for kind in ("exp_avg", "exp_avg_sq"):
                if tuple(s[kind].shape) != tuple(p.shape):
                    raise InputError(f"{file}: the {kind} of parameter {index} has shape {tuple(s[kind].shape)}, "
                                     f"the parameter {tuple(p.shape)}")
            moments.setdefault(id(p), {}).update(exp_avg=s["exp_avg"], exp_avg_sq=s["exp_avg_sq"])
            step = int(s["step"])
    return moments, step


# ---- targets -----------------------------------------------------------------------------------------
def _default_dtype(source: Source) -> torch.dtype:
    if source.kind == "sharded":
        hf = _sharded_config(source.path)[0].to_hf_dict()
    else:
        with open(os.path.join(source.assets if source.kind == "single" else source.path, "config.json")) as f:
            hf = json.load(f)
    return DTYPES.get(str(hf.get("torch_dtype") or hf.get("dtype")), torch.float32)


def to_hf(source: Source, dst: str, *, dtype: str | None, assets: str | None) -> None:
    from rl_engine.policy.checkpoint import save_pretrained

    torch_dtype = DTYPES[dtype] if dtype is not None else _default_dtype(source)
    model, _, _ = load_model(source, torch_dtype)
    tmp = dst.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp)
    if assets is not None:
        copy_model_assets(assets, tmp)
    os.replace(tmp, dst)


def copy_model_assets(src: str, dst: str) -> list[str]:
    """Copy a model directory's non-weight files (tokenizer, chat template, generation config) into
    `dst`, keeping what `dst` has; returns the names copied."""
    copied = []
    for name in sorted(os.listdir(src)):
        file = os.path.join(src, name)
        if (os.path.isfile(file) and not name.endswith(WEIGHT_SUFFIXES) and name not in MODEL_FILES
                and not os.path.exists(os.path.join(dst, name))):
            shutil.copy(file, dst)
            copied.append(name)
    return copied


def to_sharded(source: Source, dst: str, *, tp: int, pp: int, dp: int, ep: int, virtual_stages: int) -> None:
    from safetensors import safe_open

    from rl_engine.policy.dist_checkpoint import checkpoint_reader, model_boxes, write_checkpoint

    if source.kind == "sharded":
        config, meta = _sharded_config(source.path)
        read = checkpoint_reader(source.path)
        step, extra = int(meta["step"]), meta.get("extra", {})
        rng_state = None
        if meta["world_size"] == tp * pp * dp:  # the same ranks: each keeps its RNG stream
            def rng_state(rank: int) -> torch.Tensor:
                with safe_open(os.path.join(source.path, f"rank{rank:05d}.safetensors"), framework="pt") as f:
                    return f.get_tensor("rng/torch_cpu")
    else:
        model, moments, step = load_model(source, torch.float32)
        config, extra, rng_state = model.config, {}, None
        full: dict[tuple[str, str], torch.Tensor] = {}
        for box in model_boxes(model):  # world size 1: each box is its whole global tensor
            full[(box.key, "param")] = box.tensor[box.index].detach()
            for kind in ("param", "exp_avg", "exp_avg_sq"):  # param: a bf16 run's fp32 masters
                moment = (moments or {}).get(id(box.tensor), {}).get(kind)
                if moment is not None:
                    full[(box.key, kind)] = moment[box.index]

        def read(key: str, kind: str, offset: tuple[int, ...], shape: tuple[int, ...],
                 global_shape: tuple[int, ...]) -> torch.Tensor:
            param = full[(key, "param")]
            if tuple(param.shape) != tuple(global_shape):
                raise ValueError(f"{key!r}: the source has shape {tuple(param.shape)}, the layout's model "
                                 f"{tuple(global_shape)}")
            tensor = full.get((key, kind))
            if tensor is None:  # no optimizer state in the source: a fresh optimizer's zeros
                return torch.zeros(shape, dtype=torch.float32)
            return tensor[tuple(slice(o, o + n) for o, n in zip(offset, shape))].float()

    try:
        write_checkpoint(dst, config, read, tp=tp, pp=pp, dp=dp, ep=ep, virtual_stages=virtual_stages, step=step,
                         extra=extra, rng_state=rng_state)
    except ValueError as e:  # a layout the model does not divide into, or a tensor of another shape (named)
        shutil.rmtree(dst.rstrip("/") + ".partial", ignore_errors=True)
        raise InputError(f"convert {source.described} -> {dst}: {e}") from None
