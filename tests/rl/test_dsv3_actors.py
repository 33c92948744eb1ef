"""DeepSeek-V3 through the actors: colocated on two tensor-parallel trainer ranks (each engine runs
MLA on its own heads over a whole latent cache, the MoE replicated per rank) with routing replay, and
disaggregated with a pipeline-parallel trainer whose updates reach the rollout worker by weight sync;
both reproduce the single-process run step by step (same samples, losses and gradient norms)."""

import pytest

from rl_actor_helpers import assert_same_run, single_process_rows
from test_actors_e2e import assert_same_weights_served, run

DSV3 = ["model.path=builtin:tiny_dsv3", "rollout.routing_replay=true", "optim.lr=5e-4"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return single_process_rows(tmp_path_factory.mktemp("single_dsv3"), *DSV3)


def test_dsv3_colocated_tp2_matches_single_process(reference, tmp_path, monkeypatch):
    _, got = run(tmp_path, monkeypatch, "placement.mode=colocated", "train.tp=2", *DSV3)
    assert_same_run(got, reference)
    assert_same_weights_served(got)


def test_dsv3_disaggregated_pp2_matches_single_process(reference, tmp_path, monkeypatch):
    _, got = run(tmp_path, monkeypatch, "placement.mode=disaggregated", "train.pp=2", *DSV3)
    assert_same_run(got, reference)
    assert_same_weights_served(got)
