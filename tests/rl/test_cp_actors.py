"""Context parallelism in an RL run: a colocated cp2 run (two trainer ranks splitting every
micro-batch's tokens, ring attention, each rank's engine a replica generating without CP) takes the
single-process run's steps: the same samples and rewards, the loss within 1e-5 and the gradient norm
on every step. The reference packs each sample whole (train.shared_prefix=false), as cp does."""

import io

from rl_actor_helpers import assert_same_run, child_pythonpath, rows, single_process_rows, toy_config

from rl_engine.actors.run import run_actors


def test_colocated_cp2_matches_single_process(tmp_path, monkeypatch):
    reference = single_process_rows(tmp_path / "single", "train.shared_prefix=false")
    child_pythonpath(monkeypatch)
    run_actors(toy_config(tmp_path / "cp2", "placement.mode=colocated", "train.cp=2"), echo_stream=io.BytesIO())
    got = rows(tmp_path / "cp2")
    assert_same_run(got, reference, loss_atol=1e-5)
    assert any(abs(row["train/loss"]) > 1e-4 for row in reference)  # a loss that could differ
    for row in got:
        assert abs(row["train/mismatch_k1"]) <= 1e-5, row  # the engines' log-probs are the trainer's


def test_disaggregated_cp2_weight_sync_matches_single_process(tmp_path, monkeypatch):
    """Weight sync from a CP layout: the cp ranks hold whole replicas, one sends to the rollout worker,
    whose behavior log-probs then equal the trainer's."""
    reference = single_process_rows(tmp_path / "single", "train.shared_prefix=false")
    child_pythonpath(monkeypatch)
    run_actors(toy_config(tmp_path / "cp2", "placement.mode=disaggregated", "train.cp=2"), echo_stream=io.BytesIO())
    got = rows(tmp_path / "cp2")
    assert_same_run(got, reference, loss_atol=1e-5)
    for row in got:
        assert abs(row["train/mismatch_k1"]) <= 1e-5, row
