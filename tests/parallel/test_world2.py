"""Two gloo processes, spawned once: tp2, tp2 + sequence parallel, pp2, pp2 interleaved, ep2 (MoE)
and dp2 each match the single-process run (losses of 3 steps, parameters after them), and routing
record / replay works under expert parallelism."""

import os

import pytest

from parallel_helpers import MOE, build_trainer, check_layout, layout_ids, loss_fn, my_micro_batches, rank_results, \
    routing_replay, run_layouts, run_parity, write_json

LAYOUTS = [
    {"name": "tp2", "kind": "dense", "tp": 2},
    {"name": "tp2_sp", "kind": "dense", "tp": 2, "sp": True},
    {"name": "pp2", "kind": "dense", "pp": 2},
    {"name": "pp2_interleaved", "kind": "dense", "pp": 2, "v": 2},
    {"name": "ep2", "kind": "moe", "ep": 2},
    {"name": "dp2", "kind": "dense"},
]


def _replay_check(weights: str, out: str) -> None:
    """ep2: replaying recorded routing reproduces the log-probs; other experts change them; a
    training step with replay gives the loss of one without."""
    trainer = build_trainer({"kind": "moe", "ep": 2}, weights)
    mbs = my_micro_batches(trainer, "moe")
    replay = routing_replay(trainer, mbs, num_experts=MOE.num_experts)
    fresh = build_trainer({"kind": "moe", "ep": 2}, weights)
    plain = fresh.train_step(my_micro_batches(fresh, "moe"), loss_fn)["loss"]
    with_replay = trainer.train_step(mbs, loss_fn)["loss"]  # mbs replay the recorded routing
    try:  # unequal micro-batch counts over the ep group would hang in all_to_all: refused instead
        trainer.train_step(mbs[: 1 + trainer.groups.ep_rank], loss_fn)
        lockstep_error = ""
    except ValueError as e:
        lockstep_error = str(e)
    write_json(os.path.join(out, f"replay{trainer.groups.world_rank}.json"),
               {**replay, "loss_diff": abs(plain - with_replay), "lockstep": lockstep_error})


def _worker(rank, world, weights, out):
    run_layouts(LAYOUTS, weights, out)
    _replay_check(weights["moe"], out)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_parity(tmp_path_factory.mktemp("world2"), _worker, world=2)


@pytest.mark.parametrize("spec", LAYOUTS, ids=layout_ids(LAYOUTS))
def test_layout_matches_single_process(results, spec):
    print(check_layout(results, spec))


def test_routing_replay_under_expert_parallelism(results):
    for r in rank_results(results, "replay", world=2):
        assert r["same"] == 0.0
        assert r["changed"] > 1e-3
        assert r["loss_diff"] <= 1e-6
        assert "range from 1 to 2" in r["lockstep"]
