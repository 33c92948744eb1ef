"""Context parallelism on two gloo processes, spawned once: cp2 with ring attention, with the
all-gather variant, with dynamic CP (short sequences whole on one rank), and cp2 with an MoE model
and ep2 (ep carved out of dp x cp) each match the single-process run (losses of 3 steps and the
parameters after them). The dense runs train on packed batches mixing odd lengths, length-1
sequences and sequences longer than 2 * cp chunks ("mixed" in parallel_helpers)."""

import os

import pytest
import torch

from parallel_helpers import check_layout, layout_ids, micro_batches, run_layouts, run_parity, write_json

LAYOUTS = [
    {"name": "cp2", "kind": "mixed", "cp": 2},
    {"name": "cp2_allgather", "kind": "mixed", "cp": 2, "cp_comm": "allgather"},
    {"name": "cp2_dynamic", "kind": "mixed", "cp": 2, "cp_min_tokens": 8},
    {"name": "cp2_ep2", "kind": "moe", "cp": 2, "ep": 2},
]


def _worker(rank, world, weights, out):
    trainers = run_layouts(LAYOUTS, weights, out)
    # The forward log-probs of every layout are the whole micro-batches' on every cp rank.
    lp = trainers["cp2_dynamic"].forward_logprobs(micro_batches("mixed"))
    torch.save(torch.cat([x for x, _ in lp]), os.path.join(out, f"dynamic_logprobs{rank}.pt"))
    write_json(os.path.join(out, f"done{rank}.json"), {"rank": rank})


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_parity(tmp_path_factory.mktemp("cp_world2"), _worker, world=2, kinds=("mixed", "moe"))


@pytest.mark.parametrize("spec", LAYOUTS, ids=layout_ids(LAYOUTS))
def test_layout_matches_single_process(results, spec):
    print(check_layout(results, spec))


def test_every_cp_rank_returns_the_whole_micro_batches_logprobs(results):
    a, b = (torch.load(os.path.join(results, f"dynamic_logprobs{r}.pt")) for r in range(2))
    assert a.shape[0] == sum(mb.num_tokens for mb in micro_batches("mixed"))
    assert torch.equal(a, b)
