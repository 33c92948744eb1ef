"""The trainer group's mini-batch updates (`train.mini_batches_per_step`, `train.epochs_per_step`,
decoupled PPO with the proximal policy) reproduce the single-process trainer's, step by step, in a
data-parallel colocated layout and a pipeline-parallel disaggregated one."""

import pytest
from rl_actor_helpers import assert_same_run, child_pythonpath, rows, single_process_rows, toy_config

from rl_engine.actors.run import run_actors

MINI = ["train.mini_batches_per_step=2", "train.epochs_per_step=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return single_process_rows(tmp_path_factory.mktemp("single_mini"), *MINI)


def _run(tmp_path, monkeypatch, *overrides):
    import io

    child_pythonpath(monkeypatch)
    run_actors(toy_config(tmp_path, *MINI, *overrides), echo_stream=io.BytesIO())
    return rows(tmp_path)


def _check(got, reference):
    assert_same_run(got, reference)
    for a, b in zip(got, reference):
        assert a["train/micro_batches"] >= b["train/micro_batches"] >= 2, (a, b)  # dp2 counts both ranks'
        assert a["train/behavior_vs_proximal_kl"] <= 1e-6, a
        assert abs(a["train/proximal_clipfrac"] - b["train/proximal_clipfrac"]) <= 1e-6, (a, b)
    assert any(row["train/proximal_clipfrac"] > 0 for row in reference)


def test_colocated_dp2_mini_batches_match_single_process(reference, tmp_path, monkeypatch):
    _check(_run(tmp_path, monkeypatch, "placement.mode=colocated", "train.dp=2"), reference)


def test_disaggregated_pp2_mini_batches_match_single_process(reference, tmp_path, monkeypatch):
    _check(_run(tmp_path, monkeypatch, "placement.mode=disaggregated", "train.pp=2"), reference)


def test_colocated_dp2_target_kl_matches_single_process(tmp_path, monkeypatch):
    """train.target_kl in the trainer group: the stop is decided on the KL summed over the ranks, on
    every rank alike (a tiny target stops every step after its first update: 3 of 4 skipped)."""
    tiny = "train.target_kl=1e-12"
    reference = single_process_rows(tmp_path / "single", *MINI, tiny)
    got = _run(tmp_path / "actors", monkeypatch, "placement.mode=colocated", "train.dp=2", tiny)
    assert_same_run(got, reference)
    assert all(row["train/skipped_updates"] == 3 for row in got + reference)
