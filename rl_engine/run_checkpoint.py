"""Where a run's checkpoints live and how one becomes the one to resume from.

    <output_dir>/checkpoints/step_000012/   one checkpoint (its writers put files in it)
    <output_dir>/checkpoints/latest.json    {"step": 12, "path": "step_000012"}: the newest complete one
    <output_dir>/checkpoints/step_000012/manifest.json   {"model.pt": {"bytes": n, "sha256": hex}, ...}

A checkpoint is written into its own directory by every party that owns state (trainer shards,
coordinator or single-process state), each file atomically (temp + fsync + rename); only when all
are on disk does `commit` write the manifest (size and sha256 of every file under the directory,
tensor shards included) and then rewrite `latest.json` (temp + fsync + rename + directory fsync). A
run killed at any instant therefore resumes from a checkpoint whose parts belong to the same step: a
half-written `step_k` is never named by `latest.json` and is removed by the next commit.

Every resume goes through `resolve_resume`, which checks the directory against its manifest
(`verify`): a missing, unlisted, resized or altered file is refused by name before anything reads it,
and `latest.json` may only name a `step_<k>` directory inside the run's checkpoints directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

from rl_engine.config import InputError

LATEST = "latest.json"
MANIFEST = "manifest.json"
_STEP_NAME = re.compile(r"step_\d+")


class CheckpointError(InputError):
    """A checkpoint that cannot be resumed: damaged, incomplete, or named from outside its run."""


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
    write_manifest(path)
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
    """The newest committed checkpoint of a run directory, or None. `latest.json` may only name a
    `step_<k>` directory of the run's own checkpoints directory (no path, no link leading elsewhere)."""
    root = checkpoints_root(output_dir)
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    try:
        with open(pointer) as f:
            record = json.load(f)
        name, step = record["path"], record["step"]
    except Exception as e:  # of any type: a damaged pointer is refused, whatever its damage
        raise CheckpointError(f"{pointer} is unreadable ({type(e).__name__}: {e}); pass "
                              "train.resume=<a checkpoint dir> instead of 'auto'") from None
    path = os.path.join(root, str(name))
    inside = os.path.dirname(os.path.realpath(path)) == os.path.realpath(root)
    if not (isinstance(name, str) and _STEP_NAME.fullmatch(name) and inside and step == int(name[5:])):
        raise CheckpointError(f"{pointer} names {name!r} (step {step!r}), which is not a step_<k> directory "
                              f"inside {root}; pass train.resume=<a checkpoint dir> instead of 'auto'")
    if not os.path.isdir(path):
        raise CheckpointError(f"{pointer} names {name}, which is missing; pass train.resume=<a checkpoint dir>")
    return path


def resolve_resume(output_dir: str, resume: str | None) -> str | None:
    """The checkpoint directory to resume from: None (fresh start), "auto" (the newest committed one
    of `output_dir`, None when there is none) or an explicit directory, which must exist. Either is
    checked against its manifest (`verify`) before it is returned."""
    if resume is None:
        return None
    if resume == "auto":
        path = latest(output_dir)
    elif not os.path.isdir(resume):
        raise FileNotFoundError(f"train.resume={resume!r} is not a directory; give a checkpoint directory "
                                f"(<output_dir>/checkpoints/step_<k>) or 'auto'")
    else:
        path = resume
    if path is not None:
        verify(path)
    return path


def _files(path: str) -> list[str]:
    """Every file under `path` but the manifest, as sorted relative paths."""
    found = [os.path.relpath(os.path.join(d, name), path) for d, _, names in os.walk(path) for name in names]
    return sorted(rel for rel in found if rel != MANIFEST)


def _sha256(file: str) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(path: str) -> None:
    """Record the size and sha256 of every file of the checkpoint at `path` (atomically)."""
    files = {rel: {"bytes": os.path.getsize(os.path.join(path, rel)), "sha256": _sha256(os.path.join(path, rel))}
             for rel in _files(path)}
    write_json_atomic(os.path.join(path, MANIFEST), files)


def verify(path: str) -> None:
    """Raise `CheckpointError` naming the first file of `path` that is missing, not in the manifest,
    or differs from it in size or sha256 (and an earlier checkpoint to resume from, if one is left)."""
    manifest_file = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_file):
        raise CheckpointError(f"checkpoint {path} holds no {MANIFEST}: it was never committed (or was written "
                              f"before checkpoints carried one) and cannot be verified; {_earlier(path)}")
    try:
        with open(manifest_file) as f:
            expected = {str(rel): (int(e["bytes"]), str(e["sha256"])) for rel, e in json.load(f).items()}
    except Exception as e:  # of any type
        raise CheckpointError(f"checkpoint {path} is damaged: {manifest_file} is unreadable "
                              f"({type(e).__name__}: {e}); {_earlier(path)}") from None
    on_disk = set(_files(path))
    unlisted = sorted(on_disk - set(expected))
    if unlisted:  # e.g. a shard that loaders would read beside the listed ones
        raise CheckpointError(f"checkpoint {path} is damaged: {os.path.join(path, unlisted[0])} is not listed in "
                              f"its manifest; {_earlier(path)}")
    for rel, (size, digest) in sorted(expected.items()):
        file = os.path.join(path, rel)
        if rel not in on_disk:  # also every name that is not a path inside `path`
            problem = "is missing"
        elif os.path.getsize(file) != size:
            problem = f"has {os.path.getsize(file)} bytes, its manifest says {size}"
        elif _sha256(file) != digest:
            problem = "does not match its sha256 in the manifest"
        else:
            continue
        raise CheckpointError(f"checkpoint {path} is damaged: {file} {problem}; {_earlier(path)}")


def _earlier(path: str) -> str:
    """What to do instead of resuming from the damaged checkpoint `path`."""
    parent, name = os.path.split(os.path.normpath(path))
    if _STEP_NAME.fullmatch(name):
        earlier = sorted((int(n[5:]), n) for n in os.listdir(parent or ".") if _STEP_NAME.fullmatch(n)
                         and int(n[5:]) < int(name[5:]) and os.path.isfile(os.path.join(parent, n, MANIFEST)))
        if earlier:
            return f"resume from an earlier checkpoint: train.resume={os.path.join(parent, earlier[-1][1])}"
    return "no earlier checkpoint of this run is left: restore the file or start a new run"


def checkpoint_step(path: str) -> int:
    name = os.path.basename(os.path.normpath(path))
    if not name.startswith("step_") or not name[5:].isdigit():
        raise ValueError(f"{path} is not a checkpoint directory (step_<k>)")
    return int(name[5:])
