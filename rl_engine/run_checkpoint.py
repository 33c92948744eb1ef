"""Where a run's checkpoints live and how one becomes the one to resume from.

    <output_dir>/checkpoints/step_000012/   one checkpoint (its writers put files in it)
    <output_dir>/checkpoints/latest.json    {"step": 12, "path": "step_000012"}: the newest complete one

A checkpoint is written into its own directory by every party that owns state (trainer shards,
coordinator or single-process state), each file atomically (temp + fsync + rename); only when all
are on disk does `commit` rewrite `latest.json` (temp + fsync + rename + directory fsync). A run
killed at any instant therefore resumes from a checkpoint whose parts belong to the same step: a
half-written `step_k` is never named by `latest.json` and is removed by the next commit.
"""

from __future__ import annotations

import json
import os
import shutil

LATEST = "latest.json"


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def step_dir(output_dir: str, step: int) -> str:
    return os.path.join(checkpoints_root(output_dir), f"step_{step:06d}")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def write_json_atomic(path: str, obj: object) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=2).encode())


def commit(output_dir: str, step: int, *, keep: int) -> str:
    """Make `step_dir(output_dir, step)` the checkpoint to resume from; prune all but the newest
    `keep` committed ones (and any uncommitted leftovers). Returns its path."""
    root = checkpoints_root(output_dir)
    path = step_dir(output_dir, step)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"cannot commit checkpoint step {step}: {path} does not exist")
    fsync_dir(path)
    write_json_atomic(os.path.join(root, LATEST), {"step": step, "path": os.path.basename(path)})
    steps = sorted(int(name[5:]) for name in os.listdir(root) if name.startswith("step_") and name[5:].isdigit())
    for name in os.listdir(root):  # a temp file of a run killed while it rewrote latest.json
        if name.startswith(LATEST + ".tmp"):
            os.remove(os.path.join(root, name))
    kept = set([s for s in steps if s <= step][-keep:])
    for old in steps:  # older ones beyond `keep`, and uncommitted newer ones left by a killed run
        if old not in kept:
            shutil.rmtree(step_dir(output_dir, old), ignore_errors=True)
    return path


def latest(output_dir: str) -> str | None:
    """The newest committed checkpoint of a run directory, or None."""
    pointer = os.path.join(checkpoints_root(output_dir), LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        name = json.load(f)["path"]
    path = os.path.join(checkpoints_root(output_dir), name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{pointer} names {name}, which is missing; pass train.resume=<a checkpoint dir>")
    return path


def resolve_resume(output_dir: str, resume: str | None) -> str | None:
    """The checkpoint directory to resume from: None (fresh start), "auto" (the newest committed one
    of `output_dir`, None when there is none) or an explicit directory, which must exist."""
    if resume is None:
        return None
    if resume == "auto":
        return latest(output_dir)
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"train.resume={resume!r} is not a directory; give a checkpoint directory "
                                f"(<output_dir>/checkpoints/step_<k>) or 'auto'")
    return resume


def checkpoint_step(path: str) -> int:
    name = os.path.basename(os.path.normpath(path))
    if not name.startswith("step_") or not name[5:].isdigit():
        raise ValueError(f"{path} is not a checkpoint directory (step_<k>)")
    return int(name[5:])
