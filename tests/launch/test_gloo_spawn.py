"""rl_engine.launch.gloo.spawn, the helper of the multi-process tests: the ranks join one gloo group,
run with the caller's intra-op thread count (or `threads=`), and a failing rank fails the call."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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
