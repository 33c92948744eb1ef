"""rl_engine.launch.gloo.spawn, the helper of the multi-process tests: the ranks join one gloo group,
run with the caller's intra-op thread count (or `threads=`), a failing rank fails the call, and a port taken
by another process on the machine cannot fail the call (the caller holds its store's port from the bind)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rl_engine.launch import gloo
from rl_engine.launch.gloo import spawn


def _report(rank: int, world: int, out: str) -> None:
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"world": dist.get_world_size(), "rank": dist.get_rank(), "threads": torch.get_num_threads(),
                   "rank_sum": total.item()}, f)


def _fail(rank: int, world: int) -> None:
    raise RuntimeError(f"rank {rank} fails on purpose")  # every rank: none is left waiting in a barrier


def _read(out: str, world: int) -> list[dict]:
    results = []
    for rank in range(world):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results


@pytest.mark.parametrize("threads", [None, 2])
def test_ranks_join_one_group_with_the_callers_threads(tmp_path, threads):
    expected = torch.get_num_threads() if threads is None else threads
    spawn(_report, 2, str(tmp_path), threads=threads)
    for rank, r in enumerate(_read(str(tmp_path), 2)):
        assert r == {"world": 2, "rank": rank, "threads": expected, "rank_sum": 1.0}


def test_a_failing_rank_fails_the_call_with_its_error():
    with pytest.raises(mp.ProcessRaisedException, match=r"RuntimeError: rank [01] fails on purpose"):
        spawn(_fail, 2)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        spawn(_fail, 2, threads=0)


def test_a_port_taken_by_another_process_between_pick_and_bind_does_not_fail_the_call(tmp_path, monkeypatch):
    """The race of a shared machine, made certain: the port a free-port pick would hand the ranks is taken
    before they bind it (spawn used to pick one with `free_port`, then rank 0 bound it: EADDRINUSE)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(gloo, "free_port", lambda host="127.0.0.1": taken.getsockname()[1], raising=False)
        spawn(_report, 2, str(tmp_path), threads=1)
    assert [r["rank_sum"] for r in _read(str(tmp_path), 2)] == [1.0, 1.0]
